#!/usr/bin/env bash
# The one command for the GPU machine (bare and offline; its python3 holds a CUDA torch):
#
#   bash benchmarks/gpu/run_on_gpu.sh [benchmarks/gpu_check.py options]
#
# 1. A virtual environment with --system-site-packages, so that it sees python3's torch. When python3
#    is itself a virtual environment (whose packages a new one does not see), a .pth file adds its
#    site-packages after the new environment's own.
# 2. Installs benchmarks/gpu/wheels/ (made by prepare_wheels.sh) with --no-index --no-deps: exactly the
#    pinned list of benchmarks/gpu/requirements.txt and deepspeed, nothing resolved, the machine's torch
#    and numpy untouched. The package comes from its wheel when the wheel's source fingerprint matches
#    the tree's, else from the tree: built there, or, without a build backend, its modules imported
#    through a .pth file (a wheel older than the code is never what gets checked).
# 3. Runs benchmarks/gpu_check.py --json $OUT/gpu_check.json under a hard time limit.
# 4. Leaves in $OUT: gpu_check.log (all output), gpu_check.json (the figures) and gpu_check_logs.tar.gz
#    (every launch's log, each run's metrics.jsonl, logs and config; no checkpoints or data).
#
# Environment: OUT (default out/gpu-check-result), PYTHON (python3), WHEELS (benchmarks/gpu/wheels),
# VENV (/tmp/gpu-check-venv), WORK (/tmp/gpu-check-work), LIMIT_S (hard limit of the check, 520).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu-check-result}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/gpu/wheels}
VENV=${VENV:-/tmp/gpu-check-venv}
WORK=${WORK:-/tmp/gpu-check-work}
LIMIT_S=${LIMIT_S:-520}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!
started=$SECONDS
say() { echo "run_on_gpu [$((SECONDS - started)) s]: $*"; }
fail() { say "FAILED: $*"; exit 2; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
say "$("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"); $(nproc) cores"

# 1. the environment
rm -rf "$VENV"
PY="$VENV/bin/python"
pip=("$PY" -m pip)
if ! "$PYTHON" -m venv --system-site-packages "$VENV"; then
    # A Python without ensurepip makes environments without pip: python3's own pip installs into it.
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" || fail "cannot create a virtual environment with $PYTHON"
    pip=("$PYTHON" -m pip --python "$PY")
    say "environment made without pip; $PYTHON's pip installs into it"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    site_dir=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # addsitedir (not a bare path) also runs the .pth files of python3's own site-packages.
    "$PYTHON" -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages()))" \
        > "$site_dir/zz-base-site-packages.pth"
    say "$PYTHON is a virtual environment: its site-packages added through $site_dir/zz-base-site-packages.pth"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())" \
    || fail "torch does not import in $VENV"

# 2. the wheels
target=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PY" benchmarks/gpu/check_wheels.py "$WHEELS" --python-version "$target" --extra "deepspeed==$(
    ls "$WHEELS" | sed -n 's/^deepspeed-\([^-]*\)-.*\.whl$/\1/p')" || fail "$WHEELS is not ready (bash benchmarks/gpu/prepare_wheels.sh)"
pip_install=("${pip[@]}" install --quiet --no-index --no-deps --no-compile --ignore-installed --find-links "$WHEELS")
"${pip_install[@]}" -r benchmarks/gpu/requirements.txt deepspeed || fail "installing the wheels"
"${pip_install[@]}" promoter-dist || fail "installing the package's wheel"
if [ "$(bash benchmarks/gpu/fingerprint.sh)" = "$(cat "$WHEELS/SOURCES.sha256")" ]; then
    say "package installed from its wheel (same sources as the tree)"
elif "${pip[@]}" install --quiet --no-index --no-deps --no-compile --force-reinstall --no-build-isolation . &>/dev/null; then
    say "package installed from the tree: its wheel in $WHEELS is older than the sources"
else
    # No build backend here: the wheel keeps the command and metadata, the tree's modules are imported.
    site_dir=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf "$site_dir/promoter_dist"
    echo "$PWD" > "$site_dir/promoter_dist_tree.pth"
    say "the wheel is older than the sources and the tree does not build here: the tree's modules are imported"
fi
say "promoter_dist from $("$PY" -I -c 'import promoter_dist, os; print(os.path.dirname(promoter_dist.__file__))')"
say "installed: $("${pip[@]}" list 2>/dev/null | grep -iE '^(torch|numpy|deepspeed|transformers|webdataset|promoter-dist) ' | tr -s ' ' | paste -sd ';')"

# 3. the check
say "benchmarks/gpu_check.py $* (hard limit $LIMIT_S s)"
PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 timeout --kill-after=20 "$LIMIT_S" \
    "$PY" benchmarks/gpu_check.py --work "$WORK" --json "$OUT/gpu_check.json" "$@"
status=$?
[ $status -eq 124 ] && say "the check ran past $LIMIT_S s and was stopped"

# 4. the logs
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude=checkpoints --exclude=export --exclude=data \
    --exclude=build --exclude=predictions --exclude='*.npz' . 2>/dev/null || say "no work folder to pack"
say "exit status $status; $OUT: $(ls "$OUT" | paste -sd ' ')"
exec >&- 2>&-
wait "$tee_pid"  # the log is complete before the command returns
exit $status
