"""LAN discovery (mDNS): a daemon announces its addresses on its LAN and dials the daemons it hears of, so
daemons on one network find each other with no ``--bootstrap``.

python-zeroconf does the multicast DNS. The service type is hexgen's own (``_hexgen._udp.local.``), not
libp2p's ``_p2p._udp.local.``: other libp2p nodes on a LAN (IPFS) neither see hexgen daemons nor are dialled by
them. py-libp2p 0.8.1's ``MDNSDiscovery`` is not used: it announces the address of the interface that routes to
8.8.8.8 (127.0.0.1 on a LAN without a default route) and calls its handlers on zeroconf's thread. Only
non-loopback IPv4 addresses are announced, on their own interfaces: a daemon that listens on loopback alone
(tests, a single host) announces nothing and listens to nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger("hexgen.mdns")

SERVICE = "_hexgen._udp.local."
RESOLVE_MS = 2000
MAX_ADDRS = 8  # addresses read from one announcement
MAX_ADDR_CHARS = 250  # one TXT string holds 255 bytes
MAX_PENDING = 256


def lan_ips(addrs: list[str]) -> list[str]:
    """The non-loopback IPv4 addresses of ``addrs`` (``/ip4/IP/tcp/...`` multiaddrs, relayed ones left out),
    in order, each once. O(len(addrs))."""
    out: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        if "/p2p-circuit" in addr or len(parts) < 3 or parts[1] != "ip4":
            continue
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(parts[2]).is_loopback and parts[2] not in out:
                out.append(parts[2])
    return out


def txt_record(addrs: list[str]) -> dict[str, str]:
    """The TXT properties announcing ``addrs`` (one per string: ``a0``, ``a1``...); over-long ones left out."""
    kept = [a for a in addrs if "/p2p-circuit" not in a and len(a) <= MAX_ADDR_CHARS][:MAX_ADDRS]
    return {f"a{i}": addr for i, addr in enumerate(kept)}


def announced_addrs(properties: dict[bytes, bytes | None]) -> list[str]:
    """The dialable addresses a peer's TXT properties announce: ``/ip4|ip6/.../tcp/PORT/p2p/ID`` strings of one
    peer id, at most MAX_ADDRS; anything else (another peer's id, text that is not an address) left out.
    O(size of the properties)."""
    out: list[str] = []
    peer = None
    for key, value in sorted(properties.items()):
        if not key.startswith(b"a") or value is None or len(value) > MAX_ADDR_CHARS or len(out) >= MAX_ADDRS:
            continue
        try:
            addr = value.decode("ascii")
        except UnicodeDecodeError:
            continue
        parts = addr.split("/")
        if len(parts) != 7 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or parts[5] != "p2p":
            continue
        if peer is None or parts[6] == peer:
            peer = parts[6]
            out.append(addr)
    return out


class LanDiscovery:
    """Announces ``addrs()`` on the LAN for as long as ``run`` runs, and hands each other daemon's announced
    addresses to ``found`` (in a task of its own)."""

    def __init__(
        self, peer_id: str, addrs: Callable[[], list[str]], found: Callable[[list[str]], Awaitable[None]]
    ) -> None:
        self.peer_id = peer_id
        self.addrs = addrs
        self.found = found

    async def run(self) -> None:
        addrs = [a for a in self.addrs() if "/p2p-circuit" not in a]
        ips = lan_ips(addrs)
        if not ips:
            log.info("LAN discovery off: this daemon listens on no LAN address")
            return
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=ips, ip_version=IPVersion.V4Only))
        try:
            await self._announce_and_listen(zc, ips, addrs)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3.0):
                await trio.to_thread.run_sync(_close, zc, abandon_on_cancel=True)

    async def _announce_and_listen(self, zc: Zeroconf, ips: list[str], addrs: list[str]) -> None:
        port = int(addrs[0].split("/")[4])
        info = ServiceInfo(
            SERVICE,
            f"{self.peer_id[-32:]}.{SERVICE}",
            addresses=[socket.inet_aton(ip) for ip in ips],
            port=port,
            properties=txt_record(addrs),
        )
        await trio.to_thread.run_sync(zc.register_service, info)
        token = trio.lowlevel.current_trio_token()
        heard, names = trio.open_memory_channel[str](MAX_PENDING)

        def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            """On zeroconf's thread: hand the name to the trio side, dropped when it is busy or gone."""
            if state_change is not ServiceStateChange.Removed:
                with contextlib.suppress(trio.WouldBlock, trio.RunFinishedError, trio.ClosedResourceError):
                    trio.from_thread.run_sync(heard.send_nowait, name, trio_token=token)

        browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
        try:
            async with trio.open_nursery() as nursery:
                async for name in names:
                    nursery.start_soon(self._resolve, zc, name)
        finally:
            browser.cancel()

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        info: Any = await trio.to_thread.run_sync(zc.get_service_info, SERVICE, name, RESOLVE_MS)
        if info is None:
            return
        addrs = announced_addrs(dict(info.properties))
        if addrs and not addrs[0].endswith(f"/p2p/{self.peer_id}"):
            await self.found(addrs)


def _close(zc: Zeroconf) -> None:
    zc.unregister_all_services()
    zc.close()
