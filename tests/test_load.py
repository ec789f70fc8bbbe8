"""Isolation under load (bounded, loopback only): see tests/load.py for the soak variant."""

from __future__ import annotations

from tests import load


async def test_twenty_thousand_requests_from_fifty_identities_never_mix_memory_spaces() -> None:
    figures = await load.run(total=20_000, concurrency=200)
    assert figures.requests == 20_000
    assert figures.failed == 0, figures.first_errors
    assert figures.wrong_id == 0, figures.first_errors
    assert figures.streamed >= 20_000 // 3
    assert set(figures.by_detector) == {"explicit_header", "header_patterns", "api_key_hash",
                                        "default"}
    assert figures.rss_growth_middle_to_end < 0.10, figures
