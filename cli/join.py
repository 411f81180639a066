"""``hexgen-node join``: flags (over ``HEXGEN_*`` variables over a ``--config`` TOML file), their validation,
and the hand-off to the daemon process entry."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hexgen.cli.settings import (
    SettingsError,
    add_quantize_argument,
    load_config_file,
    make_layered,
    quantize_scheme,
    resolve,
)
from hexgen.coordinator.specs import resolve_model
from hexgen.daemon.logs import LEVELS

if TYPE_CHECKING:
    from hexgen.coordinator.pinned import PinnedGroup
    from hexgen.daemon.config import NodeConfig
    from hexgen.daemon.run import JoinOptions


class JoinError(Exception):
    """A join flag that cannot work; the message is the one-line reason."""


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise JoinError(f"--listen {value!r}: expected HOST:PORT, for example 0.0.0.0:4001 or 127.0.0.1:0")
    return host, int(port)


def _bootstrap(addr: str, flag: str = "--bootstrap") -> str:
    from hexgen.daemon.host import AddressError, peer_of_address

    try:
        peer_of_address(addr)
    except AddressError:
        raise JoinError(f"{flag} {addr!r}: expected a multiaddr ending in /p2p/PEER_ID") from None
    return addr


COMMANDS = (
    (
        "join",
        "run this host's daemon and join the swarm",
        "Start the hexgen daemon: advertise this host's GPUs, find peers, take part in the "
        "coordinator election and follow the swarm's plan.",
    ),
    (
        "relay",
        "run a circuit relay for the swarm's daemons that cannot be dialled (behind NAT)",
        "Start a daemon that offers no GPUs and relays (circuit relay v2) for the swarm's members: a daemon "
        "behind NAT reserves a slot with --relay-peer and is dialled through it. It also splices the TCP "
        "connections that carry KV hand-offs between homes (--splice-port). Run it on a host others can "
        "dial (a public address or a forwarded port). Takes join's options.",
    ),
)
LAYERING = (
    " Stops cleanly on SIGINT or SIGTERM. Every option "
    "can also come from a HEXGEN_<OPTION> environment variable (HEXGEN_MODEL, HEXGEN_BOOTSTRAP='A,B', "
    "HEXGEN_NO_CALIBRATE=1, ...) or a key of the --config TOML file (model = '...', bootstrap = [...]); "
    "flags win over the environment, which wins over the file."
)


def add_join_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``join`` and ``relay`` (join's options, relaying and without GPUs)."""
    for name, summary, description in COMMANDS:
        parser = sub.add_parser(name, help=summary, description=description + LAYERING)
        _add_join_arguments(parser)
        parser.set_defaults(func=cmd_join, relay_only=name == "relay")
        make_layered(parser)


