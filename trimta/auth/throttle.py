"""Delays after failed AUTH attempts, growing per client address.

Each failure from an address doubles the delay before its 535 reply, from
`first_delay` up to `max_delay`. An address's count is forgotten after
`forget_after` seconds without a failure, or at a successful AUTH. The
table contains at most `max_clients` addresses: the oldest entry goes first,
so a flood of addresses cannot grow memory without bound.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs


@attrs.define
class AuthThrottle:
    """Failure counts per client address; times are in seconds."""

    first_delay: float = 1.0
    max_delay: float = 16.0
    forget_after: float = 900.0
    max_clients: int = 10_000
    _failures: OrderedDict = attrs.Factory(OrderedDict)

    def record_failure(self, client: object, now: float) -> float:
        """Count a failure and return how long to wait before replying."""
        count, last = self._failures.pop(client, (0, now))
        if now - last > self.forget_after:
            count = 0
        count += 1
        self._failures[client] = (count, now)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return min(self.max_delay, self.first_delay * 2 ** (count - 1))

    def record_success(self, client: object) -> None:
        """Forget the client's failures."""
        self._failures.pop(client, None)
