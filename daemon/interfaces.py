"""Which network interface a worker's gloo and NCCL sockets bind to: the one that carries its daemon's address.

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


def data_interface(advertised: str, peer: str | None = None) -> str | None:
    """The interface that carries ``advertised`` (the daemon's address, as peers dial it) when it is this
    host's; else (an address behind NAT or a name for another machine) the one the kernel routes ``peer``
    over. None when neither is known."""
    ip = _ipv4(advertised)
    found = interface_of(ip) if ip is not None else None
    if found is None and peer is not None:
        source = route_source(peer)
        found = interface_of(source) if source is not None else None
    return found


def pin_interfaces(advertised: str, peer: str | None, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Name the data interface for gloo and NCCL in ``environ`` where the operator has not; returns the
    interface in force for gloo (None: gloo picks, from the hostname)."""
    interface = data_interface(advertised, peer)
    if interface is not None:
        for variable in VARIABLES:
            environ.setdefault(variable, interface)
    return environ.get(VARIABLES[0])
