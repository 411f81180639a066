"""``hexgen-node demo``: a local swarm on loopback plans, serves a short streamed chat, and stops cleanly.

With no ``--model`` it serves DEMO_MODEL from the Hugging Face Hub (fetched once into the Hub cache, or taken
from it offline). Where neither the Hub nor the cache has it, it says why in one line and serves a tiny Llama
with random weights instead, built deterministically on first run under the user's data directory (its text
is nonsense, and the demo says so). A model with a chat template holds a chat; any other one continues a prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from hexgen.cli.settings import SettingsError, add_quantize_argument, quantize_scheme
from hexgen.coordinator.plan import layer_range
from hexgen.daemon.logs import quiet_libraries

DEFAULT_GPUS = ("H100", "A100", "L40", "A6000")
DEFAULT_PROMPT = "Once upon a time"
# Qwen2.5's 0.5 B chat model: the smallest instruct model of a family the engine runs (qwen2, tied embeddings)
# that answers sensibly; about 1 GB of bf16 safetensors, Apache-2.0, not gated
DEMO_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
CHAT = ("Hi! Who are you, in one sentence?", "What is a GPU good for? Answer briefly.")
HUB = "https://huggingface.co"
REACH_TIMEOUT_S = 3.0  # a Hub that does not accept a connection this soon is taken as unreachable
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 259,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
SERVING_TIMEOUT_S = 240.0


class DemoError(Exception):
    """The demo cannot go on; the message is the one-line reason."""


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a local swarm on loopback, serve one generation, stop",
        description="Start a swarm of daemons on this machine with simulated heterogeneous GPUs, wait for the "
        "plan, show it, stream one generation with its TTFT and tokens/s, and stop every process.",
    )
    demo.add_argument(
        "--model",
        metavar="PATH|ORG/NAME[@REV]",
        help="a Hugging Face checkpoint directory, or a Hub id fetched once into the Hub cache "
        f"(default: {DEMO_MODEL}, or a tiny Llama where neither the Hub nor its cache has it)",
    )
    demo.add_argument(
        "--gpus",
        default=",".join(DEFAULT_GPUS),
        metavar="T,T,...",
        help=f"one daemon per simulated GPU type (default {','.join(DEFAULT_GPUS)})",
    )
    demo.add_argument(
        "--prompt",
        help=f"the one message of the chat, or the prompt of a model without a chat template (default: a two-turn "
        f"chat, or {DEFAULT_PROMPT!r})",
    )
    demo.add_argument(
        "--max-tokens", type=int, default=48, metavar="N", help="tokens to generate per answer (default 48)"
    )
    add_quantize_argument(demo, "how the replicas load the weights")
    demo.set_defaults(func=cmd_demo)


@dataclass(frozen=True)
class DemoModel:
    """What the demo serves: a checkpoint directory, whether it is the built-in tiny Llama, and why it is
    when no model was named (the Hub model could not be had)."""

    path: Path
    built_in: bool
    why: str | None = None


def unreachable(endpoint: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """None when ``endpoint`` (an http(s) URL) accepts a TCP connection within ``timeout_s``; else why not,
    in a few words. O(one connection attempt)."""
    url = urlsplit(endpoint)
    if not url.hostname:
        return f"{endpoint!r} is not a URL"
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except (OSError, ValueError) as exc:  # ValueError: a port out of range
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def hub_model(env: Mapping[str, str]) -> tuple[Path | None, str | None]:
    """DEMO_MODEL's snapshot directory, fetched where the cache lacks it, and None; or None and why it cannot be
    had: ``HF_HUB_OFFLINE`` and not cached, the Hub unreachable (within REACH_TIMEOUT_S) and not cached, or the
    Hub's own refusal. The Hub is asked only when it answers at all. O(one connection, a download at most)."""
    from hexgen.engine.hub import HubError, HubSettings, local_model

    settings = HubSettings.from_env(env)
    endpoint = settings.endpoint or HUB
    down = None if settings.offline else unreachable(endpoint)
    try:
        return Path(local_model(DEMO_MODEL, env={**env, "HF_HUB_OFFLINE": "1"} if down else env)), None
    except HubError as exc:
        if down:
            return None, f"cannot reach {endpoint} ({down}) and the Hub cache does not hold {DEMO_MODEL}"
        return None, str(exc)


def choose_model(named: str | None, data_dir: Path, env: Mapping[str, str]) -> DemoModel:
    """The model named (a directory or a Hub id; DemoError when unusable), else DEMO_MODEL, else the built-in
    tiny Llama under ``data_dir`` with the reason DEMO_MODEL could not be had."""
    if named:
        from hexgen.engine.hub import local_model

        path = Path(local_model(named, env=env)).expanduser()
        if not (path / "config.json").is_file():
            raise DemoError(f"--model {named}: no config.json there (give a Hugging Face checkpoint directory)")
        return DemoModel(path, False)
    snapshot, why = hub_model(env)
    if snapshot is not None:
        return DemoModel(snapshot, False)
    return DemoModel(tiny_model(data_dir), True, why)


