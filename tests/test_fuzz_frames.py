"""Fuzzing the worker frames' parsers (daemon/worker_frames.py): what a daemon tells its worker processes and
what they answer; and the KV parts of a relayed exchange (daemon/kv_frames.py), which also cross between daemons. Each parser returns a frame or raises MalformedFrame with a one-line message; a frame it
returns reads back from its own wire form unchanged, and the worker and the supervisor can act on it."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hexgen.daemon.deployment import Replica
from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.kv_frames import PART_BYTES, KvPart, from_daemon, from_worker
from hexgen.daemon.start_deadline import StartDeadline
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import MalformedFrame, encode_frame
from hexgen.daemon.worker_frames import (
    AbortFrame,
    AliveFrame,
    ConfigureFrame,
    ErrorFrame,
    ExchangedFrame,
    ExchangeFrame,
    FailedFrame,
    FromWorker,
    GenerateFrame,
    HandoffFrame,
    ImportFrame,
    ProgressFrame,
    ReadyFrame,
    ShutdownFrame,
    StepFrame,
    TokenFrame,
    ToWorker,
    frame_from_worker,
    frame_to_worker,
)
from hexgen.daemon.worker_link import LocalWorker, WorkerFailed
from hexgen.daemon.worker_process import exchange_from, spec_from
from hexgen.daemon.worker_setup import CacheSetup, ExchangeSetup, ReplicaSetup
from hexgen.engine.sampler import _mix_seed
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.fuzz import FUZZ, REFUSED, assert_clear, fuzzed, outcome, run_now, show

SECRET = bytes(range(32))
REPLICA = ReplicaSetup("/models/x", ((0, 3, 2), (3, 5, 1)), mode="prefill", cache=CacheSetup(block_size=256))
DECODE = ReplicaSetup("/models/x", ((0, 5, 1),), first_rank=3, mode="decode", dtype="bfloat16")
EXCHANGE = ExchangeSetup(("10.0.0.1", 29500), "hexgen/1/2/x/", SECRET, 0, 4, (REPLICA, DECODE), 60.0)
RELAYED = ExchangeSetup(("10.0.0.1", 29500), "hexgen/1/3/x/", SECRET, 3, 4, (REPLICA, DECODE), 60.0, "libp2p", (1,))
SAMPLING = SamplingParams(max_tokens=4, temperature=0.5, top_k=3, seed=9, stop_token_ids=(2,), ignore_eos=True)
TO_WORKER: list[ToWorker] = [
    ConfigureFrame(0, 1, ReplicaSetup("/m", ((0, 4, 1),)), port=29400, progress=True),
    ConfigureFrame(
        2,
        3,
        REPLICA,
        store=("10.0.0.1", 29500),
        prefix="hexgen/1/1/abc/",
        secret=SECRET,
        advertised="10.0.0.2",
        exchange=EXCHANGE,
        device="cuda:1",
        threads=4,
        backend="nccl",
        connect_timeout_s=60.0,
    ),
    ConfigureFrame(
        0, 2, DECODE, store=("10.0.0.1", 29500), prefix="hexgen/1/1/abc/stage1/", bridge="b/", layout_rank=0
    ),
    GenerateFrame(5, (1, 2, 3), SamplingParams(max_tokens=2), dst=1),
    ImportFrame(6, (1, 403, 407), SAMPLING, src=0),
    AbortFrame(7),
    ExchangeFrame(EXCHANGE),
    ExchangeFrame(RELAYED),
    ShutdownFrame(),
]
CAUSE = WorldFailure("exchange group", "connect", "10.0.0.9")
FROM_WORKER: list[FromWorker] = [
    ProgressFrame(100, 1000),
    ReadyFrame(1, True, 512),
    FailedFrame("the exchange group could not connect (cannot reach 10.0.0.9): refused", CAUSE),
    FailedFrame("RuntimeError: out of memory"),
    StepFrame((TokenFrame(5, 42, "length"), TokenFrame(6, 41), TokenFrame(9, 0, "stop"))),
    StepFrame(()),
    HandoffFrame(6, (1, 2, 3)),
    ErrorFrame(6, "KV formats differ"),
    AliveFrame(),
    ExchangedFrame("hexgen/1/2/x/", True),
    ExchangedFrame("hexgen/1/2/x/", False, "the exchange group could not arrive", None),
]


def test_the_examples_read_back_from_their_wire_form() -> None:
    for frame in TO_WORKER:
        assert frame_to_worker(frame.to_wire()) == frame
    for answer in FROM_WORKER:
        assert frame_from_worker(answer.to_wire()) == answer


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout_rank": 1}, "'layout_rank' is not a rank"),
        ({"layout_rank": None}, "come together"),
        ({"bridge": ""}, "come together"),
        ({"bridge": "b" * 300}, "at most 256"),
    ],
)
def test_a_bridged_rank_names_its_place_in_its_replica(change: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedFrame, match=message):
        frame_to_worker(TO_WORKER[2].to_wire() | change)


def check_to_worker(raw: Any) -> None:
    show(raw)
    frame = outcome(lambda: frame_to_worker(raw), MalformedFrame)
    if frame is REFUSED:
        return
    assert frame_to_worker(frame.to_wire()) == frame
    encode_frame(frame.to_wire())
    if isinstance(frame, ConfigureFrame):  # what the worker builds from it
        spec_from(frame.replica)
        if frame.exchange is not None:
            exchange_from(frame.exchange)
    elif isinstance(frame, ExchangeFrame):
        exchange_from(frame.exchange)
    elif isinstance(frame, GenerateFrame | ImportFrame):
        assert frame.tokens and all(type(t) is int and t >= 0 for t in frame.tokens)
        if frame.sampling.seed is not None:
            _mix_seed(frame.sampling.seed, len(frame.tokens))


@FUZZ
@given(fuzzed(*(f.to_wire() for f in TO_WORKER)))
@example({"op": "generate", "id": 1, "tokens": [1], "sampling": {"max_tokens": 2, "stop_token_ids": [1.5]}})
@example({"op": "generate", "id": 1, "tokens": [1], "sampling": {"max_tokens": 2, "temperature": 10**400}})
@example({"op": "import", "id": 1, "tokens": [1], "sampling": {"max_tokens": 2, "seed": "x"}, "src": 0})
@example(TO_WORKER[1].to_wire() | {"secret": "zz" * 32})
@example(TO_WORKER[0].to_wire() | {"replica": {"model_dir": "m", "layout": [[0, 4, 0]]}})
def test_frames_to_a_worker(raw: Any) -> None:
    check_to_worker(raw)


class Frames:
    """A worker's frames as the supervisor reads them, from memory."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames

    async def read(self) -> Any:
        return self.frames.pop(0) if self.frames else None


