"""``hexgen-client``: send a prompt to a swarm and stream the text back as it arrives, or chat with it.

    hexgen-client generate PROMPT --peer MULTIADDR [--max-tokens N] [--temperature T] [--top-p P] [--seed S]
                                  [--stop TEXT]... [--json] [--timeout S]
    hexgen-client chat --peer MULTIADDR [--system TEXT] [sampling flags]

``chat`` reads one user message per line from stdin (``/reset`` forgets the conversation, ``/exit`` or end of
input quits) and streams each reply; the entry daemon renders the conversation with the model's chat template.

``--peer`` defaults to ``$HEXGEN_PEER``: the multiaddr of any daemon of the swarm (the one it prints at start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hexgen.daemon.logs import quiet_libraries

PROG = "hexgen-client"


if TYPE_CHECKING:
    from hexgen.daemon.generate_protocol import GenerateDone


@dataclass
class Reply:
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first: float | None = None  # when the first token arrived (perf_counter)
    done: GenerateDone | None = None


class ClientError(Exception):
    """The request could not be served; the message is the one-line reason."""


class Refused(ClientError):
    """The swarm answered this request with an error (the connection itself is fine)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # the daemon's kind of refusal: "context_full" when the prompt leaves no room


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Talk to a hexgen swarm.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming the text", description=__doc__)
    gen.add_argument("prompt")
    _add_request_flags(gen, max_tokens=64)
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, timings, groups")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="an interactive conversation (one message per line)", description=__doc__)
    chat.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    _add_request_flags(chat, max_tokens=None)
    chat.set_defaults(func=cmd_chat)
    return parser