def tiny_model(root: Path) -> Path:
    """The built-in tiny Llama under ``root`` (random weights, seed 0), created on first use. Idempotent."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    path = root / "tiny-llama"
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    staging = root / f"tiny-llama.{time.time_ns()}"
    staging.mkdir(parents=True)
    c = TINY_CONFIG
    hidden, inter, heads, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    dim = hidden // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    tensors = {"model.embed_tokens.weight": rand(c["vocab_size"], hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": rand(heads * dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv * dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv * dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        }
    save_file(tensors, str(staging / "model.safetensors"))
    (staging / "config.json").write_text(json.dumps(c, indent=1))
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {t: 3 + i for i, t in enumerate(byte_tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(staging / "tokenizer.json"))
    (staging / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    if not (path / "model.safetensors").is_file():
        staging.rename(path)
    return path


def _check_flags(args: argparse.Namespace) -> list[str]:
    """The simulated GPU types; DemoError for a flag that cannot work."""
    from hexgen.daemon.hardware import parse_simulate_gpu
    from hexgen.daemon.hardware_profile import HardwareError

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not gpus:
        raise DemoError("--gpus needs at least one GPU type")
    if args.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    try:
        quantize_scheme(args.quantize)
        for gpu in gpus:
            parse_simulate_gpu(gpu)
    except SettingsError as exc:
        raise DemoError(str(exc)) from None
    except HardwareError as exc:
        raise DemoError(f"--gpus: {exc}") from None
    return gpus


def cmd_demo(args: argparse.Namespace) -> int:
    import trio

    from hexgen.daemon.private_files import default_data_dir

    gpus = _check_flags(args)
    model = choose_model(args.model, default_data_dir() / "demo", os.environ)
    quiet_libraries()
    talk = Talk(args.prompt, args.max_tokens, args.quantize)
    try:
        trio.run(_until_ctrl_c, run_demo, model, gpus, talk, sys.stdout)
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("\ninterrupted: the swarm was stopped, no process is left", file=sys.stderr)
        return 130
    return 0


async def _until_ctrl_c(main: Any, *args: Any) -> None:
    """Run ``main``; a Ctrl-C cancels it and raises KeyboardInterrupt here. trio would otherwise raise it in
    whichever task it interrupts, and a libp2p service task may swallow it (the demo then ran on)."""
    import signal

    import trio

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT) as signals:

            async def run_main() -> None:
                await main(*args)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_main)
            async for _ in signals:
                raise KeyboardInterrupt


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, possibly inside the exception groups of the nurseries it unwound."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


@dataclass(frozen=True)
class Talk:
    """What to ask: ``prompt`` (None: the CHAT turns, or DEFAULT_PROMPT for a model without a chat template),
    tokens per answer, and the weights' quantization."""

    prompt: str | None = None
    max_tokens: int = 48
    quantize: str = "none"

    def turns(self, chat: bool) -> Sequence[str]:
        if self.prompt is not None:
            return (self.prompt,)
        return CHAT if chat else (DEFAULT_PROMPT,)


def describe_model(model: DemoModel) -> str:
    """The demo's line about its model: which, and for the tiny Llama why (when it stands in for the Hub's)."""
    if not model.built_in:
        from hexgen.engine.hub import model_name

        return f"model: {model_name(str(model.path))} ({model.path})"
    text = f"model: {model.path} (the built-in tiny Llama: random weights, so its text is nonsense)"
    return text if model.why is None else f"{text}\nnot serving {DEMO_MODEL}: {model.why}"


async def run_demo(model: DemoModel, gpus: list[str], talk: Talk, out: TextIO) -> None:
    from hexgen.daemon.host import HostConfig, new_identity, open_host
    from hexgen.daemon.local_swarm import LocalSwarmError, local_swarm
    from hexgen.engine.tokenizer import Tokenizer

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    say(f"hexgen demo: {len(gpus)} daemons on 127.0.0.1 with simulated {', '.join(gpus)} GPUs")
    say(describe_model(model))
    chat = Tokenizer.from_dir(model.path).chat_template is not None
    with tempfile.TemporaryDirectory(prefix="hexgen-demo-") as tmp:
        try:
            extra = ["--quantize", talk.quantize]
            async with local_swarm(Path(tmp), str(model.path), gpus, extra=extra, first_extra=["--http", "0"]) as ds:
                for d in ds:
                    say(f"  {d.name:<6} {d.peer_id}  {d.addr}")
                if ds[0].http:
                    say(f"OpenAI API: {ds[0].http}/v1 (on {ds[0].name}, with /status and /metrics)")
                config = HostConfig(listen_host="127.0.0.1", port=0)
                async with open_host(new_identity(), config) as client:
                    for d in ds:
                        await client.connect(d.addr)
                    view = await _wait_serving(client, ds)
                    _show_plan(say, view, ds)
                    await _converse(say, client, ds[-1], talk, chat)
                say("stopping the swarm ...", end=" ")
        except LocalSwarmError as exc:
            raise DemoError(str(exc)) from None
        say("done: every process stopped")


