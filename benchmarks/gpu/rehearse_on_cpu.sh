#!/usr/bin/env bash
# Rehearses run_on_gpu.sh on a CPU machine, as close to the bare GPU machine as a CPU allows:
#   1. the same pinned wheels, for this machine's Python (prepare_wheels.sh with PY_VERSION);
#   2. a bare python3 like the GPU machine's: a virtual environment holding only torch, numpy and
#      torch's own requirements (linked from the project's environment), with no deepspeed, gensim,
#      webdataset, transformers, scipy or matplotlib;
#   3. run_on_gpu.sh with that python3 and those wheels, passing --device cpu --quick (and any options
#      given here) to the check.
# A wheel missing from the list, a module-level import of a library the list leaves out, or a fault of
# the install steps fails here, at no GPU time. Needs network access to PyPI; about 4 minutes.
#
#   bash benchmarks/gpu/rehearse_on_cpu.sh            # folders under /tmp/gpu-check-rehearsal
set -euo pipefail
cd "$(dirname "$0")/../.."
REHEARSAL=${REHEARSAL:-/tmp/gpu-check-rehearsal}
SOURCE_PYTHON=${SOURCE_PYTHON:-.venv/bin/python}
rm -rf "$REHEARSAL"
mkdir -p "$REHEARSAL"
version=$("$SOURCE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

PY_VERSION=$version DEST="$REHEARSAL/wheels" PYTHON="$SOURCE_PYTHON" bash benchmarks/gpu/prepare_wheels.sh

"$("$SOURCE_PYTHON" -c 'import sys; print(sys._base_executable)')" -m venv "$REHEARSAL/base"
"$SOURCE_PYTHON" - "$("$REHEARSAL/base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" <<'EOF'
"""Link torch, numpy, torch's requirements, setuptools and packaging into the bare environment."""
import importlib.metadata as metadata
import os
import re
import sys

target = sys.argv[1]
wanted, seen = ["torch", "numpy", "setuptools", "packaging"], set()
while wanted:
    name = wanted.pop()
    if name in seen:
        continue
    seen.add(name)
    dist = metadata.distribution(name)
    wanted += [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        source = os.path.join(str(dist.locate_file("")), top)
        if os.path.exists(source) and not os.path.exists(os.path.join(target, top)):
            os.symlink(source, os.path.join(target, top))
print("bare python3 holds:", ", ".join(sorted(seen)))
EOF

# DeepSpeed compiles its CPU communication op for this environment's own install path: in a folder of the
# rehearsal's own, so that the shared ~/.cache/torch_extensions build of the project's environment stays.
TORCH_EXTENSIONS_DIR="$REHEARSAL/torch_extensions" PYTHON="$REHEARSAL/base/bin/python" WHEELS="$REHEARSAL/wheels" \
    OUT="$REHEARSAL/out" VENV="$REHEARSAL/venv" WORK="$REHEARSAL/work" \
    bash benchmarks/gpu/run_on_gpu.sh --device cpu --quick "$@"
