"""Link probes for bench/nat.py: bulk bytes between two lab hosts over a plain TCP socket (direct; through both
NATs by a TCP simultaneous open, as a hole punch opens it; spliced by a forwarder on the relay host) and over
a torch gloo pair (direct), timed at the receiver from its first byte to its last.

The parent calls ``tcp_mib_s``, ``punched_tcp_mib_s``, ``forwarded_tcp_mib_s`` and ``gloo_mib_s``; each runs
this file as a program in the lab's namespaces (``python bench/nat_probes.py ROLE ...``) and reads what the
receiving end prints: one JSON line ``{"seconds": s, "bytes": n}`` per transfer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
CONNECT_S = 20.0
PROBE_S = 120.0
MIB = 1 << 20


@dataclass(frozen=True)
class Spot:
    """Where a probe program runs (a network namespace) and the address its peers use for it."""

    ns: str
    ip: str


# -- the programs, run inside a namespace ------------------------------------------------------------------


def _receive(sock: socket.socket, size: int) -> dict[str, float]:
    """Read ``size`` bytes; the rate counts from the end of the first read (a connect or accept may wait)."""
    buffer = bytearray(CHUNK)
    first = sock.recv_into(buffer)
    if not first:
        raise SystemExit("the sender closed before sending")
    start, got = time.perf_counter(), first
    while got < size:
        n = sock.recv_into(buffer)
        if not n:
            raise SystemExit(f"the sender closed after {got} of {size} bytes")
        got += n
    return {"seconds": time.perf_counter() - start, "bytes": got - first}


def _send(sock: socket.socket, size: int) -> None:
    block = memoryview(os.urandom(CHUNK))
    for start in range(0, size, CHUNK):
        sock.sendall(block[: min(CHUNK, size - start)])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the receiver closes once it has everything


def _connect(address: tuple[str, int], bind: int | None = None) -> socket.socket:
    """A connection to ``address``, retried until CONNECT_S passed; ``bind``: from this local port (and with
    SO_REUSEADDR, so both ends of a simultaneous open can bind theirs)."""
    deadline = time.monotonic() + CONNECT_S
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind is not None:
            sock.bind(("0.0.0.0", bind))
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        sock.settimeout(PROBE_S)
        return sock


def _listen(address: tuple[str, int]) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(address)
    server.listen(2)
    server.settimeout(PROBE_S)
    print("listening", flush=True)
    return server


def _report(result: dict[str, float]) -> None:
    print(json.dumps(result), flush=True)


def _program_recv(args: argparse.Namespace) -> None:
    if args.splice_token:
        _report(_sealed(_open_records, args))
        return
    if args.listen:
        with _listen(_address(args.listen)) as server:
            sock, _ = server.accept()
    else:
        sock = _connect(_address(args.connect), args.bind)
    with sock:
        sock.settimeout(PROBE_S)
        if args.sealed:
            _report(_sealed(_open_records, args, sock))
        else:
            _report(_receive(sock, args.bytes))


def _program_send(args: argparse.Namespace) -> None:
    if args.splice_token:
        _sealed(_seal_records, args)
        return
    with _connect(_address(args.connect), args.bind) as sock:
        if args.sealed:
            _sealed(_seal_records, args, sock)
        else:
            _send(sock, args.bytes)


def _sealed(program: Any, args: argparse.Namespace, sock: socket.socket | None = None) -> Any:
    """Run ``program`` (in trio) on a KV link's sealed stream (``hexgen.daemon.sealed``) over ``sock``, or with
    ``--splice-token`` over a splice through the relay at ``--connect`` (``hexgen.daemon.splice``)."""
    import trio

    from hexgen.daemon.sealed import SealedStream
    from hexgen.daemon.splice import dial

    async def main() -> Any:
        if sock is None:
            host, port = _address(args.connect)
            stream = (await dial(host, port, bytes.fromhex(args.splice_token))).stream
        else:
            sock.setblocking(False)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        return await program(SealedStream(stream, bytes.fromhex(args.sealed)), args.bytes)

    return trio.run(main)


def _program_splice(args: argparse.Namespace) -> None:
    """hexgen's splicer (``hexgen.daemon.splice``) on ``--listen``:``--port``, with ``--token`` registered."""
    import trio

    from hexgen.daemon.splice import Splicer

    async def main() -> None:
        splicer = Splicer(lambda peer: True, args.listen, args.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(splicer.run)
            why = splicer.register("bench", bytes.fromhex(args.token))
            if why is not None:
                raise SystemExit(f"the splicer refused the token: {why}")
            print("listening", flush=True)
            await trio.sleep(PROBE_S)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _seal_records(stream: Any, size: int) -> None:
    """``size`` bytes as sealed records of a KV part's size (as a daemon writes one frame per record)."""
    block = os.urandom(WRITE_BYTES)
    for start in range(0, size, WRITE_BYTES):
        await stream.write(block[: min(WRITE_BYTES, size - start)])
    await stream.stream.send_eof()
    await stream.stream.receive_some(1)


async def _open_records(stream: Any, size: int) -> dict[str, float]:
    """Open records until ``size`` bytes came; the rate counts from the end of the first record."""
    first = len(await stream.read_record() or b"")
    start, got = time.perf_counter(), first
    while got < size:
        record = await stream.read_record()
        if record is None:
            raise SystemExit(f"the sender closed after {got} of {size} bytes")
        got += len(record)
    await stream.stream.aclose()
    return {"seconds": time.perf_counter() - start, "bytes": got - first}


def _program_forward(args: argparse.Namespace) -> None:
    """Accept the receiver on ``--out-port``, then the sender on ``--in-port``, and copy the sender's bytes to
    the receiver in user space, as a relay does."""
    host = args.listen
    with _listen((host, args.out_port)) as out_server, _listen((host, args.in_port)) as in_server:
        outgoing, _ = out_server.accept()
        incoming, _ = in_server.accept()
    with outgoing, incoming:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while n := incoming.recv_into(buffer):
            outgoing.sendall(view[:n])
        outgoing.shutdown(socket.SHUT_WR)
        outgoing.recv(1)


def _program_gloo(args: argparse.Namespace) -> None:
    """Rank 0 sends a float32 tensor of ``--bytes`` to rank 1 ``--reps`` times, a barrier before each; rank 1
    reports each receive's time."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=2)
    tensor = torch.ones(args.bytes // 4, dtype=torch.float32)
    warm = torch.ones(1024)
    (dist.send if args.rank == 0 else dist.recv)(warm, 1 - args.rank)
    for _ in range(args.reps):
        dist.barrier()
        if args.rank == 0:
            dist.send(tensor, 1)
            continue
        start = time.perf_counter()
        dist.recv(tensor, 0)
        _report({"seconds": time.perf_counter() - start, "bytes": tensor.numel() * 4})
    dist.barrier()
    dist.destroy_process_group()


BULK_PROTOCOL = "/hexgen-bench/bulk/1"
WRITE_BYTES = 512 * 1024  # a KV part's size (daemon.kv_frames.PART_BYTES)


async def _libp2p_recv(args: argparse.Namespace) -> None:
    """A hexgen libp2p host (Noise, yamux) on ``--listen``: prints its address, then the timing of the first
    stream that brings ``--bytes``."""
    import trio

    from hexgen.daemon.host import HostConfig, new_identity, open_host

    done = trio.Event()
    config = HostConfig(listen_host=args.listen, port=0)
    async with open_host(new_identity(), config) as host:

        async def bulk(stream: Any) -> None:
            got, first, start = 0, 0, 0.0
            while got < args.bytes:
                chunk = await stream.read(1 << 20)
                if not chunk:
                    raise SystemExit(f"the stream ended after {got} of {args.bytes} bytes")
                if not got:
                    first, start = len(chunk), time.perf_counter()
                got += len(chunk)
            _report({"seconds": time.perf_counter() - start, "bytes": got - first})
            await stream.write(b"k")
            done.set()

        host.handle(BULK_PROTOCOL, bulk)  # type: ignore[arg-type]
        print(json.dumps({"addr": f"{host.addrs[0]}/p2p/{host.peer_id}"}), flush=True)
        with trio.fail_after(PROBE_S):
            await done.wait()


async def _libp2p_send(args: argparse.Namespace) -> None:
    import trio

    from hexgen.daemon.host import HostConfig, new_identity, open_host

    async with open_host(new_identity(), HostConfig(listen_host=args.listen, port=0)) as host:
        with trio.fail_after(PROBE_S):
            peer = await host.connect(args.connect)
            stream = await host.open_stream(peer, BULK_PROTOCOL)  # type: ignore[arg-type]
            block = os.urandom(WRITE_BYTES)
            for start in range(0, args.bytes, WRITE_BYTES):
                await stream.write(block[: min(WRITE_BYTES, args.bytes - start)])
            await stream.read(1)
            await stream.close()


def _program_libp2p(args: argparse.Namespace) -> None:
    import trio

    trio.run(_libp2p_recv if args.connect is None else _libp2p_send, args)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role", required=True)
    recv = roles.add_parser("recv")
    recv.add_argument("--listen")
    recv.add_argument("--connect")
    recv.add_argument("--bind", type=int)
    recv.add_argument("--bytes", type=int, required=True)
    recv.add_argument("--sealed", metavar="KEY_HEX")
    recv.add_argument("--splice-token", metavar="TOKEN_HEX")
    send = roles.add_parser("send")
    send.add_argument("--connect", required=True)
    send.add_argument("--bind", type=int)
    send.add_argument("--bytes", type=int, required=True)
    send.add_argument("--sealed", metavar="KEY_HEX")
    send.add_argument("--splice-token", metavar="TOKEN_HEX")
    splice = roles.add_parser("splice")
    splice.add_argument("--listen", required=True)
    splice.add_argument("--port", type=int, required=True)
    splice.add_argument("--token", required=True)
    forward = roles.add_parser("forward")
    forward.add_argument("--listen", required=True)
    forward.add_argument("--in-port", type=int, required=True)
    forward.add_argument("--out-port", type=int, required=True)
    gloo = roles.add_parser("gloo")
    gloo.add_argument("--master", required=True)
    gloo.add_argument("--rank", type=int, required=True)
    gloo.add_argument("--bytes", type=int, required=True)
    gloo.add_argument("--reps", type=int, default=3)
    libp2p = roles.add_parser("libp2p")
    libp2p.add_argument("--listen", required=True)
    libp2p.add_argument("--connect")
    libp2p.add_argument("--bytes", type=int, required=True)
    return parser


PROGRAMS = {
    "recv": _program_recv,
    "send": _program_send,
    "forward": _program_forward,
    "gloo": _program_gloo,
    "libp2p": _program_libp2p,
    "splice": _program_splice,
}


# -- the parent's side ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _program(spot: Spot, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """This file run as ``args`` in ``spot``'s namespace; killed on the way out if it still runs."""
    command = ["ip", "netns", "exec", spot.ns, sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {})
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _await_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=PROBE_S)
        raise RuntimeError(f"the probe's {what} ended early: {err.strip()[-2000:]}")
    return line


