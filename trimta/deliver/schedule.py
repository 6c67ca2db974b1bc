"""Retry schedule of deferred mail: exponential backoff and queue lifetime."""

from __future__ import annotations

import attrs


@attrs.frozen
class RetryPolicy:
    """When to try a deferred part again, and when to give up.

    Attributes:
        min_backoff: Delay after the first failed attempt, in seconds.
        max_backoff: Longest delay between two attempts, in seconds.
        max_lifetime: Age (since arrival) after which a part that is still
            deferred bounces, in seconds.
    """

    min_backoff: float
    max_backoff: float
    max_lifetime: float

    def delay(self, attempts: int) -> float:
        """Return the wait after `attempts` failed attempts (1 or more).

        The delay doubles from `min_backoff` up to `max_backoff`, as
        Postfix's queue manager does between its minimal and maximal
        backoff times.
        """
        exponent = max(0, attempts - 1)
        if exponent > 60:
            return self.max_backoff
        return min(self.max_backoff, self.min_backoff * (2**exponent))

    def next_attempt(self, *, arrival: float, attempts: int, now: float) -> float | None:
        """Return the time of the next attempt, or None when the part expired.

        A part expires once it is older than `max_lifetime`. The last retry
        is moved up to the expiry time, so that a long backoff does not
        keep a message past its lifetime.
        """
        expiry = arrival + self.max_lifetime
        if now >= expiry:
            return None
        return min(now + self.delay(attempts), expiry)
