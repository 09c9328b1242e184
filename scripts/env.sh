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
# Without build isolation, so that the build sees the torch installed above and compiles the
# optional libfastvae_torch against it (CMakeLists.txt; a plain `pip install .` skips it).
python -m pip install -q "scikit-build-core>=0.10"
python -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
