"""The ``hexgen-node`` command line: one subcommand per job (for now ``plan``, the offline planner).

``main(argv)`` returns the exit status: 0 on success, 2 on bad input (one ``hexgen-node: error: ...``
line on stderr, no traceback). Only the project's own input errors (and OSError where a file is read)
are turned into that line; anything else is a bug and surfaces with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hexgen.cli.format import BaselineResult, PlanReport, report_json, report_text
from hexgen.coordinator.cluster import Cluster, ClusterError, load_cluster_toml
from hexgen.coordinator.plan import Plan
from hexgen.coordinator.specs import SpecError, resolve_model
from hexgen.coordinator.workload import WORKLOAD_KINDS, Workload, WorkloadError, load_trace, workload_from_trace

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


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the cluster for the model and workload; print the plan beside the three baselines."""
    cluster = load_cluster_file(args.cluster)
    model = resolve_model(args.model)
    kind = workload_kind(args.workload)
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
    plan.add_argument("--model", required=True, metavar="NAME|PATH", help="preset name or a config.json / its folder")
    plan.add_argument(
        "--workload",
        default=DEFAULT_WORKLOAD,
        metavar="W",
        help=f"{', '.join(WORKLOAD_KINDS)} (default: {DEFAULT_WORKLOAD}, {WORKLOAD_REQUESTS} requests of the trace)",
    )
    plan.add_argument("--trace", default=str(DEFAULT_TRACE), metavar="PATH", help="Azure LLM inference trace CSV")
    plan.add_argument("--seed", type=int, default=0, metavar="N", help="seed for sampling and planning (default 0)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    plan.set_defaults(func=cmd_plan)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message folded onto one line (TOML and CSV errors may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), run the subcommand, return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ClusterError, SpecError, WorkloadError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (``| head``) went away; point stdout at devnull so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
