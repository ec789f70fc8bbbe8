#!/bin/sh
# Run the memproxy benchmark: bench/run.sh [--quick] [--profile] [--help]
# Uses $PYTHON, else the repository's .venv, else python3; that Python needs memproxy
# (pip install -e .) and bench/requirements.txt. Runs `python -m bench.run` with this
# checkout on the path, from any folder.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$PYTHON" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import memproxy, uvloop, yaml" 2>/dev/null; then
    echo "bench: $PYTHON cannot import memproxy and uvloop; from $root:" >&2
    echo "  pip install -e . -r bench/requirements.txt   (or set PYTHON=)" >&2
    exit 2
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m bench.run "$@"
