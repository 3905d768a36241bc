#!/usr/bin/env bash
# `dualtrack bench kb` against a real Milvus standalone (C++ engine) instead of Milvus Lite,
# whose per-query cost grows with the collection (see benchmarks/with-standalone.sh).
# Arguments go to `dualtrack bench kb`, e.g.:
#
#   benchmarks/kb-standalone.sh --sizes 100000,1000000 --out bench-results/standalone.json
set -euo pipefail
cd "$(dirname "$0")/.."
# the PyPI standalone build is Milvus 2.3, which has no BM25: its collections are dense-only
export DUALTRACK_MILVUS__FULL_TEXT=false
exec benchmarks/with-standalone.sh .venv/bin/dualtrack bench kb --milvus-uri http://127.0.0.1:19530 "$@"
