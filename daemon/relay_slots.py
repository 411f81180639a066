"""Relay slots of a node that cannot be dialled: a reservation on each ``--relay-peer`` and on relays learned
from the swarm, kept fresh, and the node's ``/p2p-circuit`` addresses through them, which its advert carries."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping

import trio

from hexgen.daemon.host import DialError, Host, peer_of_address
from hexgen.daemon.messages import Advert
from hexgen.daemon.nat_check import PUBLIC
from hexgen.daemon.relay import RESERVE_RETRY_S, circuit_address, is_circuit, reserve

log = logging.getLogger("hexgen.relay")

# A slot is renewed at this fraction of its lifetime, so one failed renewal still leaves time for retries.
RENEW_AT = 0.5
MIN_RENEW_S = 5.0
MAX_LEARNED_RELAYS = 2
# Which relays to hold is recomputed when the swarm state changes and at least this often: a member's advert
# that changes only its reachability or relay flag, or this node's own reachability, fires no change event.
RECHOOSE_S = 5.0


def renew_after(expires: float, now: float) -> float:
    """Seconds until a slot expiring at ``expires`` (Unix seconds) is renewed: half its remaining life, at
    least MIN_RENEW_S (a relay that grants short slots is not asked in a tight loop). O(1)."""
    return max(MIN_RENEW_S, (expires - now) * RENEW_AT)


def relay_address(peer: str, advert: Advert) -> str | None:
    """The address to reserve on ``peer`` at: its first advertised non-circuit address, ending ``/p2p/PEER``;
    None when it advertises none. O(addresses)."""
    for addr in advert.addrs:
        if not is_circuit(addr):
            return addr if addr.endswith(f"/p2p/{peer}") else f"{addr}/p2p/{peer}"
    return None


def swarm_relays(
    members: Mapping[str, tuple[Advert, str]],
    skip: Collection[str],
    keeping: Collection[str],
    cap: int = MAX_LEARNED_RELAYS,
) -> tuple[str, ...]:
    """Addresses of up to ``cap`` relays to hold slots on, from ``members`` (peer -> (advert, advertised
    reachability)): those whose advert says they relay and whose reachability is public, except the peers in
    ``skip`` (relays already configured). Peers in ``keeping`` (held now) come first so that a slot is not
    moved while its relay stays, then the rest by peer id. O(m log m) for m members."""
    relays = []
    for peer, (advert, reachability) in members.items():
        addr = relay_address(peer, advert) if advert.relay and reachability == PUBLIC else None
        if addr is not None and peer not in skip:
            relays.append((peer not in keeping, peer, addr))
    return tuple(addr for _, _, addr in sorted(relays)[:cap])


class RelaySlots:
    """Holds a slot on each relay that ``relays()`` names (multiaddrs ending in ``/p2p/ID``) for as long as it
    names it, and keeps ``host.circuits`` to the addresses of the slots held; ``on_change`` runs whenever they
    change. ``changed(seconds)`` returns when the swarm state changed or after ``seconds``."""

    def __init__(
        self,
        host: Host,
        relays: Callable[[], tuple[str, ...]],
        changed: Callable[[float], Awaitable[None]],
        on_change: Callable[[], None],
    ) -> None:
        self.host = host
        self.relays = relays
        self.changed = changed
        self.on_change = on_change
        self.held: dict[str, float] = {}  # relay address -> the slot's expiry

    async def run(self) -> None:
        """A keeper for each relay ``relays()`` names, started when it appears and cancelled when it goes."""
        keepers: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                wanted = self.relays()
                for relay in [r for r in keepers if r not in wanted]:
                    log.info("no longer keeping a slot on relay %s", peer_of_address(relay))
                    keepers.pop(relay).cancel()
                for relay in wanted:
                    if relay not in keepers:
                        keepers[relay] = await nursery.start(self._keeper, relay)
                await self.changed(RECHOOSE_S)

    async def _keeper(self, relay: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await self.keep(relay)
            finally:
                self._set(relay, None)

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
            self.host.circuits[:] = [circuit_address(r, self.host.peer_id) for r in self.held]
            self.on_change()
