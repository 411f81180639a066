"""Coverage-guided fuzzing of the network-facing parsers with atheris (libFuzzer), beside tests/test_fuzz.py.

The hypothesis suite draws 10,000 inputs per parser from strategies; this script lets libFuzzer mutate bytes
for as long as asked, guided by the line coverage of the ``hexgen`` package, and checks the same properties
(the ``check_*`` functions of ``hexgen.testing.fuzz*``, which tests/test_fuzz.py runs under hypothesis): a parser returns a valid result or raises its
documented error with a one-line message. A target other than frames, pinned and http reads the bytes as one
msgpack value (bytes that are not msgpack are skipped; the corpus starts from the suite's valid examples), so
libFuzzer explores values the wire can carry. A property that fails stops the run with the input saved as
``crash-*`` in the working directory (replay it: ``python bench/fuzz_atheris.py TARGET -- crash-...``). The corpus
of each target lives in the system's temporary folder (``hexgen-fuzz-TARGET``), so a run goes on from the last.

atheris is not a dependency of hexgen (it ships wheels for some Python versions only): ``pip install atheris``.
Needs ../shared/models/stories260K for the generate and http targets.

    python bench/fuzz_atheris.py all --seconds 60       # every target for 60 s, one process each
    python bench/fuzz_atheris.py envelopes --seconds 300
    python bench/fuzz_atheris.py plans -- -max_len=4096  # anything after -- goes to libFuzzer
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["hexgen"]):
    import msgpack

    from hexgen.daemon.wire import FrameError, decode_payload, encode_frame
    from hexgen.engine.tokenizer import Tokenizer
    from hexgen.testing import fuzz_messages as messages
    from hexgen.testing import fuzz_requests as requests
    from hexgen.testing.fuzz import FrameCase, check_frames

TARGETS = ("frames", "envelopes", "adverts", "plans", "pinned", "gossip", "generate", "replica", "http")


def _msgpack_value(data: bytes) -> tuple[bool, Any]:
    """(True, the value) when ``data`` is one acceptable msgpack value, else (False, None)."""
    try:
        return True, decode_payload(data)
    except FrameError:
        return False, None


def _on_value(check: Callable[[Any], None]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        ok, value = _msgpack_value(data)
        if ok:
            check(value)

    return run


def _packed(*values: Any) -> list[bytes]:
    return [msgpack.packb(v, use_bin_type=True) for v in values]


def _frames(data: bytes) -> None:
    check_frames(FrameCase(data, (1 + data[:1][0] % 7,) if data else (1,)))


def _gossip(data: bytes) -> None:
    kinds = ("advert", "lease", "plan", "leave", "failure")
    ok, value = _msgpack_value(data[1:])
    if ok and data:
        messages.check_gossip((kinds[data[0] % len(kinds)], value))


def _pinned(data: bytes) -> None:
    messages.check_pinned((data.decode("utf-8", "replace"), None))


# Targets that need no model: name -> (the function libFuzzer calls, the seed corpus).
MESSAGE_TARGETS: dict[str, Callable[[], tuple[Callable[[bytes], None], list[bytes]]]] = {
    "frames": lambda: (_frames, [encode_frame(messages.ADVERT), encode_frame(requests.GENERATE_REQUESTS[1])]),
    "envelopes": lambda: (messages.check_envelope, _packed(messages.SEALED_ADVERT)),
    "adverts": lambda: (_on_value(messages.check_advert), _packed(messages.ADVERT)),
    "plans": lambda: (_on_value(messages.check_plan_body), _packed(messages.PLAN_BODY)),
    "gossip": lambda: (_gossip, [b"\x00" + p for p in _packed(messages.ADVERT | {"host": "bob"})]),
    "pinned": lambda: (_pinned, [messages.PINNED.encode()]),
    "replica": lambda: (_on_value(requests.check_replica_request), _packed(*requests.REPLICA_REQUESTS)),
}


def _target(name: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    """The function libFuzzer calls for ``name``, and the seed corpus (the suite's valid examples)."""
    if name in MESSAGE_TARGETS:
        return MESSAGE_TARGETS[name]()
    tokenizer = Tokenizer.from_dir(requests.STORIES)
    if name == "generate":
        return (
            _on_value(lambda request: requests.check_generate(tokenizer, request)),
            _packed(*requests.GENERATE_REQUESTS),
        )
    if name == "http":
        gateway = requests.stub_gateway(tokenizer, serving=False)
        return (
            lambda data: requests.check_http_body(gateway, bool(data[:1]) and data[0] % 2 == 1, data[1:], None),
            [b"\x00" + requests.json_body(requests.COMPLETION_BODY), b"\x01" + requests.json_body(requests.CHAT_BODY)],
        )
    raise SystemExit(f"unknown target {name!r}; one of {', '.join(TARGETS)} or all")


def fuzz(name: str, seconds: int, libfuzzer_args: list[str]) -> None:
    """Run one target under libFuzzer for ``seconds`` (or replay the crash files given among its args)."""
    test_one_input, seeds = _target(name)
    corpus = Path(tempfile.gettempdir()) / f"hexgen-fuzz-{name}"  # kept: the next run starts from what this found
    corpus.mkdir(exist_ok=True)
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(seed)
    replay = [a for a in libfuzzer_args if not a.startswith("-")]
    args = (
        [sys.argv[0], *libfuzzer_args]
        if replay
        else [sys.argv[0], f"-max_total_time={seconds}", *libfuzzer_args, str(corpus)]
    )
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz each target (default 60)")
    parser.add_argument("libfuzzer", nargs="*", help="after --: libFuzzer flags, or crash files to replay")
    options = parser.parse_args()
    if options.target != "all":
        fuzz(options.target, options.seconds, options.libfuzzer)
        return 0
    failed = []
    for name in TARGETS:
        print(f"== {name}: {options.seconds} s", flush=True)
        command = [sys.executable, __file__, name, "--seconds", str(options.seconds)]
        command += ["--", *options.libfuzzer] if options.libfuzzer else []
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    print(
        f"== done: {len(TARGETS) - len(failed)} of {len(TARGETS)} targets held"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