def _add_request_flags(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    parser.add_argument("--peer", default=os.environ.get("HEXGEN_PEER"), metavar="MULTIADDR", help="a daemon to ask")
    default = f"default {max_tokens}" if max_tokens else "default: what the model's context leaves"
    parser.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N", help=f"tokens per reply ({default})")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeat)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="give up on a reply after S seconds")


def _base_request(args: argparse.Namespace) -> dict[str, Any]:
    if not args.peer:
        raise ClientError("no swarm to ask: give --peer MULTIADDR or set HEXGEN_PEER")
    if args.timeout <= 0:
        raise ClientError("--timeout must be positive")
    request: dict[str, Any] = {"temperature": args.temperature, "top_p": args.top_p}
    if args.max_tokens is not None:
        request["max_tokens"] = args.max_tokens
    if args.seed is not None:
        request["seed"] = args.seed
    if args.stop:
        request["stop"] = args.stop
    return request


def cmd_generate(args: argparse.Namespace) -> int:
    import trio

    request = _base_request(args) | {"prompt": args.prompt}
    result = trio.run(_generate, args.peer, request, args.timeout, None if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    else:
        print()
    return 0


async def _generate(peer: str, request: dict[str, Any], timeout_s: float, out: Any) -> dict[str, Any]:
    from hexgen.daemon.host import HostConfig, new_identity, open_host

    started = time.perf_counter()
    reply = Reply()
    failure: ClientError | None = None  # raised outside the host's nurseries, not inside their exception groups
    async with open_host(new_identity(), HostConfig(listen_host="127.0.0.1", port=0)) as host:
        try:
            peer_id = await _connect(host, peer, timeout_s)
            await _stream(host, peer_id, peer, request, timeout_s, out, reply)
        except ClientError as exc:
            failure = exc
    if failure is not None:
        raise failure
    done, first = reply.done, reply.first
    if done is None:
        raise ClientError(f"{peer} ended the stream without finishing (is it serving a model?)")
    finished = time.perf_counter()
    return {
        "text": "".join(reply.text),
        "tokens": reply.tokens,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "ttft_ms": None if first is None else round(1000 * (first - started), 2),
        "total_ms": round(1000 * (finished - started), 2),
        "served_by": [dict(s) for s in done.served_by],
    }


async def _connect(host: Any, peer: str, timeout_s: float) -> str:
    import trio

    from hexgen.daemon.host import DialError

    try:
        with trio.fail_after(min(timeout_s, 15.0)):
            return str(await host.connect(peer))
    except trio.TooSlowError:
        raise ClientError(f"no answer from {peer}") from None
    except DialError as exc:
        raise ClientError(f"cannot reach {peer}: {' '.join(str(exc).split()) or type(exc).__name__}") from None


async def _stream(
    host: Any,
    peer_id: str,
    peer: str,
    request: dict[str, Any],
    timeout_s: float,
    out: Any,
    reply: Reply,
) -> None:
    import trio

    from hexgen.daemon.generate_protocol import GenerateDone, GenerateError, GenerateToken, replies

    try:
        with trio.fail_after(timeout_s):
            async for frame in replies(host, peer_id, request):
                if isinstance(frame, GenerateError):
                    raise Refused(frame.error, frame.code)
                if isinstance(frame, GenerateToken):
                    reply.tokens.append(frame.token)
                    reply.first = reply.first or time.perf_counter()
                if frame.text:
                    reply.text.append(frame.text)
                    if out is not None:
                        out.write(frame.text)
                        out.flush()
                if isinstance(frame, GenerateDone):
                    reply.done = frame
    except trio.TooSlowError:
        raise ClientError(f"no complete answer within {timeout_s:g} s") from None
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever broke the stream (peer, transport, framing), say it in one line
        raise ClientError(f"the stream from {peer} broke: {' '.join(str(exc).split())}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    """Exit status 0 when every message got its reply, 1 when the swarm refused some, 2 on a broken link."""
    import trio

    # "fit": the daemon caps each reply by the context the conversation leaves (the history grows each turn)
    request = _base_request(args) | {"fit": True}
    opening = [{"role": "system", "content": args.system}] if args.system else []
    refused = trio.run(_chat, args.peer, request, opening, args.timeout, sys.stdin.isatty())
    return 1 if refused else 0


def _note(text: str) -> None:
    """What the client did on its own (dropped history, a capped reply): stderr, so stdout is the replies."""
    print(f"({text})", file=sys.stderr, flush=True)


async def _chat(peer: str, request: dict[str, Any], opening: list[dict[str, str]], timeout_s: float, tty: bool) -> int:
    """The conversation loop: a line in, a streamed reply out, both kept in the history sent each turn.
    Returns how many messages the swarm refused."""
    import trio

    from hexgen.daemon.host import HostConfig, new_identity, open_host

    failure: ClientError | None = None
    refused = 0
    async with (
        contextlib.aclosing(_lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))) as lines,
        open_host(new_identity(), HostConfig(listen_host="127.0.0.1", port=0)) as host,
    ):
        try:
            peer_id = await _connect(host, peer, timeout_s)
            messages = list(opening)
            while True:
                if tty:
                    print("you> ", end="", flush=True)
                line = await anext(lines, None)
                if line is None or line.strip() in ("/exit", "/quit"):
                    break
                if line.strip() == "/reset":
                    messages = list(opening)
                    print("(the conversation starts over)", flush=True)
                    continue
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line.strip()})
                try:
                    reply = await _reply(host, peer_id, peer, request, messages, len(opening), timeout_s)
                except Refused as exc:
                    messages.pop()
                    refused += 1
                    print(f"{PROG}: {_refusal_text(exc)}", file=sys.stderr, flush=True)
                    continue
                print(flush=True)
                if reply.done is not None:
                    _say_if_capped(reply.done, request.get("max_tokens"))
                messages.append({"role": "assistant", "content": "".join(reply.text)})
        except ClientError as exc:
            failure = exc
    if failure is not None:
        raise failure
    return refused


async def _reply(
    host: Any,
    peer_id: str,
    peer: str,
    request: dict[str, Any],
    messages: list[dict[str, str]],
    keep: int,
    timeout_s: float,
) -> Reply:
    """Stream the reply to ``messages``; while the conversation leaves the model no room for one, drop its
    oldest exchange (the first ``keep`` messages, the system's, stay) and ask again."""
    while True:
        reply = Reply()
        try:
            await _stream(host, peer_id, peer, request | {"messages": messages}, timeout_s, sys.stdout, reply)
            return reply
        except Refused as exc:
            if exc.code != "context_full" or len(messages) <= keep + 1:
                raise
        dropped = 2 if len(messages) > keep + 2 and messages[keep + 1]["role"] == "assistant" else 1
        del messages[keep : keep + dropped]
        _note(
            f"dropped the oldest {dropped} message{'s' * (dropped > 1)}: the conversation outgrew the model's context"
        )


def _refusal_text(exc: Refused) -> str:
    if exc.code == "context_full":
        return f"this message does not fit the model's context, even alone: {exc}"
    return str(exc)


def _say_if_capped(done: GenerateDone, asked: int | None) -> None:
    """Tell the user when the context, not the reply or --max-tokens, ended the reply."""
    granted, context = done.max_tokens, done.context
    if done.finish_reason != "length":
        return
    if asked is None or granted < asked:
        _note(f"the reply stopped at {granted} tokens: the conversation fills the model's context of {context}")


async def _lines(stream: Any) -> Any:
    """The text lines of a byte stream (the last one may lack its newline), as an async iterator."""
    pending = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        status: int = args.func(args)
        return status
    except ClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
