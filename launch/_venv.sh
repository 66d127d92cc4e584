# Sourced by launch scripts: make sure .venv exists and holds pdeds, then activate it.
# Install order (see README): the local CPU torch wheel first when no torch is importable,
# then the package with its dev extras. DeepSpeed installs from source with no ops prebuilt.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "pdeds: creating $venv" >&2
    python3 -m venv "$venv" || { echo "pdeds: python3 -m venv failed; install python3-venv" >&2; exit 1; }
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/pip" install -q torch==2.13.0 || exit 1
fi
if ! "$venv/bin/python" -c "import pdeds, deepspeed, pyamg, h5py" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$venv/bin/pip" install -q -e "$root[dev]" || exit 1
fi
export PATH="$venv/bin:$PATH"
# DeepSpeed picks its CPU accelerator on machines with no GPU; say so explicitly to skip probing.
if ! "$venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
