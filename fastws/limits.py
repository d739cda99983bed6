"""Per-connection limits on what a client may send: rate and bad commands.

Both are a few floats per connection and are consulted once per command,
with the loop's clock passed in, so that they cost no system call of
their own.
"""

from __future__ import annotations


class RateLimit:
    """A token bucket of ``burst`` commands refilled at ``rate`` per second.

    A command that finds the bucket empty is refused. A client that keeps
    sending into an empty bucket is not merely slowed but cut off: its
    refusals are counted, the count is forgotten only once the bucket has
    filled up again (the client backed off), and when it reaches ``burst``
    :meth:`take` answers :data:`EXHAUSTED`.
    """

    ALLOWED, REFUSED, EXHAUSTED = 0, 1, 2

    __slots__ = ("_burst", "_rate", "_refused", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now
        self._refused = 0

    def take(self, now: float) -> int:
        tokens = self._tokens + (now - self._stamp) * self._rate
        self._stamp = now
        if tokens >= self._burst:
            tokens = self._burst
            self._refused = 0
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return self.ALLOWED
        self._tokens = tokens
        self._refused += 1
        return self.EXHAUSTED if self._refused >= self._burst else self.REFUSED


class Strikes:
    """Counts malformed commands, forgiving one per whole second; True when too many.

    Forgiving whole seconds only means that ``limit`` bad commands in a
    row are always too many, however they are spaced within a second.
    A limit of 0 never says too many.
    """

    __slots__ = ("_count", "_limit", "_stamp")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count = 0
        self._stamp = 0.0

    def add(self, now: float) -> bool:
        forgiven = int(now - self._stamp)
        if forgiven:
            self._count = max(0, self._count - forgiven)
            self._stamp += forgiven
        if self._count == 0:
            # A clean slate: the next second to forgive starts now.
            self._stamp = now
        self._count += 1
        return 0 < self._limit <= self._count
