#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv from the repo's own
# files when it is missing, then runs what was asked.
#   bash scripts/dev.sh demo [httpd options]  the demo: httpd on 127.0.0.1:8080
#   bash scripts/dev.sh echo [echo options]   the line echo server on :7007
#   bash scripts/dev.sh test [pytest options] the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import ds_trio, pytest, trio, anyio' 2>/dev/null; then
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e '.[test,lint,docs]'
    fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
    demo)
        setup
        exec "$VENV/bin/python" -m ds_trio.examples.httpd "$@"
        ;;
    echo)
        setup
        exec "$VENV/bin/python" -m ds_trio.examples.echo "$@"
        ;;
    test)
        setup
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|echo|test [args]" >&2
        exit 2
        ;;
esac
