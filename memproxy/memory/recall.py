"""Which memories a new conversation starts with, and the text of the block that holds them.

The design and every figure below come from an evidence-recall study on the LoCoMo
benchmark (long conversations between two people, with questions whose answers lie in
earlier sessions). Each stored message is ranked by BM25 over three fields: its own text,
the text of its neighbours in the same conversation (:data:`CONTEXT_WINDOW` on each side:
the answer to a question is often in the message next to the one that matches it), and
its date in words (so "in May" finds May). The query is the new conversation's first
message with stopwords left out, and with two kinds of words dropped that match too much
of the user's own memories to tell them apart: the names of the people talking (a question
names them, the messages that answer it rarely do) and any word in more than a fifth of
the user's memories.

The best candidates are packed into the token budget by score with a mild preference for
short memories (:data:`DENSITY_ALPHA`; a strong one fills the block with chit-chat), only
whole memories, and shown oldest first. On the conversations held out from tuning, this
block holds 0.84 of the evidence messages at 1,500 tokens and 0.73 at 500 (0.85 and 0.76
with a bare one-line header and no speaker labels: the frame and the labels cost some
budget, and tell the model what it is reading). What did not help, and was left out:
query expansion from the best hits, demoting or promoting the neighbours of chosen
memories, wider neighbour windows, and dense embeddings fused with BM25 (no better, and
slower than the latency budget).

Everything here is backend-neutral: a backend supplies the BM25 candidates and the
document counts; this module decides the terms, the packing and the text.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence

from memproxy.memory.store import Memory

# -- the block's text ----------------------------------------------------------------------

#: The block's first line: a tag that marks where memproxy's text starts.
BLOCK_OPEN = '<memories source="memproxy">'
#: What the lines below are, for the model.
BLOCK_INTRO = ("Excerpts from this user's earlier conversations with AI assistants that may "
               "bear on this request, oldest first:")
#: Each memory is one snippet: ``[YYYY-MM-DD] role: text``, dated in UTC.
SNIPPET = "[{day}] {role}: {text}"
#: The model is told the excerpts are background, not instructions.
BLOCK_OUTRO = "Use these only where they help with the request; they may be out of date."
#: The block's last line.
BLOCK_CLOSE = "</memories>"
#: How budgets are counted: one token for every 4 bytes of UTF-8 (rounded up).
BYTES_PER_TOKEN = 4

# -- ranking -------------------------------------------------------------------------------

#: Neighbouring messages of the same conversation indexed with each memory, on each side.
CONTEXT_WINDOW = 2
#: BM25 weights of the three indexed fields: own text, neighbours' text, date in words.
WEIGHTS = (1.0, 0.5, 0.5)
#: A capitalised query word (not opening a sentence) in more than this share of the
#: user's memories is taken for a speaker's name and dropped.
NAME_SHARE = 0.03
#: Any query word in more than this share of the user's memories is dropped. It costs at
#: most 0.01 of recall and keeps the slowest queries fast.
COMMON_SHARE = 0.2
#: Both shares are applied only from this many memories on. In a handful of memories one
#: mention is already a large share, and it is the topic asked about, not a name; the
#: study's users had 369 to 680, so its figures hold above this.
SHARES_MIN_MEMORIES = 100
#: Candidates fetched from the index for packing.
CANDIDATES = 200
#: Packing priority is score / bytes ** DENSITY_ALPHA.
DENSITY_ALPHA = 0.2
#: Query words kept at most, the longest first (a pasted document can have thousands; the
#: benchmark's questions have far fewer). Bounds the work one recall does.
MAX_QUERY_TERMS = 32

_STOPWORDS = """
a about above after again against all am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't
down during each few for from further had hadn't has hasn't have haven't having he he'd he'll he's
her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is isn't it
it's its itself let's me more most mustn't my myself no nor not of off on once only or other ought
our ours ourselves out over own same shan't she she'd she'll she's should shouldn't so some such
than that that's the their theirs them themselves then there there's these they they'd they'll
they're they've this those through to too under until up very was wasn't we we'd we'll we're we've
were weren't what what's when when's where where's which while who who's whom why why's with won't
would wouldn't you you'd you'll you're you've your yours yourself yourselves s t d ll m re ve
also just like get got go going went really will yes yeah oh hey hi thanks thank ok okay
kind sort thing things something anything stuff lot lots much many way ever still even
"""
#: Words a query is not searched for: common English, and conversational filler.
STOPWORDS = frozenset(_STOPWORDS.split())

# A word as the index's tokenizer (unicode61) sees one: letters and digits.
_WORD = re.compile(r"[^\W_]+")
# A capitalised word that does not open the text or a sentence: likely a name.
_NAME = re.compile(r"(?<![.?!]\s)(?<!^)\b([A-Z][a-z]+)")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")

#: ``count(term, cap)``: how many of the user's memories contain ``term`` in their own
#: text (stemmed as the index stems), counted up to ``cap``.
TermCounter = Callable[[str, int], int]


def query_terms(query: str, memories: int, count: TermCounter) -> list[str]:
    """The words of ``query`` to search the user's ``memories`` for, in query order.

    Stopwords, one-letter words and repeats go first; then, for a user with enough
    memories, names and then words common in the user's memories. A filter that would
    leave no word at all is not applied.
    """
    terms = words(query)
    if not terms or memories < SHARES_MIN_MEMORIES:
        return terms
    cap = int(COMMON_SHARE * memories) + 1
    found = {term: count(term, cap) for term in terms}
    names = {name.lower() for name in _NAME.findall(query)}
    name_cap = int(NAME_SHARE * memories) + 1
    terms = _unless_empty(terms, lambda t: t not in names or found[t] < name_cap)
    return _unless_empty(terms, lambda t: found[t] < cap)


def words(query: str) -> list[str]:
    """The words of ``query`` worth searching for, before the per-user filters."""
    words = list(dict.fromkeys(
        w for w in _WORD.findall(query.lower()) if len(w) > 1 and w not in STOPWORDS))
    if len(words) > MAX_QUERY_TERMS:
        longest = set(sorted(words, key=len, reverse=True)[:MAX_QUERY_TERMS])
        words = [w for w in words if w in longest]
    return words


def _unless_empty(terms: list[str], keep: Callable[[str], bool]) -> list[str]:
    kept = [t for t in terms if keep(t)]
    return kept or terms


def neighbour_texts(texts: Sequence[str]) -> list[str]:
    """For each message of a conversation (in order), its neighbours' text, for the index."""
    w = CONTEXT_WINDOW
    return [" ".join([*texts[max(0, i - w):i], *texts[i + 1:i + 1 + w]])
            for i in range(len(texts))]