def check_from_worker(raw: Any) -> None:
    show(raw)
    frame = outcome(lambda: frame_from_worker(raw), MalformedFrame)
    if frame is not REFUSED:
        assert frame_from_worker(frame.to_wire()) == frame
        encode_frame(frame.to_wire())
        if isinstance(frame, ProgressFrame):
            StartDeadline(0.0, 10.0, 100.0).progress(1.0, frame.done, frame.total)
    # a ready worker's supervisor routes it, or fails the worker with a one-line reason, never anything else
    replica = Replica(0, 0, "colocated", ((0, 5, 1),), 0, (("me", 0),))
    supervisor = Supervisor("me", "model")
    try:
        run_now(supervisor._read_events(LocalWorker(replica, 0, 1), Frames([raw])))
    except RuntimeError as error:  # WorkerFailed too: a group that did not form (not here: no deployment)
        assert frame is REFUSED and not isinstance(error, WorkerFailed)
        assert_clear(error)


@FUZZ
@given(fuzzed(*(f.to_wire() for f in FROM_WORKER)))
@example({"op": "progress", "done": -1, "total": 5})
@example({"op": "failed", "error": "x", "cause": {"world": "replica world", "stage": "connect", "remote": "x"}})
@example({"op": "step", "ids": [1], "tokens": [True], "finished": [None]})
@example({"op": "step", "ids": [1, 2], "tokens": [3], "finished": [None]})
@example({"op": "step", "ids": [-1], "tokens": [3], "finished": [""]})
@example({"op": "token", "id": 1, "token": 2})
@example({"op": "exchange", "prefix": "p", "formed": "yes"})
def test_frames_from_a_worker(raw: Any) -> None:
    check_from_worker(raw)