def _results(proc: subprocess.Popen[str]) -> list[dict[str, float]]:
    out, err = proc.communicate(timeout=PROBE_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the probe's receiver failed: {err.strip()[-2000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"seconds"')]


def _mib_s(results: list[dict[str, float]]) -> float:
    """The median rate of ``results``, MiB/s."""
    return statistics.median(r["bytes"] / MIB / r["seconds"] for r in results)


def _check_sender(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=PROBE_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the probe's sender failed: {err.strip()[-2000:]}")


def _sealing(sealed: bool) -> list[str]:
    """The flags that make a probe's two ends a KV link's sealed stream, under one fresh key."""
    return ["--sealed", os.urandom(32).hex()] if sealed else []


def tcp_mib_s(
    sender: Spot,
    receiver: Spot,
    size: int,
    reps: int,
    port: int = 47001,
    sealed: bool = False,
    dial: str | None = None,
) -> list[float]:
    """Each of ``reps`` transfers of ``size`` bytes over a plain TCP connection from ``sender`` to
    ``receiver``'s address (or ``dial``, an address forwarded to it), MiB/s."""
    rates, seal = [], _sealing(sealed)
    for _ in range(reps):
        with _program(receiver, "recv", "--listen", f"{receiver.ip}:{port}", "--bytes", str(size), *seal) as recv:
            _await_line(recv, "receiver")
            at = f"{dial or receiver.ip}:{port}"
            with _program(sender, "send", "--connect", at, "--bytes", str(size), *seal) as send:
                _check_sender(send)
            rates.append(_mib_s(_results(recv)))
    return rates


def punched_tcp_mib_s(
    sender: Spot, receiver: Spot, size: int, reps: int, port: int = 47101, sealed: bool = False
) -> list[float]:
    """As ``tcp_mib_s`` between two hosts behind NATs that map a port to the same port (endpoint-independent):
    both bind a port and dial the other's public address (``Spot.ip`` is the router's) at once, so each NAT
    sees its own host's SYN leave before the other's arrives: a TCP simultaneous open, a hole punch."""
    rates, seal = [], _sealing(sealed)
    for k in range(reps):
        a, b = port + 2 * k, port + 2 * k + 1
        recv_args = ["recv", "--connect", f"{sender.ip}:{a}", "--bind", str(b), "--bytes", str(size), *seal]
        with _program(receiver, *recv_args) as recv:
            send_args = ["send", "--connect", f"{receiver.ip}:{b}", "--bind", str(a), "--bytes", str(size), *seal]
            with _program(sender, *send_args) as send:
                _check_sender(send)
            rates.append(_mib_s(_results(recv)))
    return rates


def forwarded_tcp_mib_s(
    sender: Spot, receiver: Spot, relay: Spot, size: int, reps: int, port: int = 47201, sealed: bool = False
) -> list[float]:
    """As ``tcp_mib_s`` through a user-space forwarder on ``relay``: both ends dial out to it (neither can be
    dialled), as the ends of a relayed circuit do."""
    rates, seal = [], _sealing(sealed)
    for k in range(reps):
        inward, outward = port + 2 * k, port + 2 * k + 1
        forward_args = ["forward", "--listen", relay.ip, "--in-port", str(inward), "--out-port", str(outward)]
        with _program(relay, *forward_args) as forward:
            _await_line(forward, "forwarder")
            _await_line(forward, "forwarder")
            recv_args = ["recv", "--connect", f"{relay.ip}:{outward}", "--bytes", str(size), *seal]
            with _program(receiver, *recv_args) as recv:
                with _program(sender, "send", "--connect", f"{relay.ip}:{inward}", "--bytes", str(size), *seal) as send:
                    _check_sender(send)
                rates.append(_mib_s(_results(recv)))
    return rates


def spliced_mib_s(sender: Spot, receiver: Spot, relay: Spot, size: int, reps: int, port: int = 47401) -> list[float]:
    """As ``tcp_mib_s`` on a KV link's sealed stream spliced by hexgen's splicer on ``relay``: both ends dial
    out to it naming one token, as two daemons' KV link does."""
    rates = []
    for k in range(reps):
        token, relay_at = os.urandom(32).hex(), f"{relay.ip}:{port + k}"
        with _program(relay, "splice", "--listen", relay.ip, "--port", str(port + k), "--token", token) as splicer:
            _await_line(splicer, "splicer")
            common = ["--connect", relay_at, "--bytes", str(size), "--splice-token", token, *_sealing(True)]
            with _program(receiver, "recv", *common) as recv:
                with _program(sender, "send", *common) as send:
                    _check_sender(send)
                rates.append(_mib_s(_results(recv)))
    return rates


def gloo_mib_s(sender: Spot, receiver: Spot, size: int, reps: int, port: int = 47301) -> list[float]:
    """``reps`` torch.distributed (gloo) sends of a ``size``-byte tensor from ``sender`` to ``receiver``, MiB/s
    each; the pair meets at a TCP store on ``sender``, gloo on each host's ``data0``."""
    common = ["--master", f"{sender.ip}:{port}", "--bytes", str(size), "--reps", str(reps)]
    env = {"GLOO_SOCKET_IFNAME": "data0"}
    with _program(sender, "gloo", "--rank", "0", *common, env=env) as first:
        with _program(receiver, "gloo", "--rank", "1", *common, env=env) as second:
            results = _results(second)
        _check_sender(first)
    return [r["bytes"] / MIB / r["seconds"] for r in results]


def libp2p_mib_s(sender: Spot, receiver: Spot, size: int, reps: int) -> list[float]:
    """``reps`` transfers of ``size`` bytes on one libp2p stream between two hexgen hosts (Noise, yamux, as the
    daemons open them), written in KV-part-sized pieces, MiB/s each."""
    rates = []
    for _ in range(reps):
        with _program(receiver, "libp2p", "--listen", receiver.ip, "--bytes", str(size)) as recv:
            addr = json.loads(_await_line(recv, "libp2p receiver"))["addr"]
            send_args = ["libp2p", "--listen", sender.ip, "--connect", addr, "--bytes", str(size)]
            with _program(sender, *send_args) as send:
                _check_sender(send)
            rates.append(_mib_s(_results(recv)))
    return rates


if __name__ == "__main__":
    parsed = _parser().parse_args()
    PROGRAMS[parsed.role](parsed)