def date_words(created_at: float) -> str:
    """The UTC date in words for the index, e.g. ``8 may 2023``."""
    t = time.gmtime(created_at)
    return f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year}"


def day(created_at: float) -> str:
    """The UTC date a snippet shows, e.g. ``2023-05-08``."""
    return time.strftime("%Y-%m-%d", time.gmtime(created_at))


def snippet(memory: Memory) -> str:
    # A stored text cannot end the block early and pass itself off as the client's words.
    text = _CLOSE_TAG.sub(r"<\\/\1", memory.text)
    return SNIPPET.format(day=day(memory.created_at), role=memory.role, text=text)


_CLOSE_TAG = re.compile(r"</(memories)", re.IGNORECASE)


def render(memories: Iterable[Memory]) -> str:
    """The block showing ``memories`` in the order given; ``""`` for none."""
    lines = [snippet(m) for m in memories]
    if not lines:
        return ""
    return "\n".join([BLOCK_OPEN, BLOCK_INTRO, *lines, BLOCK_OUTRO, BLOCK_CLOSE])


def tokens(text: str) -> int:
    """The cost of ``text`` against a budget: its UTF-8 bytes / 4, rounded up."""
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


_FRAME_BYTES = len("\n".join([BLOCK_OPEN, BLOCK_INTRO, BLOCK_OUTRO, BLOCK_CLOSE]).encode())


def pack(candidates: Iterable[tuple[Memory, float]], max_tokens: int) -> tuple[Memory, ...]:
    """The memories for a block of at most ``max_tokens``, oldest first.

    ``candidates`` are ``(memory, score)`` with higher scores better. They are taken by
    score / size ** :data:`DENSITY_ALPHA` (ties: lower id first); each one that still fits
    goes in, whole, unless its text is already in. :func:`render` of the result costs at
    most ``max_tokens``.
    """
    room = max_tokens * BYTES_PER_TOKEN - _FRAME_BYTES
    sized = [(m, s, len(snippet(m).encode()) + 1) for m, s in candidates]  # + its newline
    sized.sort(key=lambda c: (-c[1] / c[2] ** DENSITY_ALPHA, c[0].id))
    chosen: list[Memory] = []
    texts: set[str] = set()
    for memory, _, size in sized:
        if size <= room and memory.text not in texts:
            chosen.append(memory)
            texts.add(memory.text)
            room -= size
    return tuple(sorted(chosen, key=lambda m: (m.created_at, m.id)))
