#!/bin/sh
# Run the memproxy benchmark: bench/run.sh [--quick] [--profile] [--help]
# Uses $PYTHON, else the repository's .venv, else python3; that Python needs memproxy installed
# (pip install -e .) and, for the plot, uvloop and the profile: pip install -r bench/requirements.txt
set -e
here=$(cd "$(dirname "$0")" && pwd)
missing=""
for tool in nginx wrk; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    echo "bench: missing:$missing" >&2
    echo "  Debian/Ubuntu: sudo apt-get install -y nginx wrk" >&2
    echo "  (nginx does not need to run as a service: the benchmark starts its own instances)" >&2
    exit 2
fi
if [ -z "$PYTHON" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import memproxy, yaml" 2>/dev/null; then
    echo "bench: $PYTHON cannot import memproxy; install it (pip install -e .) or set PYTHON=" >&2
    exit 2
fi
exec "$PYTHON" "$here/run.py" "$@"
