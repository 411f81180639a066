"""``hexgen-node status``: a daemon's live view of the swarm (a Textual TUI), or one snapshot as text or JSON.

The daemon serves ``Node.status()`` as JSON at ``GET /status`` on its HTTP port (``hexgen-node join --http
PORT``, on 127.0.0.1). Textual runs on asyncio and the daemon on trio, so the view is a plain HTTP client
of that endpoint (httpx), reading the same JSON that scripts and ``--once --json`` read.

Three layers: pure view-model functions over the status dict (each tolerates a partial or malformed status
and shows ``-`` for what is missing), the fetch with its one-line errors, and the presentations: plain
text for ``--once`` and the Textual app. Textual and httpx are imported only when used, so registering the
subcommand costs every other ``hexgen-node`` command nothing.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hexgen.cli.format import table
from hexgen.coordinator.plan import SINK, SOURCE, Flow, layer_range
from hexgen.daemon.messages import MessageError, PlanBody
from hexgen.daemon.swarm_view import assignments
from hexgen.engine.hub import model_name

if TYPE_CHECKING:
    import httpx

MISSING = "-"
DEFAULT_HTTP_PORT = 8000
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
DEFAULT_INTERVAL_S = 1.0
FETCH_TIMEOUT_S = 3.0
TEXT_EVENTS = 15  # the newest events shown by ``--once``; the TUI shows all the daemon keeps
ENDPOINTS = (SOURCE, SINK)  # the planner's flow-graph terminals
# An error number inside a message that joins several errors ("Multiple exceptions: [Errno 111] ...").
ERRNO_PATTERN = re.compile(r"\[Errno (\d+)\]")
# Full base58 peer ids in event texts are shortened like the tables' peer column.
PEER_ID_PATTERN = re.compile(r"\b(?:12D3KooW|Qm)[1-9A-HJ-NP-Za-km-z]{38,}\b")

PEER_COLUMNS = ("peer", "host", "GPUs", "roles", "groups", "in flight", "tokens/s", "last seen", "network", "note")
GROUP_COLUMNS = ("group", "role", "GPUs", "layout", "layers", "capacity", "batch")
EVENT_COLUMNS = ("time", "kind", "event")


@dataclass(frozen=True)
class Row:
    """One table row: a stable key (to update a live table in place) and its cells, all text."""

    key: str
    cells: tuple[str, ...]


# ----------------------------------------------------------------------------- view model (pure)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    """A finite number, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _key(value: Any) -> str:
    """A value usable as a peer-id key: the string itself, or "" for anything else (lists do not hash)."""
    return value if isinstance(value, str) else ""


def _text(value: Any) -> str:
    """A string or number as one line of text (peers' texts may hold newlines), or ``-`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return MISSING
    return " ".join(str(value).split()) or MISSING


def short_id(peer_id: Any) -> str:
    """A peer id's last six characters after an ellipsis (the default host names end the same way)."""
    return f"…{_text(peer_id[-6:])}" if isinstance(peer_id, str) and len(peer_id) > 6 else _text(peer_id)


def host_names(status: Mapping[str, Any]) -> dict[str, str]:
    """Peer id -> host name, from this node, its peer table and the peers the plan was made from."""
    names: dict[str, str] = {}
    records = [*_list(_dict(_dict(status.get("plan")).get("body")).get("peers")), *_list(status.get("peers"))]
    for record in [*records, {"peer_id": status.get("peer_id"), "host": status.get("host")}]:
        record = _dict(record)
        if isinstance(record.get("peer_id"), str) and _text(record.get("host")) != MISSING:
            names[record["peer_id"]] = _text(record["host"])
    return names


def peer_name(peer_id: Any, names: Mapping[str, str]) -> str:
    """``host (…abc123)`` when the host is known, else the short id."""
    host = names.get(peer_id) if isinstance(peer_id, str) else None
    return f"{host} ({short_id(peer_id)})" if host else short_id(peer_id)


