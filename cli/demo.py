"""``hexgen-node demo``: a local swarm on loopback plans, serves one streamed generation, and stops cleanly.

With no ``--model`` it serves a tiny Llama with random weights, built deterministically on first run under
the user's data directory (its text is nonsense, and the demo says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from hexgen.coordinator.plan import layer_range

DEFAULT_GPUS = ("H100", "A100", "L40", "A6000")
DEFAULT_PROMPT = "Once upon a time"
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
        help="a Hugging Face checkpoint directory, or a Hub id fetched once into the Hub cache (default: a tiny Llama)",
    )
    demo.add_argument(
        "--gpus",
        default=",".join(DEFAULT_GPUS),
        metavar="T,T,...",
        help=f"one daemon per simulated GPU type (default {','.join(DEFAULT_GPUS)})",
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default {DEFAULT_PROMPT!r})")
    demo.add_argument("--max-tokens", type=int, default=48, metavar="N", help="tokens to generate (default 48)")
    demo.set_defaults(func=cmd_demo)


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


def cmd_demo(args: argparse.Namespace) -> int:
    import trio

    from hexgen.daemon.private_files import default_data_dir

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not gpus:
        raise DemoError("--gpus needs at least one GPU type")
    if args.max_tokens < 1:
        raise DemoError("--max-tokens must be at least 1")
    from hexgen.daemon.hardware import parse_simulate_gpu
    from hexgen.daemon.hardware_profile import HardwareError

    try:
        for gpu in gpus:
            parse_simulate_gpu(gpu)
    except HardwareError as exc:
        raise DemoError(f"--gpus: {exc}") from None
    if args.model:
        from hexgen.engine.hub import local_model

        model, built_in = Path(local_model(args.model)).expanduser(), False
        if not (model / "config.json").is_file():
            raise DemoError(f"--model {args.model}: no config.json there (give a Hugging Face checkpoint directory)")
    else:
        model, built_in = tiny_model(default_data_dir() / "demo"), True
    for noisy in ("libp2p", "multiaddr", "async_service"):  # the client host's own teardown chatter
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        trio.run(_until_ctrl_c, run_demo, str(model), built_in, gpus, args.prompt, args.max_tokens, sys.stdout)
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


async def run_demo(model: str, built_in: bool, gpus: list[str], prompt: str, max_tokens: int, out: TextIO) -> None:

    from hexgen.daemon.host import HostConfig, new_identity, open_host
    from hexgen.daemon.local_swarm import LocalSwarmError, local_swarm

    def say(text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    say(f"hexgen demo: {len(gpus)} daemons on 127.0.0.1 with simulated {', '.join(gpus)} GPUs")
    if built_in:
        say(f"model: {model} (the built-in tiny Llama: random weights, so its text is nonsense)")
    else:
        say(f"model: {model}")
    with tempfile.TemporaryDirectory(prefix="hexgen-demo-") as tmp:
        try:
            async with local_swarm(Path(tmp), model, gpus, first_extra=["--http", "0"]) as daemons:
                for d in daemons:
                    say(f"  {d.name:<6} {d.peer_id}  {d.addr}")
                if daemons[0].http:
                    say(f"OpenAI API: {daemons[0].http}/v1 (on {daemons[0].name}, with /status and /metrics)")
                config = HostConfig(listen_host="127.0.0.1", port=0)
                async with open_host(new_identity(), config) as client:
                    for d in daemons:
                        await client.connect(d.addr)
                    view = await _wait_serving(client, daemons)
                    _show_plan(say, view, daemons)
                    await _generate(say, client, daemons, prompt, max_tokens)
                say("stopping the swarm ...", end=" ")
        except LocalSwarmError as exc:
            raise DemoError(str(exc)) from None
        say("done: every process stopped")


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
    say(f"plan: epoch {status['plan']['epoch']}, coordinator {coordinator}, ", end="")
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


async def _generate(say: Any, client: Any, daemons: list[Any], prompt: str, max_tokens: int) -> None:
    import trio

    from hexgen.daemon.generate_protocol import GenerateError, GenerateToken, replies

    entry = daemons[-1]
    say(f"generating {max_tokens} tokens through {entry.name}:")
    say(prompt, end="")
    started = time.perf_counter()
    first = last = None
    count = 0
    with trio.fail_after(120):
        async for frame in replies(client, entry.peer_id, {"prompt": prompt, "max_tokens": max_tokens}):
            if isinstance(frame, GenerateError):
                raise DemoError(f"the generation failed: {frame.error}")
            if isinstance(frame, GenerateToken):
                count += 1
                last = time.perf_counter()
                first = first or last
            if frame.text:
                say(frame.text, end="")
    say()
    if first is None or last is None:
        raise DemoError("the swarm returned no tokens")
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    say(f"TTFT {1000 * (first - started):.1f} ms, {count} tokens, {rate:.0f} tokens/s after the first")
