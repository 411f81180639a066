"""The ``hexgen-node`` command line: one subcommand per job (for now ``plan``, the offline planner).

``main(argv)`` returns the exit status: 0 on success, 2 on bad input (one ``hexgen-node: error: ...``
line on stderr, no traceback). Only the project's own input errors (and OSError where a file is read)
are turned into that line; anything else is a bug and surfaces with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hexgen.cli.demo import DemoError, add_demo_command
from hexgen.cli.format import BaselineResult, PlanReport, report_json, report_text
from hexgen.cli.join import JoinError, add_join_command
from hexgen.cli.settings import SettingsError, add_quantize_argument, quantize_scheme
from hexgen.cli.status import StatusError
from hexgen.cli.status_command import add_status_command
from hexgen.coordinator.cluster import Cluster, ClusterError, load_cluster_toml
from hexgen.coordinator.plan import Plan
from hexgen.coordinator.specs import ModelSpec, SpecError, resolve_model
from hexgen.coordinator.workload import WORKLOAD_KINDS, Workload, WorkloadError, load_trace, workload_from_trace
from hexgen.engine.hub import HubError

PROG = "hexgen-node"
# The shared data folder sits beside the repository root (a checkout or an editable install).
DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
# The online slice of the trace is the real mix of prompt and output lengths, so it is the fairest
# single workload to plan for when the operator does not name one.
DEFAULT_WORKLOAD = "online"
WORKLOAD_REQUESTS = 1000


class CLIError(Exception):
    """Bad input found by the command line itself; the message is the one-line reason."""


def load_cluster_file(path: str) -> Cluster:
    """Read and parse a cluster TOML file; the cluster is named after the file unless it names itself."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"cluster file {path} does not exist") from None
    except IsADirectoryError:
        raise CLIError(f"cluster file {path} is a directory") from None
    except UnicodeDecodeError:
        raise CLIError(f"cluster file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise CLIError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    try:
        return load_cluster_toml(text, name=file.stem)
    except ClusterError as exc:
        raise ClusterError(f"{path}: {exc}") from None


def workload_kind(name: str) -> str:
    """The canonical workload name (HPLD, HPHD, LPHD, LPLD, online), case-insensitively."""
    for kind in WORKLOAD_KINDS:
        if kind.lower() == name.strip().lower():
            return kind
    raise CLIError(f"unknown workload {name!r} (known: {', '.join(WORKLOAD_KINDS)})")


def load_workload(kind: str, trace: Path, seed: int, max_context: int) -> Workload:
    """``WORKLOAD_REQUESTS`` requests of ``kind`` sampled from the trace CSV, clipped to the model's context."""
    if not trace.is_file():
        raise CLIError(f"no trace file at {trace} (pass --trace PATH to the Azure LLM inference trace CSV)")
    return workload_from_trace(load_trace(trace), kind, count=WORKLOAD_REQUESTS, seed=seed, max_context=max_context)


def plan_model(name: str, quantize: str | None = None) -> ModelSpec:
    """The model to plan for, called ``name``: a preset, a checkpoint directory or its config.json, or a Hub id
    ``org/name[@revision]`` (of which only config.json is fetched); its linear weights quantized with
    ``quantize`` (engine.quant_bytes; None: full precision)."""
    from hexgen.engine.hub import local_model

    source = local_model(name, config_only=True)
    spec = dataclasses.replace(resolve_model(source), quantize=quantize)
    return spec if source == name else dataclasses.replace(spec, name=name)


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the cluster for the model and workload; print the plan beside the three baselines."""
    quantize = quantize_scheme(args.quantize)
    cluster = load_cluster_file(args.cluster)
    kind = workload_kind(args.workload)
    model = plan_model(args.model, quantize)
    workload = load_workload(kind, Path(args.trace), args.seed, model.max_context)

    from hexgen.coordinator import baselines, planner

    started = time.perf_counter()
    try:
        plan = planner.plan(cluster, model, workload, seed=args.seed)
    except planner.PlanError as exc:
        raise CLIError(f"{args.cluster}: {_one_line(exc)}") from None
    seconds = time.perf_counter() - started
    searches: dict[str, Callable[..., Plan]] = {
        "distserve": baselines.distserve,
        "hexgen": baselines.hexgen,
        "naive": baselines.naive,
    }
    results = []
    for name, search in searches.items():
        try:
            results.append(BaselineResult(name, search(cluster, model, workload, seed=args.seed), None))
        except planner.PlanError as exc:
            # A baseline that cannot place the model is a result worth showing, not an input error.
            results.append(BaselineResult(name, None, _one_line(exc)))
    report = PlanReport(cluster, model, workload, plan, tuple(results), seconds)
    print(json.dumps(report_json(report), indent=2, allow_nan=False) if args.json else report_text(report))
    return 0


# --- keys and private swarms: keygen, swarm-key, admit -------------------------------------------------
# The handlers import the key and certificate modules when they run: they load libp2p (about half a second), which
# the other subcommands should not pay for.

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
DEFAULT_CERT_VALIDITY = "365d"


def parse_duration(text: str) -> float | None:
    """Seconds in ``text`` ("3600", "90m", "12h", "30d", "2w"), or None for "never"; CLIError otherwise."""
    cleaned = text.strip().lower()
    if cleaned == "never":
        return None
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in DURATION_UNITS else (cleaned, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise CLIError(f"bad duration {text!r}: use a positive number with s, m, h, d or w (e.g. 30d), or never")
    return seconds


def _user_path(text: str | None, default: Callable[[], Path]) -> Path:
    """The path the user named (with ~ expanded), or ``default()`` when they named none."""
    return Path(text).expanduser() if text else default()


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create the node key file (mode 0600) and print the node's peer id."""
    from hexgen.daemon.node_key import create_key_file, default_key_file, load_key, peer_id_of
    from hexgen.daemon.private_files import IdentityError, KeyFileExists

    path = _user_path(args.key_file, default_key_file)
    try:
        key_pair = create_key_file(path, force=args.force)
    except KeyFileExists:
        try:
            current = f" (peer id {peer_id_of(load_key(path))})"
        except IdentityError:
            current = ""
        raise CLIError(
            f"key file {path} already exists{current}; pass --force to replace it (the peer id will change)"
        ) from None
    except IdentityError as exc:
        raise CLIError(str(exc)) from None
    print(peer_id_of(key_pair))
    print(f"{PROG}: wrote a new node key to {path}", file=sys.stderr)
    return 0


def cmd_swarm_key(args: argparse.Namespace) -> int:
    """Create a private swarm's key file (mode 0600) and print the swarm id."""
    from hexgen.daemon.certificates import create_swarm_key, default_swarm_key_file, swarm_id, swarm_public_key
    from hexgen.daemon.private_files import IdentityError, KeyFileExists

    path = _user_path(args.file, default_swarm_key_file)
    try:
        swarm_key = create_swarm_key(path, force=args.force)
    except KeyFileExists:
        raise CLIError(
            f"swarm key file {path} already exists; pass --force to replace it "
            "(certificates issued with the old key stop working)"
        ) from None
    except IdentityError as exc:
        raise CLIError(str(exc)) from None
    print(swarm_id(swarm_public_key(swarm_key)))
    print(f"{PROG}: wrote a new swarm key to {path}; keep it secret: whoever holds it can admit nodes", file=sys.stderr)
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    """Issue a membership certificate for a peer: to ``--out`` if given, else to stdout."""
    from hexgen.daemon.certificates import (
        Certificate,
        CertificateError,
        certificate_text,
        default_swarm_key_file,
        issue_certificate,
        load_swarm_key,
        write_certificate,
    )
    from hexgen.daemon.private_files import IdentityError, KeyFileExists

    valid_s = parse_duration(args.valid_for)
    key_path = _user_path(args.swarm_key, default_swarm_key_file)
    try:
        swarm_key = load_swarm_key(key_path)
        cert_bytes = issue_certificate(swarm_key, args.peer_id, valid_s)
        if args.out:
            write_certificate(Path(args.out).expanduser(), cert_bytes, force=args.force)
    except KeyFileExists as exc:
        raise CLIError(f"certificate file {exc.path} already exists; pass --force to replace it") from None
    except (IdentityError, CertificateError) as exc:
        raise CLIError(str(exc)) from None
    cert = Certificate.from_bytes(cert_bytes)
    if not args.out:
        print(certificate_text(cert_bytes), end="")
    if cert.expires is None:
        until = "with no expiry"
    else:
        until = "until " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cert.expires))
    where = f"; certificate written to {args.out}" if args.out else ""
    print(f"{PROG}: admitted {cert.peer_id} to swarm {cert.swarm_id} {until}{where}", file=sys.stderr)
    return 0