def gpu_text(hardware: Any) -> str:
    """A node's GPUs by type and memory in advert order, e.g. ``H100x2 80GB`` or ``A100x1 40GB, L40x1 48GB``."""
    gpus = _dict(hardware).get("gpus")
    if not isinstance(gpus, list):
        return MISSING
    if not gpus:
        return "none"
    counts: dict[tuple[str, str], int] = {}
    for gpu in gpus:
        gpu = _dict(gpu)
        memory = _number(gpu.get("memory_gb"))
        kind = (_text(gpu.get("type")), f"{memory:.0f}GB" if memory is not None else "?GB")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind}x{count} {memory}" for (kind, memory), count in counts.items())


def _unique(values: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(values)) or MISSING


def network_text(record: Mapping[str, Any], is_self: bool) -> str:
    """Whether a node can be dialled (``public``, ``private`` or ``unknown``, as its signed advert says) and,
    for a peer, how this node is connected to it (``direct``, ``relayed``; ``-``: not connected), what the
    latest probe of that link measured, and what carries the KV this node relays to it (a splice through a
    relay, or a libp2p stream), with how many links its workers hold of their own to that peer's."""
    reach = _text(record.get("reachability"))
    if is_self:
        return reach
    link = _text(record.get("link"))
    kv = _dict(record.get("kv"))
    carrier = {
        "direct": ", KV hole-punched",
        "splice": f", KV spliced by {short_id(kv.get('relay'))}",
        "stream": ", KV on a libp2p stream",
    }
    own = sum(n for n in _dict(kv.get("worker_links")).values() if isinstance(n, int))
    workers = f" ({own} worker-to-worker)" if own else ""
    carried = f"{carrier.get(_text(kv.get('carrier')), '')}{workers}"
    return MISSING if reach == link == MISSING else f"{reach}, {link}{measured_text(record.get('measured'))}{carried}"


def measured_text(measured: Any) -> str:
    """`` 1.20 GB/s, 0.4 ms (tcp)``: the latest probe of a link, its throughput, round trip and the path it
    took; nothing where there is none."""
    found = _dict(measured)
    gb_s, rtt = _number(found.get("gb_s")), _number(found.get("rtt_ms"))
    if gb_s is None:
        return ""
    latency = f", {rtt:.1f} ms" if rtt is not None else ""
    return f" {gb_s:.2f} GB/s{latency} ({_text(found.get('path'))})"


def _peer_row(status: Mapping[str, Any], record: Mapping[str, Any], roles: list[dict[str, Any]], is_self: bool) -> Row:
    """A peer table row for one peer record (or this node's own top-level fields) and its GPUs' roles."""
    peer_id = record.get("peer_id")
    load = _dict(record.get("load"))
    in_flight, tokens = _number(load.get("in_flight")), _number(load.get("tokens_per_s"))
    last_seen = _number(record.get("last_seen_s"))
    has_plan = bool(_dict(_dict(status.get("plan")).get("body")).get("plan"))
    if roles:
        role_cell = _unique(_text(r.get("role")) for r in roles)
        group_cell = _unique(_text(r.get("group")) for r in roles)
    else:  # a planned swarm that leaves this peer's GPUs out says so; no plan at all is just missing
        role_cell = group_cell = "unused" if has_plan else MISSING
    flagged = isinstance(peer_id, str) and peer_id in _dict(status.get("flagged"))
    labels = (("this node", is_self), ("coordinator", peer_id == status.get("coordinator")), ("FLAGGED", flagged))
    note = [label for label, yes in labels if yes]
    return Row(
        _text(peer_id),
        (
            short_id(peer_id),
            _text(record.get("host")),
            gpu_text(record.get("hardware")),
            role_cell,
            group_cell,
            f"{in_flight:.0f}" if in_flight is not None else MISSING,
            f"{tokens:.1f}" if tokens is not None else MISSING,
            f"{last_seen:.1f} s ago" if last_seen is not None else MISSING,
            network_text(record, is_self),
            ", ".join(note) or MISSING,
        ),
    )


