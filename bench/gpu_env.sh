# Sourced by bench/gpu_check.sh and bench/gpu_engine.sh (from the repo root): what the device's own image
# (Python 3.12, torch, Triton, transformers; nothing installed for kvpilot) needs before kvpilot runs there.
# - kvpilot not installed: the repo's portions exposed as the `kvpilot` namespace package;
# - wheels bench/gpu_wheels.sh saved under .whl/ (the image lacks llguidance, which the engine imports):
#   installed into a temporary folder, last on PYTHONPATH; a device call carries .whl with the tree.
# $1 names the calling script in messages. Exits 2 when a module the scripts import is still missing.
if ! python3 -c "import kvpilot.kernels.ops" 2>/dev/null; then
    shim="$(mktemp -d)/kvpilot"
    mkdir -p "$shim"
    for part in cli kernels runtime operator; do ln -s "$PWD/$part" "$shim/$part"; done
    export PYTHONPATH="$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 2
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"  # last of PYTHONPATH (still before site-packages)
fi
if ! python3 -c "import llguidance" 2>/dev/null; then
    echo "$1: llguidance (imported by the engine) is missing here: run 'bash bench/gpu_wheels.sh' on a machine" \
         "with pip and carry .whl with the call" >&2
    exit 2
fi
