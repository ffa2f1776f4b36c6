#!/usr/bin/env bash
# Prints one sha256 over the package's sources (every promoter_dist/*.py, setup.cfg, pyproject.toml),
# in a fixed order. prepare_wheels.sh writes it beside the package's wheel; run_on_gpu.sh compares
# it with the tree's, so that a wheel older than the code is never what gets checked.
set -euo pipefail
cd "$(dirname "$0")/../.."
{ find promoter_dist -type f -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort; echo setup.cfg; echo pyproject.toml; } \
    | xargs sha256sum | sha256sum | cut -d' ' -f1
