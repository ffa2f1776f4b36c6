#!/usr/bin/env bash
# Build and verify shards on a CPU node with every core.
#   bash shards/build.sh train_sequences.txt [OUT_DIR] [extra `promoter-dist shards build` options]
# Rerunning the same command after an interruption resumes; the result is byte-identical.
# Each core parses and writes its own segments of the file; the shards are the same bytes
# whatever the number of cores (they depend on --segment-bytes, not on --workers).
set -euo pipefail
source_file=${1:?usage: shards/build.sh SOURCE [OUT_DIR] [options]}
out=${2:-out/shards}
shift $(( $# >= 2 ? 2 : 1 ))
promoter-dist shards build "$source_file" --out "$out" --workers "$(nproc)" "$@"
promoter-dist shards verify "$out"
