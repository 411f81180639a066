"""Relay slots of a node that cannot be dialled: a reservation on each ``--relay-peer``, kept fresh, and the
node's ``/p2p-circuit`` addresses through them, which its advert carries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from hexgen.daemon.host import DialError, Host, peer_of_address
from hexgen.daemon.relay import RESERVE_RETRY_S, circuit_address, reserve

log = logging.getLogger("hexgen.relay")

# A slot is renewed at this fraction of its lifetime, so one failed renewal still leaves time for retries.
RENEW_AT = 0.5
MIN_RENEW_S = 5.0


def renew_after(expires: float, now: float) -> float:
    """Seconds until a slot expiring at ``expires`` (Unix seconds) is renewed: half its remaining life, at
    least MIN_RENEW_S (a relay that grants short slots is not asked in a tight loop). O(1)."""
    return max(MIN_RENEW_S, (expires - now) * RENEW_AT)


class RelaySlots:
    """Holds a slot on each relay of ``relays`` (multiaddrs ending in ``/p2p/ID``) for as long as it runs,
    and keeps ``host.circuits`` to the addresses of the slots held; ``on_change`` runs whenever they change."""

    def __init__(self, host: Host, relays: tuple[str, ...], on_change: Callable[[], None]) -> None:
        self.host = host
        self.relays = relays
        self.on_change = on_change
        self.held: dict[str, float] = {}  # relay address -> the slot's expiry

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for relay in self.relays:
                nursery.start_soon(self.keep, relay)

    async def keep(self, relay: str) -> None:
        """Reserve on ``relay``, renew before the slot lapses or once the relay's connection drops, and after a
        failure retry with backoff."""
        failures = 0
        while True:
            try:
                expires = await reserve(self.host, relay)
            except DialError as exc:
                log.warning("no slot on relay %s: %s", relay, exc)
                self._set(relay, None)
                await trio.sleep(RESERVE_RETRY_S[min(failures, len(RESERVE_RETRY_S) - 1)])
                failures += 1
                continue
            failures = 0
            if relay not in self.held:
                log.info("holding a slot on relay %s", peer_of_address(relay))
            self._set(relay, expires)
            await self._hold(peer_of_address(relay), renew_after(expires, time.time()))

    async def _hold(self, relay_id: str, seconds: float) -> None:
        """Wait ``seconds``, or less if the connection to the relay drops (its slot went with it)."""
        with trio.move_on_after(seconds):
            while True:
                await trio.sleep(1.0)
                if relay_id not in self.host.connected_peers():
                    return

    def _set(self, relay: str, expires: float | None) -> None:
        had = relay in self.held
        if expires is None:
            self.held.pop(relay, None)
        else:
            self.held[relay] = expires
        if had != (expires is not None):
            self.host.circuits[:] = [circuit_address(r, self.host.peer_id) for r in self.relays if r in self.held]
            self.on_change()
