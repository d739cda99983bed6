"""How long to wait before the next connection attempt.

Exponential backoff with full jitter: the delay is drawn uniformly between
0 and ``min(max_delay, min_delay * 2**attempt)``. The jitter is what
matters in production: when a node drains or dies, all of its clients lose
their connection in the same instant, and without it they would all come
back in the same instant too, attempt after attempt. Drawing over the
whole window (rather than adding a little noise to a fixed delay) spreads
them the most for the same expected wait.
"""

from __future__ import annotations

import random

# 2**62 times any sensible min_delay is far past any max_delay; capping the
# exponent keeps a client that has failed for days from overflowing a float.
_MAX_EXPONENT = 62


def backoff_delay(
    attempt: int, min_delay: float, max_delay: float, rng: random.Random | None = None
) -> float:
    """The delay before reconnect attempt number ``attempt`` (0 for the first retry)."""
    ceiling = min(max_delay, min_delay * 2 ** min(max(attempt, 0), _MAX_EXPONENT))
    return (rng or random).uniform(0.0, ceiling)
