#!/usr/bin/env bash
# Set up .venv (torch first, then fastvae with its test extras) and run the test suite.
# Without a GPU the Triton kernels run under Triton's interpreter (tests/conftest.py sets it).
set -euo pipefail
. "$(dirname "$0")/env.sh" test
python -m pytest -q "$@"