def peer_rows(status: Mapping[str, Any]) -> list[Row]:
    """This node first, then its peers by host name: id, host, GPUs, roles and groups in the adopted plan,
    load (requests in flight), tokens/s, seconds since the last advert, reachability and link kind.
    O(peers + GPUs in the plan)."""
    by_peer = assignments(_body(status))
    records = [_dict(r) for r in _list(status.get("peers")) if _dict(r).get("peer_id") != status.get("peer_id")]
    records.sort(key=lambda r: (str(r.get("host")), str(r.get("peer_id"))))
    rows = [_peer_row(status, r, [_dict(a) for a in by_peer.get(_key(r.get("peer_id")), [])], False) for r in records]
    if "peer_id" in status:
        own_roles = [_dict(a) for a in _list(status.get("roles"))] or by_peer.get(_key(status["peer_id"]), [])
        rows.insert(0, _peer_row(status, status, own_roles, True))
    return rows


def _body(status: Mapping[str, Any]) -> PlanBody | None:
    """The adopted plan's body, through its one parser; None when there is none or it does not parse."""
    raw = _dict(status.get("plan")).get("body")
    try:
        return None if raw is None else PlanBody.from_wire(raw)
    except MessageError:
        return None


def _gpu_place(index: int, body: PlanBody, names: Mapping[str, str]) -> str:
    """A plan's global GPU index as ``host:local_gpu`` (the short peer id when the host is unknown)."""
    place = body.gpus.get(index)
    if place is None:
        return f"#{index}"
    peer, local = place
    return f"{names.get(peer) or short_id(peer)}:{local}"


def group_rows(status: Mapping[str, Any]) -> list[Row]:
    """One row per serving group of the adopted plan: id, role, GPUs as ``host:gpu`` (``+`` joins tensor
    ranks, ``|`` separates pipeline stages), layout such as ``PP2 [TP2,TP1]``, layer ranges, capacity
    (requests/s) and batch. Empty without a plan. O(GPUs in the plan)."""
    body = _body(status)
    if body is None or body.plan is None:
        return []
    names = host_names(status)
    rows = []
    for group in body.plan.groups:
        places = " | ".join("+".join(_gpu_place(g, body, names) for g in s.gpus) for s in group.stages)
        widths = ",".join(f"TP{s.tp}" for s in group.stages)
        rows.append(
            Row(
                str(group.id),
                (
                    str(group.id),
                    group.role,
                    places or MISSING,
                    f"PP{group.pp} [{widths}]" if group.stages else MISSING,
                    " | ".join(layer_range(*s.layers) for s in group.stages) or MISSING,
                    f"{group.capacity:.3f} req/s",
                    f"{group.batch:.0f}",
                ),
            )
        )
    return rows


def _flow_end(end: int | str, roles: Mapping[int | str, str]) -> str:
    if end in ENDPOINTS:
        return str(end)
    role = roles.get(end)
    return f"group {end} ({role})" if role else f"group {end}"


def _flow_order(flow: Flow) -> tuple[int, str, str]:
    """Edges from the source first, then group to group, then edges into the sink; by group id within each."""
    stage = 0 if flow.src == SOURCE else 2 if flow.dst == SINK else 1
    return (stage, str(flow.src).zfill(9), str(flow.dst).zfill(9))  # zero-padded: group 10 after group 9


def flow_lines(status: Mapping[str, Any]) -> list[str]:
    """The plan's request flows with a positive rate, ``src -> dst: rate req/s``, source edges first; a
    hand-off says how its KV travels (``, KV over gloo``, or ``, KV over libp2p`` and its links' kinds)."""
    body = _body(status)
    if body is None or body.plan is None:
        return []
    roles: dict[int | str, str] = {g.id: g.role for g in body.plan.groups}
    return [
        f"{_flow_end(flow.src, roles)} -> {_flow_end(flow.dst, roles)}: {flow.rate:.3f} req/s{_kv_route(body, flow)}"
        for flow in sorted(body.plan.flows, key=_flow_order)
        if not flow.rate <= 0
    ]


