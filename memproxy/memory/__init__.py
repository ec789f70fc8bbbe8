"""memproxy's own memory: it stores what each client's conversations said, and recalls it.

- :mod:`memproxy.memory.stage`: the request path's part: recall before, capture after;
- :mod:`memproxy.memory.dialects`: request bodies and answers in each API's format;
- :mod:`memproxy.memory.store`: the storage contract; :mod:`memproxy.memory.sqlite`: the
  embedded backend; :mod:`memproxy.memory.recall`: ranking and the block's text.

Only the names the rest of memproxy needs without loading the engine live here.
"""

from __future__ import annotations

#: What ``x-memory-mode`` may say: memory on, off, recall only (read), store only (write).
MODES = ("on", "off", "read", "write")
#: The response header that says how many memories went into the request.
MEMORIES_HEADER = "x-memproxy-memories"


class InvalidMemoryMode(Exception):
    """The client sent an ``x-memory-mode`` memproxy does not know; answer 400."""