def _add_join_arguments(join: argparse.ArgumentParser) -> None:
    join.add_argument("--config", metavar="FILE", help="TOML file of join options (or HEXGEN_CONFIG)")
    join.add_argument("--bootstrap", action="append", default=[], metavar="ADDR", help="a peer's multiaddr (repeat)")
    join.add_argument(
        "--listen", default="0.0.0.0:4001", metavar="HOST:PORT", help="listen address (default 0.0.0.0:4001)"
    )
    join.add_argument(
        "--advertise",
        default="",
        metavar="HOST",
        help="the IP or DNS name other hosts reach this one at, when --listen's is not it (NAT, several interfaces)",
    )
    join.add_argument(
        "--model",
        default="llama-2-7b",
        metavar="PATH|ORG/NAME[@REV]|NAME",
        help="the checkpoint to serve: a directory, or a Hugging Face Hub id fetched once into the Hub cache; "
        "or a preset name to plan for only (default llama-2-7b)",
    )
    add_quantize_argument(
        join, "how every replica loads the weights while this node coordinates (the coordinator's choice holds)"
    )
    join.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="TOKENS",
        help="prompt tokens one engine step prefills, so a long prompt does not stall the decode batch "
        "(default: 512 where replicas decode, 2048 on prefill replicas; 0: whole prompts)",
    )
    join.add_argument(
        "--pin-plan", metavar="FILE", help="serve this TOML layout instead of the planner's while its hosts are present"
    )
    join.add_argument("--key-file", metavar="PATH", help="node key (default: $XDG_DATA_HOME/hexgen/node.key)")
    join.add_argument("--swarm-cert", metavar="FILE", help="membership certificate of a private swarm")
    join.add_argument("--simulate-gpu", metavar="TYPE[xN]", help="advertise simulated GPUs, e.g. H100x2")
    join.add_argument("--host-name", default="", metavar="NAME", help="name shown to peers (default: hostname)")
    join.add_argument(
        "--peer-timeout",
        type=float,
        default=100.0,
        metavar="S",
        help="drop a peer without a direct connection after S seconds without an advert",
    )
    join.add_argument(
        "--http",
        type=int,
        metavar="PORT",
        help="serve the OpenAI-compatible API, /status and /metrics on this port (0: any free port)",
    )
    join.add_argument(
        "--http-host", default="127.0.0.1", metavar="HOST", help="address of the HTTP port (default 127.0.0.1)"
    )
    join.add_argument("--api-key", metavar="KEY", help="require this bearer token on the OpenAI API")
    join.add_argument("--no-calibrate", action="store_true", help="skip the GPU calibration at start-up")
    join.add_argument(
        "--probe-interval", type=float, default=30.0, metavar="S", help="seconds between link probe rounds"
    )
    join.add_argument(
        "--verify-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="re-run this fraction of the requests entering here on other replicas and compare the tokens; "
        "a peer outvoted two to one is flagged and planned without (default 0)",
    )
    join.add_argument(
        "--max-request-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="generate requests per second that one client peer may send over libp2p, with bursts of 5 s' worth; "
        "more are refused with the seconds to wait (default 0: no limit)",
    )
    join.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a request that no replica takes for this many seconds (no token yet, or none since the last) gets an "
        "error saying why (default 30)",
    )
    join.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a world's ranks have to connect once all arrived (default 5 on CPU, 60 with NCCL, whose "
        "communicator set-up across hosts takes longer)",
    )
    join.add_argument("--tamper-tokens", action="store_true", help=argparse.SUPPRESS)  # tests: a lying peer
    join.add_argument("--log-level", choices=LEVELS, default="info", help="log verbosity (default info)")
    join.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not announce this daemon on its LAN nor dial the daemons heard there (mDNS)",
    )
    join.add_argument(
        "--relay", action="store_true", help="relay for the swarm's members that cannot be dialled (circuit relay v2)"
    )
    join.add_argument(
        "--splice-port",
        type=int,
        default=0,
        metavar="PORT",
        help="with --relay: the TCP port KV hand-offs between daemons behind NAT are spliced on (default: any "
        "free port; open it in the relay host's firewall)",
    )
    join.add_argument(
        "--relay-peer",
        action="append",
        default=[],
        metavar="ADDR",
        help="a relay's multiaddr (repeat): this daemon reserves a slot there and is dialled through it; for a "
        "host behind NAT with no forwarded port",
    )


def layered_args(args: argparse.Namespace) -> None:
    """Fill the options not given as flags from HEXGEN_* variables and the config file."""
    path = args.config or os.environ.get("HEXGEN_CONFIG")
    try:
        config = load_config_file(path) if path else {}
        resolve(args, os.environ, config, f"config file {path}")
    except SettingsError as exc:
        raise JoinError(str(exc)) from None


def cmd_join(args: argparse.Namespace) -> int:
    from hexgen.coordinator.pinned import PinnedPlanError
    from hexgen.daemon.certificates import CertificateError
    from hexgen.daemon.connectivity import DuplicateKeyError
    from hexgen.daemon.hardware_profile import HardwareError
    from hexgen.daemon.host import ListenError
    from hexgen.daemon.http_api import GatewayError
    from hexgen.daemon.model_files import ModelFilesError
    from hexgen.daemon.private_files import IdentityError
    from hexgen.daemon.run import join
    from hexgen.engine.tokenizer import TokenizerError

    layered_args(args)
    try:
        options = join_options(args)
        try:
            return join(options)
        # a port cannot be served (in use, not permitted), or another daemon has this one's key
        except* (GatewayError, ListenError, DuplicateKeyError) as group:
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise JoinError(str(first)) from None
    except PinnedPlanError as exc:
        raise JoinError(f"--pin-plan {args.pin_plan}: {exc}") from None
    except (HardwareError, IdentityError, CertificateError, ModelFilesError, TokenizerError) as exc:
        raise JoinError(str(exc)) from None


