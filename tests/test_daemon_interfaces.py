"""The data interface a worker binds gloo and NCCL to (daemon.interfaces), on this machine's real interfaces."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import psutil
import pytest

from hexgen.daemon.host import interface_ips
from hexgen.daemon.interfaces import (
    VARIABLES,
    data_interface,
    default_route_source,
    interface_of,
    pin_interfaces,
    route_source,
)


def loopback_name() -> str:
    names = [n for n, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)]
    assert names, "this machine has no interface holding 127.0.0.1"
    return names[0]


def test_the_interface_holding_an_address_is_found_in_the_table():
    table = {
        "lo": [SimpleNamespace(family=socket.AF_INET, address="127.0.0.1")],
        "data0": [
            SimpleNamespace(family=socket.AF_INET6, address="fe80::1"),
            SimpleNamespace(family=socket.AF_INET, address="10.77.1.11"),
        ],
    }
    assert interface_of("10.77.1.11", table) == "data0"
    assert interface_of("127.0.0.1", table) == "lo"
    assert interface_of("10.77.1.12", table) is None


def test_a_loopback_swarm_binds_to_loopback_and_a_name_is_resolved():
    assert data_interface("127.0.0.1") == loopback_name()
    assert data_interface("localhost") == loopback_name()


def test_an_address_that_is_not_ours_falls_back_to_the_route_to_the_peer():
    # 127.0.1.1 is on no interface (lo holds 127.0.0.1/8 as one address) but routes over loopback
    assert route_source("127.0.1.1") == "127.0.0.1"
    assert data_interface("192.0.2.7", peer="127.0.1.1") == loopback_name()
    assert data_interface("192.0.2.7") is None
    assert data_interface("no-such-host.invalid") is None


def test_an_interface_the_operator_named_wins():
    environ = {"GLOO_SOCKET_IFNAME": "eth9"}
    assert pin_interfaces("127.0.0.1", None, environ) == "eth9"
    assert environ == {"GLOO_SOCKET_IFNAME": "eth9", "NCCL_SOCKET_IFNAME": loopback_name()}
    empty: dict[str, str] = {}
    assert pin_interfaces("127.0.0.1", None, empty) == loopback_name()
    assert set(empty) == set(VARIABLES)
    nothing: dict[str, str] = {}
    assert pin_interfaces("192.0.2.7", None, nothing) is None and nothing == {}


def test_the_route_to_the_world_s_store_beats_the_advertised_address():
    """A worker binds where its data to the world leaves by: with a routable store host, the interface of the
    route to it, whatever address the daemon put first in its advert (a bridge such as docker0)."""
    source = default_route_source()
    if source is None:
        pytest.skip("this machine has no default route")
    routed = interface_of(source)
    assert data_interface("127.0.0.1", peer=source) == routed
    assert data_interface("127.0.0.1", peer=None) == loopback_name()


def test_peers_are_told_the_default_route_s_address_first():
    source = default_route_source()
    addresses = interface_ips()
    if source is None or source not in addresses:
        pytest.skip("this machine has no default route from an interface address")
    assert addresses[0] == source
    assert addresses[1:] == sorted(addresses[1:])
