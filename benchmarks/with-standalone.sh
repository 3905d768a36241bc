#!/usr/bin/env bash
# Run a command next to a real Milvus standalone (the C++ engine) at http://127.0.0.1:19530.
#
# Milvus standalone is the production vector store; Milvus Lite is the local default. This
# installs the PyPI `milvus` package (requirements-milvus-server.txt: 2.3.5, a self-contained
# standalone build) into its own venv and runs it, and the command, inside a private network
# namespace, because it binds every interface: nothing outside the namespace can reach it.
# The command sees DUALTRACK_TEST_MILVUS_URI (the tests' fixtures then use the server, one
# collection per test) and DUALTRACK_TEST_MILVUS_FULL_TEXT=false (2.3 has no BM25). Needs root (unshare) and iproute2. `make test-standalone` (part of
# `make test`) runs the access, migration and permission tests this way; by hand:
#
#   benchmarks/with-standalone.sh .venv/bin/pytest tests/services/kb/test_access.py
set -euo pipefail
cd "$(dirname "$0")/.."
server_venv=.venv-milvus-server
if [ ! -x "$server_venv/bin/milvus-server" ]; then
    python3 -m venv "$server_venv"
    "$server_venv/bin/pip" install -q -r requirements-milvus-server.txt
fi
data=$(mktemp -d /tmp/dualtrack-milvus-standalone.XXXXXX)
export server_venv data
exec unshare --net bash -c '
    set -euo pipefail
    ip link set lo up
    "$server_venv/bin/milvus-server" --data "$data" >"$data/milvus.log" 2>&1 &
    server=$!
    # the wrapper starts "$data/bin/milvus run standalone"; it ignores a polite stop while
    # busy, so both get SIGTERM, then SIGKILL after a grace period, then the data goes
    # (a process already gone is no error: the script exits with the status of the command)
    stop() {
        status=$?
        pkill -f "$data/bin/milvus" 2>/dev/null || true
        kill "$server" 2>/dev/null || true
        sleep 5
        pkill -9 -f "$data/bin/milvus" 2>/dev/null || true
        kill -9 "$server" 2>/dev/null || true
        rm -rf "$data"
        exit "$status"
    }
    trap stop EXIT
    for _ in $(seq 1 120); do
        (echo >/dev/tcp/127.0.0.1/19530) 2>/dev/null && break
        sleep 1
    done
    # 2.3 has no BM25 (2.5 added it): the fixtures keep their collections dense-only there
    DUALTRACK_TEST_MILVUS_URI=http://127.0.0.1:19530 DUALTRACK_TEST_MILVUS_FULL_TEXT=false "$@"
' standalone "$@"
