# Source me: creates .venv (once) and installs fastvae into it with the given extras.
#   . scripts/env.sh train      -> fastvae[train]
# torch is installed first and pinned to the build this machine carries on disk: a bare
# "torch" requirement with no torch present would pull the newest CUDA build (several GB).
set -euo pipefail
extras="${1:-}"
cd "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${FASTVAE_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".${extras:+[$extras]}"
