"""``python -m memproxy`` on uvloop: installs uvloop's event loop policy, then runs memproxy's CLI.

Used by the benchmark to compare the stdlib asyncio loop with uvloop without
changing memproxy: ``python bench/uvloop_serve.py serve --config ... --port ...``.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from memproxy.__main__ import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(sys.argv[1:]))