def add_key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keygen``, ``swarm-key`` and ``admit`` on the subcommand parser."""
    keygen = sub.add_parser(
        "keygen",
        help="create this node's key file and print its peer id",
        description="Create the node's Ed25519 key file (mode 0600) and print the peer id it gives the node.",
    )
    keygen.add_argument(
        "--key-file",
        metavar="PATH",
        help="where to write the key (default: $XDG_DATA_HOME/hexgen/node.key, or ~/.local/share/hexgen/node.key)",
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key file (the peer id changes)")
    keygen.set_defaults(func=cmd_keygen)

    swarm_key = sub.add_parser(
        "swarm-key",
        help="create a private swarm's key and print the swarm id",
        description="Create the Ed25519 key of a private swarm (mode 0600). Whoever holds it admits nodes "
        "with 'hexgen-node admit'.",
    )
    swarm_key.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="where to write the key (default: $XDG_DATA_HOME/hexgen/swarm.key, or ~/.local/share/hexgen/swarm.key)",
    )
    swarm_key.add_argument("--force", action="store_true", help="replace an existing swarm key file")
    swarm_key.set_defaults(func=cmd_swarm_key)

    admit = sub.add_parser(
        "admit",
        help="issue a membership certificate for a peer of a private swarm",
        description="Sign a membership certificate for PEER_ID with the swarm key. The node presents it with "
        "'hexgen-node join --swarm-cert FILE'. The certificate goes to stdout unless --out names a file.",
    )
    admit.add_argument("peer_id", metavar="PEER_ID", help="the peer id that 'hexgen-node keygen' printed on that node")
    admit.add_argument(
        "--swarm-key",
        metavar="FILE",
        help="the swarm key (default: $XDG_DATA_HOME/hexgen/swarm.key, or ~/.local/share/hexgen/swarm.key)",
    )
    admit.add_argument(
        "--valid-for",
        default=DEFAULT_CERT_VALIDITY,
        metavar="DURATION",
        help=f"lifetime such as 12h, 30d or never (default: {DEFAULT_CERT_VALIDITY})",
    )
    admit.add_argument("-o", "--out", metavar="FILE", help="write the certificate to FILE instead of stdout")
    admit.add_argument("--force", action="store_true", help="replace an existing --out file")
    admit.set_defaults(func=cmd_admit)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per subcommand, each naming its handler in ``func``."""
    parser = argparse.ArgumentParser(prog=PROG, description="hexgen: LLM serving on heterogeneous GPUs (HexGen-2).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = sub.add_parser(
        "plan",
        help="plan a cluster offline and compare with the baselines",
        description="Run the HexGen-2 planner on a cluster file and print the plan beside the DistServe-style, "
        "HexGen-style and naive baselines.",
    )
    plan.add_argument("cluster", metavar="CLUSTER.toml", help="cluster description (see bench/clusters/)")
    plan.add_argument(
        "--model",
        required=True,
        metavar="NAME|PATH|ORG/NAME[@REV]",
        help="preset name, a config.json or its folder, or a Hugging Face Hub id (only its config.json is fetched)",
    )
    plan.add_argument(
        "--workload",
        default=DEFAULT_WORKLOAD,
        metavar="W",
        help=f"{', '.join(WORKLOAD_KINDS)} (default: {DEFAULT_WORKLOAD}, {WORKLOAD_REQUESTS} requests of the trace)",
    )
    plan.add_argument("--trace", default=str(DEFAULT_TRACE), metavar="PATH", help="Azure LLM inference trace CSV")
    plan.add_argument("--seed", type=int, default=0, metavar="N", help="seed for sampling and planning (default 0)")
    add_quantize_argument(plan, "plan for the layers' linear weights loaded quantized")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plan.set_defaults(func=cmd_plan)
    add_key_commands(sub)
    add_join_command(sub)
    add_demo_command(sub)
    add_status_command(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message folded onto one line (TOML and CSV errors may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), run the subcommand, return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        CLIError,
        JoinError,
        DemoError,
        StatusError,
        ClusterError,
        SpecError,
        WorkloadError,
        HubError,
        SettingsError,
    ) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (``| head``) went away; point stdout at devnull so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