def join_options(args: argparse.Namespace) -> JoinOptions:
    """The daemon's options from checked flags. Raises ``JoinError`` for a flag that cannot work, and the
    model, pinned-plan, hardware and identity modules' own errors for what they refuse."""
    from hexgen.daemon.config import ConfigError
    from hexgen.daemon.hardware import parse_simulate_gpu
    from hexgen.daemon.model_files import is_checkpoint_dir, model_fingerprint
    from hexgen.daemon.node_key import default_key_file
    from hexgen.daemon.run import JoinOptions
    from hexgen.engine.hub import local_model
    from hexgen.engine.tokenizer import Tokenizer

    host, port = _listen(args.listen)
    relay_peers = tuple(_bootstrap(a, "--relay-peer") for a in args.relay_peer)
    # a relay is also a way into the swarm
    bootstrap = tuple(dict.fromkeys([*(_bootstrap(a) for a in args.bootstrap), *relay_peers]))
    if args.relay_only:
        args.no_calibrate = True  # its GPUs are not offered
    if args.simulate_gpu:
        parse_simulate_gpu(args.simulate_gpu)
    if not args.peer_timeout > 0:  # checked first: the advert refresh below is derived from it
        raise JoinError("--peer-timeout must be positive")
    try:
        scheme = quantize_scheme(args.quantize)
    except SettingsError as exc:
        raise JoinError(str(exc)) from None
    model = local_model(args.model)  # after the checks that cost nothing: this one may download the model
    spec = dataclasses.replace(resolve_model(model), quantize=scheme)  # SpecError: a GPTQ/AWQ one takes no --quantize
    if is_checkpoint_dir(model):
        model_fingerprint(model)
        Tokenizer.from_dir(model)
    pinned = _pinned(args.pin_plan, spec.layers) if args.pin_plan else None
    try:
        node = _node_config(args, model, host, port, bootstrap, pinned, relay_peers)
    except ConfigError as exc:
        raise JoinError(exc.text(FLAGS.get(exc.setting, exc.setting), FLAGS | {"http_port": "--http PORT"})) from None
    return JoinOptions(
        key_file=Path(args.key_file).expanduser() if args.key_file else default_key_file(),
        node=node,
        simulate_gpu=args.simulate_gpu,
        swarm_cert=Path(args.swarm_cert).expanduser() if args.swarm_cert else None,
        calibrate=not args.no_calibrate,
        log_level=args.log_level,
    )


def _node_config(
    args: argparse.Namespace,
    model: str,
    host: str,
    port: int,
    bootstrap: tuple[str, ...],
    pinned: tuple[PinnedGroup, ...] | None,
    relay_peers: tuple[str, ...] = (),
) -> NodeConfig:
    """The node's settings from the flags, serving ``model`` (a Hub id already resolved to its snapshot
    directory); NodeConfig checks them (``ConfigError``)."""
    from hexgen.daemon.config import NodeConfig
    from hexgen.daemon.host import HostConfig

    return NodeConfig(
        model=model,
        host=HostConfig(listen_host=host, port=port, advertise_host=args.advertise),
        bootstrap=bootstrap,
        host_name=args.host_name,
        peer_timeout_s=args.peer_timeout,
        # an unchanged advert is re-sent at least twice per peer timeout
        advert_refresh_s=min(NodeConfig.advert_refresh_s, args.peer_timeout / 2),
        probe_interval_s=args.probe_interval,
        verify_fraction=args.verify_fraction,
        max_request_rate=args.max_request_rate,
        request_timeout_s=args.request_timeout,
        connect_timeout_s=args.connect_timeout,
        tamper_tokens=args.tamper_tokens,
        pinned=pinned,
        http_host=args.http_host,
        http_port=args.http,
        api_key=args.api_key,
        relay=args.relay or args.relay_only,
        relay_only=args.relay_only,
        relay_peers=relay_peers,
        splice_port=args.splice_port,
        mdns=not args.no_mdns,
        quantize=args.quantize,
        prefill_chunk=args.prefill_chunk,
    )


def _pinned(path: str, layers: int) -> tuple[PinnedGroup, ...]:
    """The ``--pin-plan`` file's plan for a model of ``layers`` layers (``PinnedPlanError`` if it has none)."""
    from hexgen.coordinator.pinned import parse_pinned

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise JoinError(f"--pin-plan {path}: {exc.strerror or exc}") from None
    return parse_pinned(text, layers)


# The flag of each setting NodeConfig checks, for its errors to name what the operator typed.
FLAGS = {
    "peer_timeout_s": "--peer-timeout",
    "probe_interval_s": "--probe-interval",
    "verify_fraction": "--verify-fraction",
    "max_request_rate": "--max-request-rate",
    "request_timeout_s": "--request-timeout",
    "connect_timeout_s": "--connect-timeout",
    "http_port": "--http",
    "api_key": "--api-key",
    "relay": "--relay",
    "relay_only": "hexgen-node relay",
    "relay_peers": "--relay-peer",
    "splice_port": "--splice-port",
    "quantize": "--quantize",
    "prefill_chunk": "--prefill-chunk",
}