async def _converse(say: Any, client: Any, entry: Any, talk: Talk, chat: bool) -> None:
    """Each turn through ``entry``: a chat keeps the conversation so far; a plain prompt is continued."""
    messages: list[dict[str, str]] = []
    for turn in talk.turns(chat):
        if chat:
            messages.append({"role": "user", "content": turn})
            say(f"you: {turn}")
            say(f"assistant ({talk.max_tokens} tokens at most, through {entry.name}): ", end="")
            answer = await _generate(say, client, entry, {"messages": messages, "max_tokens": talk.max_tokens})
            messages.append({"role": "assistant", "content": answer})
        else:
            say(f"generating {talk.max_tokens} tokens through {entry.name}:")
            say(turn, end="")
            await _generate(say, client, entry, {"prompt": turn, "max_tokens": talk.max_tokens})


async def _wait_serving(client: Any, daemons: list[Any]) -> dict[str, Any]:
    import trio

    from hexgen.daemon.rpc import query_status
    from hexgen.daemon.swarm_view import serving

    ids = {d.peer_id for d in daemons}
    view: dict[str, Any] = {}
    with trio.move_on_after(SERVING_TIMEOUT_S):
        while True:
            for d in daemons:
                try:
                    with trio.fail_after(5):
                        view[d.peer_id] = await query_status(client, d.peer_id)
                except Exception:  # noqa: BLE001 - a daemon that cannot answer yet is simply not serving yet
                    view[d.peer_id] = None
            if serving(view, ids):
                return view
            await trio.sleep(0.25)
    raise DemoError(f"the swarm did not serve within {SERVING_TIMEOUT_S:.0f} s; see the daemon logs")


def _show_plan(say: Any, view: dict[str, Any], daemons: list[Any]) -> None:
    status = next(iter(view.values()))
    body = status["plan"]["body"]
    plan, gpus = body["plan"], body["gpus"]
    names = {d.peer_id: d.name for d in daemons}
    coordinator = names.get(status["coordinator"], status["coordinator"])
    say(
        f"plan: epoch {status['plan']['epoch']}, coordinator {coordinator}, weights {body.get('quantize', 'none')}, ",
        end="",
    )
    say(f"predicted {plan['throughput_rps']:.0f} requests/s ({plan.get('bottleneck')} bound)")
    for group in plan["groups"]:
        where = ", ".join(
            "+".join(f"{names.get(gpus[str(g)][0], '?')}:{gpus[str(g)][1]}" for g in stage["gpus"])
            for stage in group["stages"]
        )
        layout = " | ".join(f"TP{len(s['gpus'])} {layer_range(*s['layers'])}" for s in group["stages"])
        say(f"  group {group['id']}  {group['role']:<9}  PP{len(group['stages'])}  {layout:<24}  on {where}")
    flows = ", ".join(
        f"{f['src'] if f['src'] in ('source', 'sink') else 'g' + str(f['src'])}->"
        f"{f['dst'] if f['dst'] in ('source', 'sink') else 'g' + str(f['dst'])} {f['rate']:.0f}"
        for f in plan["flows"]
    )
    say(f"  flows (requests/s): {flows}")


async def _generate(say: Any, client: Any, entry: Any, request: dict[str, Any]) -> str:
    """Stream one generation's text as it comes, then its TTFT and rate; returns the text."""
    import trio

    from hexgen.daemon.generate_protocol import GenerateError, GenerateToken, replies

    started = time.perf_counter()
    first = last = None
    count = 0
    text = []
    with trio.fail_after(120):
        async for frame in replies(client, entry.peer_id, request):
            if isinstance(frame, GenerateError):
                raise DemoError(f"the generation failed: {frame.error}")
            if isinstance(frame, GenerateToken):
                count += 1
                last = time.perf_counter()
                first = first or last
            if frame.text:
                text.append(frame.text)
                say(frame.text, end="")
    say()
    if first is None or last is None:
        raise DemoError("the swarm returned no tokens")
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    say(f"TTFT {1000 * (first - started):.1f} ms, {count} tokens, {rate:.0f} tokens/s after the first")
    return "".join(text)
