"""Which network interface a worker's gloo and NCCL sockets bind to: the one its data to the world leaves by.

Left to themselves, gloo and NCCL bind to the address the hostname resolves to, which is 127.0.0.1 or
127.0.1.1 on many Linux hosts: every rank then tells its peers to dial a loopback address, and a world that
spans two hosts cannot connect. An interface the operator names (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``) always wins.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, MutableMapping

import psutil

VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_PROBE_PORT = 9  # discard: a UDP connect only asks the kernel for a route, it sends nothing
_DEFAULT_ROUTE_PROBE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): only the default route leads there


def _ipv4(host: str) -> str | None:
    """``host`` as an IPv4 address (a name is resolved); None when it has none."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


def route_source(host: str) -> str | None:
    """The local address the kernel sends from to reach ``host`` (None: no route, or not IPv4)."""
    ip = _ipv4(host)
    if ip is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, _PROBE_PORT))
        except OSError:
            return None
        return str(probe.getsockname()[0])


def interface_of(address: str, table: Mapping[str, list[object]] | None = None) -> str | None:
    """The name of the local interface that holds IPv4 ``address`` (``table``: psutil.net_if_addrs()'s shape,
    read afresh when None). O(addresses on the host)."""
    for name, addrs in (psutil.net_if_addrs() if table is None else table).items():
        for addr in addrs:
            if getattr(addr, "family", None) == socket.AF_INET and getattr(addr, "address", None) == address:
                return name
    return None


def default_route_source() -> str | None:
    """The local address the default route leaves from (None: no default route, as in a lab namespace)."""
    return route_source(_DEFAULT_ROUTE_PROBE)


def data_interface(advertised: str, peer: str | None = None) -> str | None:
    """The interface the kernel routes ``peer`` (the world's store host) over: the one this host's data to
    that world leaves by (for the store's own host, the interface holding its address). Else, when there is
    no route, the interface that holds ``advertised`` (the daemon's address as peers dial it). None when
    neither is known."""
    source = route_source(peer) if peer is not None else None
    found = interface_of(source) if source is not None else None
    if found is None:
        ip = _ipv4(advertised)
        found = interface_of(ip) if ip is not None else None
    return found


def pin_interfaces(advertised: str, peer: str | None, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Name the data interface (``data_interface``) for gloo and NCCL in ``environ`` where the operator has
    not; returns the interface in force for gloo (None: gloo picks, from the hostname)."""
    interface = data_interface(advertised, peer)
    if interface is not None:
        for variable in VARIABLES:
            environ.setdefault(variable, interface)
    return environ.get(VARIABLES[0])