def _kv_route(body: PlanBody, flow: Flow) -> str:
    """How a prefill -> decode flow's KV travels, as the plan records it; empty for any other flow."""
    if not (isinstance(flow.src, int) and isinstance(flow.dst, int)):
        return ""
    links = [link for link in body.links if link.use == "handoff" and link.groups == (flow.src, flow.dst)]
    relayed = sorted({link.kind for link in links if link.transport == "libp2p"})
    return f", KV over libp2p ({', '.join(relayed)})" if relayed else ", KV over gloo"


def plan_summary(status: Mapping[str, Any]) -> str:
    """One line on the adopted plan: predicted throughput, bottleneck, planner and unused GPUs, and the
    coordinator's error when it serves a fallback plan; or why there is no plan."""
    if not _dict(status.get("plan")):
        return "no plan adopted yet"
    body = _body(status)
    if body is None:
        return "the adopted plan has no layout"
    error = body.error or MISSING
    plan = body.plan
    if plan is None:
        return f"the coordinator could not plan: {error}" if error != MISSING else "the adopted plan has no layout"
    tokens = _number(plan.meta.get("tokens_per_s"))
    parts = [
        f"predicted {plan.throughput:.3f} req/s",
        f"{tokens:,.0f} tokens/s" if tokens is not None else None,
        f"bottleneck: {plan.bottleneck}",
        f"planner: {_text(plan.meta.get('planner'))}",
    ]
    unused = [i for i in _list(plan.meta.get("unused_gpus")) if type(i) is int]
    if unused:
        names = host_names(status)
        parts.append("unused GPUs: " + ", ".join(_gpu_place(i, body, names) for i in unused))
    # a fallback plan says why the swarm serves less than it could
    return ", ".join(p for p in parts if p) + (f"; degraded: {error}" if error != MISSING else "")


