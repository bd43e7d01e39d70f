"""The CPU engine's thread count: the user's choice wins, else every core, or all but one for the event
loop when the engine shares the API server's process."""

import pytest

from kvpilot.runtime.engine import threads


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("KVPILOT_CPU_THREADS", raising=False)


def test_every_core_unless_the_engine_shares_the_event_loop_s_process(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert threads.default_cpu_threads() == 8
    assert threads.default_cpu_threads(shares_process=True) == 7
    monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
    assert threads.default_cpu_threads(shares_process=True) == 1


def test_environment_wins_kvpilot_first(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_cpu_threads() == 3
    monkeypatch.setenv("KVPILOT_CPU_THREADS", "5")
    assert threads.default_cpu_threads() == 5


@pytest.mark.parametrize("value", ["zero", "0", "-2"])
def test_bad_thread_counts_are_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("KVPILOT_CPU_THREADS", value)
    with pytest.raises(ValueError, match="KVPILOT_CPU_THREADS"):
        threads.default_cpu_threads()


def test_set_cpu_threads_sets_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("KVPILOT_CPU_THREADS", "1")
    try:
        assert threads.set_cpu_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
