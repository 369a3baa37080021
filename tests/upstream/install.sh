#!/usr/bin/env bash
# Create a separate virtual environment holding upstream scPRINT-2 (scprint2 1.0.3 on
# simpler-flash 1.3.5), used only as the numerical reference of tests/test_parity_upstream.py.
#
# Usage: tests/upstream/install.sh [VENV_DIR]      (default: <repo>/.cache/upstream-venv)
#        PYTHON=python3.11 tests/upstream/install.sh
#
# Idempotent: a marker file records the installed requirement set; a second call with the
# same set returns at once. Needs PyPI only (about a minute, 1.6 GB).
#
# Why it looks like this (see shared/upstream_reference.md):
# - scprint2's own pins pull CUDA torch 2.8, lamindb[gcp], esm, wandb, ...: it is installed
#   with --no-deps, and only what its model code imports is added afterwards.
# - torch==2.13.0 is repeated on every pip line so pip can never swap it for another build
#   (here that pin resolves to the local CPU wheel; anything else downloads CUDA).
# - No torchvision from PyPI (its wheels need CUDA libraries next to CPU torch);
#   make_reference.py provides the one class simpler_flash needs (StochasticDepth).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/.cache/upstream-venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH="torch==2.13.0"
UPSTREAM=(scprint2==1.0.3 simpler-flash==1.3.5 performer-pytorch==1.1.4)
RUNTIME=(lightning huggingface_hub numpy pandas scipy einops torch-geometric
         local-attention axial-positional-embedding matplotlib pyarrow h5py)

SPEC="$TORCH ${UPSTREAM[*]} ${RUNTIME[*]}"
MARKER="$VENV/.scprint-atlas-upstream-complete"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]]; then
    echo "upstream venv ready: $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
# One installer at a time (e.g. parallel pytest workers).
exec 9>"$VENV.lock"
flock 9
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]]; then
    echo "upstream venv ready: $VENV"
    exit 0
fi

rm -f "$MARKER"
# The local CPU torch wheel is cp311; on another Python, torch==2.13.0 would come from PyPI (CUDA).
if [[ "$("$PYTHON" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" != True ]]; then
    echo "install.sh: $PYTHON is not Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)

"${PIP[@]}" "$TORCH"
"${PIP[@]}" --no-deps "$TORCH" "${UPSTREAM[@]}"
"${PIP[@]}" "$TORCH" "${RUNTIME[@]}"

# Fail here, not in the test, if torch was swapped or the model code cannot import its deps.
"$VENV/bin/python" - <<'EOF'
import importlib, sys
import torch
assert torch.__version__.split("+")[0] == "2.13.0", f"pip swapped torch: {torch.__version__}"
for mod in ("lightning", "einops", "torch_geometric", "local_attention",
            "axial_positional_embedding", "performer_pytorch", "pyarrow", "h5py"):
    importlib.import_module(mod)
print("upstream venv ok: python", sys.version.split()[0], "torch", torch.__version__)
EOF

echo "$SPEC" > "$MARKER"
echo "upstream venv ready: $VENV"
