#!/usr/bin/env bash
# Builds benchmarks/gpu/wheels/ (git-ignored): every wheel the bare, offline GPU machine needs to run
# benchmarks/gpu_check.py, for its CPython 3.12 on manylinux x86_64:
#   - the pinned list benchmarks/gpu/requirements.txt, downloaded as binary wheels for that Python;
#   - deepspeed 0.19.8, a source package, built here as a pure-Python wheel (its ops compile at run time);
#   - this package, built from the tree, with the fingerprint of its sources (SOURCES.sha256).
# Then benchmarks/gpu/check_wheels.py checks the folder (one wheel per name at the pinned version, every
# wheel installable on that Python and platform, under the size limit) and prints its size.
#
#   bash benchmarks/gpu/prepare_wheels.sh                          # for the GPU machine
#   PY_VERSION=3.11 DEST=/tmp/wheels311 bash benchmarks/gpu/prepare_wheels.sh   # same set for this machine
#
# Needs network access to PyPI. Rerun after changing the package (run_on_gpu.sh installs the tree
# instead of a package wheel whose fingerprint no longer matches).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-benchmarks/gpu/wheels}
DEEPSPEED=deepspeed==0.19.8
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
# pip matches manylinux_2_N tags exactly: name every N the pinned wheels use (up to glibc 2.35).
PLATFORMS=(manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64
           manylinux_2_26_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64
           manylinux_2_34_x86_64 manylinux_2_35_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
echo "1/4 pinned wheels for CPython $PY_VERSION (benchmarks/gpu/requirements.txt)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" --dest "$DEST" -r benchmarks/gpu/requirements.txt
echo "2/4 $DEEPSPEED built as a wheel"
"$PYTHON" -m pip wheel --quiet --no-deps "$DEEPSPEED" --wheel-dir "$DEST"
echo "3/4 promoter-dist built from the tree"
"$PYTHON" -m pip wheel --quiet --no-deps . --wheel-dir "$DEST"
bash benchmarks/gpu/fingerprint.sh > "$DEST/SOURCES.sha256"
echo "4/4 check"
"$PYTHON" benchmarks/gpu/check_wheels.py "$DEST" --python-version "$PY_VERSION" --extra "$DEEPSPEED"
