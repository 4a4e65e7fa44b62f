#!/usr/bin/env bash
# The test command: provision (fast when nothing is missing), then the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_dag.py -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/provision.sh

rc=0
.venv/bin/pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests; that counts as a failure" >&2
    exit 1
fi
exit "$rc"
