"""The addresses a daemon advertises are ones peers can dial, also when it listens on every interface."""

from __future__ import annotations

import pytest
import trio

from hexgen.daemon.host import HostConfig, interface_ips, new_identity, open_host, reachable_hosts


def test_reachable_hosts():
    assert reachable_hosts(HostConfig(listen_host="127.0.0.1")) == ["127.0.0.1"]
    assert reachable_hosts(HostConfig(listen_host="0.0.0.0", advertise_host="gpu1.example.org")) == ["gpu1.example.org"]
    every = reachable_hosts(HostConfig(listen_host="0.0.0.0"))
    assert every == [*interface_ips(), "127.0.0.1"] and "0.0.0.0" not in every


@pytest.mark.trio
async def test_a_host_on_every_interface_advertises_dialable_addresses():
    async with open_host(new_identity(), HostConfig(listen_host="0.0.0.0")) as server:
        assert server.addrs and not any("/0.0.0.0/" in a for a in server.addrs)
        assert server.addrs[-1].startswith("/ip4/127.0.0.1/tcp/")
        async with open_host(new_identity(), HostConfig()) as client:
            with trio.fail_after(10):
                assert await client.connect(server.addrs[-1]) == server.peer_id
    async with open_host(new_identity(), HostConfig(advertise_host="203.0.113.7")) as behind_nat:
        port = behind_nat.libp2p.get_addrs()[0].value_for_protocol("tcp")
        assert behind_nat.addrs == [f"/ip4/203.0.113.7/tcp/{port}/p2p/{behind_nat.peer_id}"]
