#!/usr/bin/env bash
# Set up .venv (torch first, then fastvae with its training extras) and run the main job:
# train a VAE on scikit-learn's embedded 8x8 digits; writes runs/digits/. Extra arguments go to
# `fastvae train` (see `fastvae train --help`).
set -euo pipefail
. "$(dirname "$0")/env.sh" train
fastvae train "$@"