def serving_summary(status: Mapping[str, Any]) -> str:
    """This node's workers: the epoch they serve and how many are ready, starting or failed."""
    serving = status.get("serving")
    if not isinstance(serving, dict):
        return "this node serves nothing (no checkpoint, or no serving status)"
    workers = [_dict(w) for w in _dict(serving.get("workers")).values()]
    if not workers:
        return f"this node runs no workers (epoch {_text(serving.get('epoch'))})"
    states: dict[str, int] = {}
    for worker in workers:
        states[_text(worker.get("state"))] = states.get(_text(worker.get("state")), 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    errors = _unique(_text(w.get("error")) for w in workers if w.get("error"))
    tail = f"; error: {errors}" if errors != MISSING else ""
    return f"this node serves epoch {_text(serving.get('epoch'))} with {len(workers)} workers ({counts}){tail}"


def header_text(status: Mapping[str, Any]) -> str:
    """The header line: this node, swarm, model, coordinator, term, plan epoch and member count."""
    names = host_names(status)
    members = status.get("members")
    model = _text(status.get("model"))
    coordinator = status.get("coordinator")
    if not isinstance(coordinator, str) or not coordinator:
        coordinator_text = MISSING
    elif coordinator == status.get("peer_id"):
        coordinator_text = "this node"
    else:  # the peers table pairs host names with ids, so the name alone keeps the line short
        coordinator_text = names.get(coordinator) or short_id(coordinator)
    parts = [
        peer_name(status.get("peer_id"), names),
        f"swarm {_text(status.get('swarm'))}",
        f"model {model_name(model.rstrip('/'))}",
        f"coordinator {coordinator_text}",
        f"term {_text(status.get('term'))}",
        f"epoch {_text(_dict(status.get('plan')).get('epoch'))}",
        f"{len(members) if isinstance(members, list) else MISSING} members",
    ]
    return " │ ".join(parts)


def event_rows(status: Mapping[str, Any]) -> list[Row]:
    """The daemon's recent events, oldest first: local time, kind and text (peer ids shortened)."""
    rows = []
    for index, event in enumerate(_list(status.get("events"))):
        event = _dict(event)
        when = _number(event.get("t"))
        try:
            shown = time.strftime("%H:%M:%S", time.localtime(when)) if when is not None else MISSING
        except (OverflowError, OSError, ValueError):  # a time beyond the platform's calendar
            shown = MISSING
        text = PEER_ID_PATTERN.sub(lambda m: short_id(m.group(0)), _text(event.get("text")))
        rows.append(Row(f"{index}:{when}", (shown, _text(event.get("kind")), text)))
    return rows


def render_text(status: Mapping[str, Any]) -> str:
    """The whole view as plain text, for ``--once``: header, peers, plan with flows, newest events."""
    lines = [header_text(status), "", "peers"]
    lines += table(PEER_COLUMNS, [r.cells for r in peer_rows(status)], right=(5, 6, 7))
    lines += ["", f"plan: {plan_summary(status)}", f"      {serving_summary(status)}"]
    groups = group_rows(status)
    if groups:
        lines += table(GROUP_COLUMNS, [r.cells for r in groups], right=(0, 5, 6))
    flows = flow_lines(status)
    if flows:
        lines += ["", "flows", *(f"  {line}" for line in flows)]
    events = event_rows(status)[-TEXT_EVENTS:]
    lines += ["", f"events (newest {len(events)})" if events else "events: none"]
    lines += table(EVENT_COLUMNS, [r.cells for r in events]) if events else []
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fetching


class StatusError(Exception):
    """The daemon's status cannot be had (or a flag cannot work); the message is the one-line reason."""


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words: the operating system's text for the innermost error number
    (asyncio words a refused connection as "Connect call failed", and joins the errors of several
    addresses, as for localhost, into one message)."""
    seen: BaseException | None = exc
    while seen is not None:
        number = seen.errno if isinstance(seen, OSError) else None
        found = ERRNO_PATTERN.search(str(seen)) if number is None else None
        if found is not None:
            return os.strerror(int(found.group(1))).lower()
        if number is not None:  # resolver errors have negative numbers and their own text
            return (os.strerror(number) if number > 0 else str(getattr(seen, "strerror", "") or seen)).lower()
        seen = seen.__cause__ or seen.__context__
    return " ".join(str(exc).split()) or type(exc).__name__


def unreachable(url: str, reason: str) -> str:
    """The line shown when the daemon does not answer, with the command that would make it answer."""
    port = urlsplit(url).port or DEFAULT_HTTP_PORT
    return f"cannot reach {url}: {reason} — is `hexgen-node join --http {port}` running?"


async def fetch_status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """``GET {url}/status`` as a dict; StatusError with a one-line reason on any failure."""
    import httpx

    try:
        response = await client.get(f"{url}/status")
    except httpx.TimeoutException:
        raise StatusError(unreachable(url, f"no answer within {FETCH_TIMEOUT_S:g} s")) from None
    except (httpx.HTTPError, OSError) as exc:
        raise StatusError(unreachable(url, _reason(exc))) from None
    if response.status_code != 200:
        # HTTP/2 and some servers send no reason phrase; the standard one names the code all the same
        phrase = response.reason_phrase or httpx.codes.get_reason_phrase(response.status_code)
        raise StatusError(
            f"{url}/status answered HTTP {response.status_code} {phrase}".rstrip()
            + ": is this the HTTP port of a hexgen daemon?"
        )
    try:
        status = response.json()
    except ValueError:
        raise StatusError(f"{url}/status did not answer JSON: is this the HTTP port of a hexgen daemon?") from None
    if not isinstance(status, dict):
        raise StatusError(f"{url}/status answered JSON that is not an object")
    return status


async def fetch_once(url: str) -> dict[str, Any]:
    """One status snapshot through a client of its own."""
    import httpx

    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
        return await fetch_status(client, url)
