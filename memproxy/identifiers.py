"""What a memory user id (or conversation id) may look like.

Every id memproxy writes into a header passes through :func:`check_id` first,
so nothing a client sent can smuggle CR/LF, control characters or unbounded
text into the request LiteLLM sees.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 128
ID_CHARACTERS = "letters, digits and . _ - : @ +"
_VALID_ID = re.compile(rf"[A-Za-z0-9._:@+\-]{{1,{MAX_ID_LENGTH}}}")


def check_id(value: str) -> str | None:
    """Return why ``value`` is not a usable id, or ``None`` when it is."""
    if _VALID_ID.fullmatch(value):
        return None
    if not value:
        return "it is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"it is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    return f"it may only contain {ID_CHARACTERS}"


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string that may be written into a header as an id."""
    return isinstance(value, str) and _VALID_ID.fullmatch(value) is not None
