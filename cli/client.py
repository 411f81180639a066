"""``hexgen-client``: send a prompt to a swarm and stream the text back as it arrives.

    hexgen-client generate PROMPT --peer MULTIADDR [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
                                  [--stop TEXT]... [--json] [--timeout S]

``--peer`` defaults to ``$HEXGEN_PEER``: the multiaddr of any daemon of the swarm (the one it prints at start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROG = "hexgen-client"


@dataclass
class Reply:
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first: float | None = None  # when the first token arrived (perf_counter)
    done: dict[str, Any] = field(default_factory=dict)


class ClientError(Exception):
    """The request could not be served; the message is the one-line reason."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Talk to a hexgen swarm.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming the text", description=__doc__)
    gen.add_argument("prompt")
    gen.add_argument("--peer", default=os.environ.get("HEXGEN_PEER"), metavar="MULTIADDR", help="a daemon to ask")
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, metavar="S", help="sampling seed (same seed, same text)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, timings, groups")
    gen.add_argument("--timeout", type=float, default=120.0, metavar="S", help="give up after S seconds")
    gen.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    import trio

    if not args.peer:
        raise ClientError("no swarm to ask: give --peer MULTIADDR or set HEXGEN_PEER")
    if args.timeout <= 0:
        raise ClientError("--timeout must be positive")
    request: dict[str, Any] = {
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    if args.seed is not None:
        request["seed"] = args.seed
    if args.stop:
        request["stop"] = args.stop
    result = trio.run(_generate, args.peer, request, args.timeout, None if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    else:
        print()
    return 0


async def _generate(peer: str, request: dict[str, Any], timeout: float, out: Any) -> dict[str, Any]:
    from hexgen.daemon.host import HostConfig, new_identity, open_host

    started = time.perf_counter()
    reply = Reply()
    failure: ClientError | None = None  # raised outside the host's nurseries, not inside their exception groups
    async with open_host(new_identity(), HostConfig(listen_host="127.0.0.1", port=0)) as host:
        try:
            await _stream(host, peer, request, timeout, out, reply)
        except ClientError as exc:
            failure = exc
    if failure is not None:
        raise failure
    done, first = reply.done, reply.first
    if not done:
        raise ClientError(f"{peer} ended the stream without finishing (is it serving a model?)")
    finished = time.perf_counter()
    return {
        "text": "".join(reply.text),
        "tokens": reply.tokens,
        "finish_reason": done.get("finish_reason"),
        "prompt_tokens": done.get("prompt_tokens"),
        "completion_tokens": done.get("completion_tokens"),
        "ttft_ms": None if first is None else round(1000 * (first - started), 2),
        "total_ms": round(1000 * (finished - started), 2),
        "served_by": done.get("served_by", []),
    }


async def _stream(
    host: Any,
    peer: str,
    request: dict[str, Any],
    timeout: float,
    out: Any,
    reply: Reply,
) -> None:
    import trio

    from hexgen.daemon.router import generate

    try:
        with trio.fail_after(min(timeout, 15.0)):
            peer_id = await host.connect(peer)
    except trio.TooSlowError:
        raise ClientError(f"no answer from {peer}") from None
    except Exception as exc:
        raise ClientError(f"cannot reach {peer}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    try:
        with trio.fail_after(timeout):
            async for frame in generate(host, peer_id, request):
                if "error" in frame:
                    raise ClientError(str(frame["error"]))
                if "token" in frame:
                    reply.tokens.append(frame["token"])
                    reply.first = reply.first or time.perf_counter()
                if frame.get("text"):
                    reply.text.append(frame["text"])
                    if out is not None:
                        out.write(frame["text"])
                        out.flush()
                if frame.get("done"):
                    reply.done = frame
    except trio.TooSlowError:
        raise ClientError(f"no complete answer within {timeout:g} s") from None
    except ClientError:
        raise
    except Exception as exc:
        raise ClientError(f"the stream from {peer} broke: {' '.join(str(exc).split())}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