KV_PARTS = [
    KvPart("hexgen/1/2/exchange/", 0, 3, 7, 0, 0, 1, "bfloat16", (2, 1, 2, 4, 2, 8), bytes(range(256)) * 2),
    KvPart("hexgen/4/9/exchange/", 5, 1, 1 << 30, 12, 0, 1, "float32", (2, 3, 0, 16, 1, 64), b""),
]


@FUZZ
@given(fuzzed(*(p.to_wire() for p in KV_PARTS)))
@example(KV_PARTS[0].to_wire() | {"shape": [1 << 31, 1 << 31, 4]})
@example(KV_PARTS[0].to_wire() | {"part": 1, "parts": 2})
@example(KV_PARTS[0].to_wire() | {"dtype": "complex64"})
@example(KV_PARTS[0].to_wire() | {"data": "x" * 512})
def test_kv_parts(raw: Any) -> None:
    show(raw)
    part = outcome(lambda: KvPart.from_wire(raw), MalformedFrame)
    if part is REFUSED:
        return
    assert KvPart.from_wire(part.to_wire()) == part
    assert part.part < part.parts and len(part.data) <= PART_BYTES
    assert part.part * PART_BYTES + len(part.data) <= part.message_bytes
    encode_frame(part.to_wire())
    assert KvPart.from_frame(part.frame_head() + bytes(part.data)) == part  # the frame every hop passes on
    assert KvPart.from_head(part.frame_head(), memoryview(bytes(part.data))) == part  # a worker's link's records


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 3), st.binary(max_size=64))
@example(b"\x80", 0, b"")  # an empty map as the header
@example(KV_PARTS[0].frame_head()[4:], 0, KV_PARTS[0].data[:-1])  # a byte short
@example(KV_PARTS[0].frame_head()[4:], 2, bytes(KV_PARTS[0].data))  # the length prefix off by two
@example(msgpack.packb(KV_PARTS[0].to_wire()), 0, b"")  # the old layout: data inside the header
@example(msgpack.packb({"lost": "p/", "messages": [[0, 1, 2, 3]]}), 0, b"")  # a notice, for a worker only
@example(msgpack.packb({"lost": "p/", "messages": [[0, 1, 2]] * 40}), 0, b"")
@example(msgpack.packb({"ended": ["p/", 0, 1]}), 0, b"")  # a link's end, from a worker only
@example(msgpack.packb({"ended": ["p/", 0, 1]}), 0, b"x")
def test_kv_frames(head: bytes, skew: int, data: bytes) -> None:
    """Any bytes as a KV frame: a part whose frame is exactly those bytes, or ``MalformedFrame``; from its
    daemon, a worker reads a part, a lost notice or ``MalformedFrame``, and a daemon from its worker a part, a
    link's end or ``MalformedFrame``; read as a head and its data apart (a
    worker's link), the same part or ``MalformedFrame``."""
    frame = (len(head) + len(data) + skew).to_bytes(4, "big") + head + data
    show(frame)
    read = outcome(lambda: from_daemon(frame), MalformedFrame)
    assert read is REFUSED or isinstance(read, KvPart) or from_daemon(read.frame()) == read
    sent = outcome(lambda: from_worker(frame), MalformedFrame)
    assert sent is REFUSED or isinstance(sent, KvPart) or from_worker(sent.frame()) == sent
    part = outcome(lambda: KvPart.from_frame(frame), MalformedFrame)
    apart = outcome(lambda: KvPart.from_head(frame[: len(frame) - len(data)], memoryview(data)), MalformedFrame)
    assert apart is REFUSED or apart == part  # a head and its data apart: never a part the whole frame is not
    if part is REFUSED:
        return
    assert skew == 0 and bytes(part.data) == frame[len(frame) - len(part.data) :]
    assert KvPart.from_frame(part.frame_head() + bytes(part.data)) == part
    for mangled in (frame[:-1], frame + b"x"):  # a frame whose length prefix does not fit it
        with pytest.raises(MalformedFrame):
            KvPart.from_frame(mangled)
