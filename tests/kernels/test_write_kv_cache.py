"""Reshape-and-cache: the Triton kernel writes exactly what the torch reference writes, fp8 included."""

from __future__ import annotations

import pytest
import torch

from kvpilot.kernels.write_kv_cache import write_kv_cache, write_kv_cache_ref

FP8 = torch.float8_e4m3fn


def caches(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
           device: torch.device) -> list[torch.Tensor]:
    """Two identical pairs of caches, pre-filled so that untouched slots can be checked."""
    fill = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=torch.Generator().manual_seed(3))
    return [fill.to(dtype).to(device) for _ in range(4)]


@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(2, 64, 16), (3, 80, 8), (1, 96, 32), (4, 128, 8),
                                                           (20, 256, 16)],
                         ids=["h2d64", "h3d80", "h1d96", "h4d128", "h20d256-two-head-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_bit_for_bit(device, kv_heads, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(0)
    tokens, num_blocks = 11, 6
    key = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7]] = -1  # padding tokens
    slots = slots.to(device)
    ref_k, ref_v, k_cache, v_cache = caches(num_blocks, block_size, kv_heads, head_dim, dtype, device)
    before = k_cache.clone()
    write_kv_cache_ref(key, value, ref_k, ref_v, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    assert torch.equal(k_cache.flatten(0, 1)[~written.to(device)], before.flatten(0, 1)[~written.to(device)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fp8_quantize_on_write(device, dtype):
    """Saturation at +-448, ties to even, subnormals and the carry into the exponent, as torch rounds them."""
    gen = torch.Generator().manual_seed(1)
    tokens, kv_heads, head_dim, block_size = 6, 2, 64, 8
    magnitudes = torch.logspace(-5, 3, head_dim)  # e4m3 subnormals up to past the saturation point
    key = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * magnitudes).to(dtype).to(device)
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    value[0, 0, :4] = torch.tensor([31.6, -31.6, 17.0, 0.0048828125])  # carry, carry, tie, tie among subnormals
    slots = torch.tensor([0, 9, -1, 17, 30, 5], device=device)
    ref_k, ref_v, k_cache, v_cache = (c.to(FP8) for c in caches(4, block_size, kv_heads, head_dim, dtype, device))
    write_kv_cache_ref(key, value, ref_k, ref_v, slots, k_scale=0.5, v_scale=1.0)
    write_kv_cache(key, value, k_cache, v_cache, slots, k_scale=0.5, v_scale=1.0)
    assert torch.equal(k_cache.float(), ref_k.float())
    assert torch.equal(v_cache.float(), ref_v.float())
    assert v_cache[0, 0, 0, :4].float().tolist() == [32.0, -32.0, 16.0, 0.00390625]


@pytest.mark.parametrize("scale", [0.3, 0.7, 1.1], ids=lambda s: f"scale{s}")
def test_fp8_write_with_a_non_power_of_two_scale_is_bit_exact(device, scale):
    """value / 0.3 must be the correctly rounded quotient (as torch divides): values placed at fp8 rounding
    midpoints times the scale land on the reference's side of the midpoint."""
    grid = torch.arange(-448.0, 448.0, 0.0625)
    fp8_values = grid.to(FP8).float().unique()
    midpoints = (fp8_values[1:] + fp8_values[:-1]) / 2
    near = torch.cat([midpoints, torch.nextafter(midpoints, midpoints + 1), torch.nextafter(midpoints, midpoints - 1)])
    head_dim, kv_heads = 64, 2
    per_token = head_dim * kv_heads
    tokens = -(-near.numel() // per_token)
    key = torch.nn.functional.pad(near * scale, (0, tokens * per_token - near.numel())).view(tokens, kv_heads, head_dim)
    key = key.to(device)
    block_size = 16
    slots = torch.arange(tokens, device=device)
    ref_k, ref_v, k_cache, v_cache = (c.to(FP8) for c in caches(-(-tokens // block_size), block_size, kv_heads,
                                                                 head_dim, torch.float32, device))
    write_kv_cache_ref(key, key, ref_k, ref_v, slots, k_scale=scale, v_scale=scale)
    write_kv_cache(key, key, k_cache, v_cache, slots, k_scale=scale, v_scale=scale)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))


def test_fp8_write_keeps_nan_and_infinities_saturate(device):
    key = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.0]).repeat_interleave(16).view(5, 1, 16)
    slots = torch.arange(5, device=device)
    ref_k, ref_v, k_cache, v_cache = (c.to(FP8) for c in caches(1, 8, 1, 16, torch.float32, device))
    write_kv_cache_ref(key, key, ref_k, ref_v, slots, k_scale=0.3, v_scale=0.3)
    write_kv_cache(key.to(device), key.to(device), k_cache, v_cache, slots, k_scale=0.3, v_scale=0.3)
    written = k_cache[0, :5, 0].float().cpu()
    assert written[0].isnan().all()
    assert written[1:].tolist() == ref_k[0, :5, 0].float()[1:].tolist()
    assert written[1:3, 0].tolist() == [448.0, -448.0]


def test_slots_past_the_cache_are_never_written(device):
    """A slot >= num_blocks * block_size is skipped (no out-of-bounds store), the others are written."""
    key = torch.randn(3, 2, 64, device=device)
    k_cache, v_cache = torch.zeros(2, 8, 2, 64, device=device), torch.zeros(2, 8, 2, 64, device=device)
    guard = torch.zeros(4, 8, 2, 64, device=device)  # the cache is a view of the first 2 blocks of a larger tensor
    k_cache, v_cache = guard[:2], guard[2:]
    write_kv_cache(key, key, k_cache, v_cache, torch.tensor([16, 3, 1000], device=device))
    assert torch.equal(k_cache[0, 3], key[1])
    assert torch.count_nonzero(guard) == 2 * key[1].numel()


def test_strided_key_from_fused_qkv(device):
    qkv = torch.randn(5, 4 + 2 + 2, 64, device=device)
    key, value = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 4, 5, 6, 7], device=device)
    ref_k, ref_v, k_cache, v_cache = caches(2, 8, 2, 64, torch.float32, device)
    write_kv_cache_ref(key, value, ref_k, ref_v, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("change,message", [
    ({"slots": 4}, "5 tokens but slot_mapping has 4"),
    ({"kv_heads": 3}, "key has 3 KV heads, the cache 2"),
    ({"k_scale": 0.0}, "fp8 scales must be positive"),
])
def test_bad_inputs_name_the_value(device, change, message):
    key = torch.zeros(5, change.get("kv_heads", 2), 64, device=device)
    cache = torch.zeros(2, 8, 2, 64, device=device, dtype=FP8 if "k_scale" in change else torch.float32)
    slots = torch.arange(change.get("slots", 5), device=device)
    with pytest.raises(ValueError, match=message):
        write_kv_cache(key, key, cache, cache, slots, k_scale=change.get("k_scale", 1.0))
