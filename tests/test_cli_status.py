"""``hexgen-node status``: the view model on real-shaped status dicts, the Textual app headless against a real
HTTP server, and the command in real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textual.widgets import DataTable, Static

from hexgen.cli.status import (
    MISSING,
    PEER_COLUMNS,
    event_rows,
    flow_lines,
    gpu_text,
    group_rows,
    header_text,
    network_text,
    peer_rows,
    plan_summary,
    render_text,
    serving_summary,
)
from hexgen.cli.status_command import status_app, status_url
from hexgen.testing.cli import assert_one_line_error, node, run_main

WAIT_S = 10.0  # every wait on the app is bounded by this
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "status.svg"

# Real peer ids (from a run of four daemons); this node is A, and C holds the coordinator lease.
A = "12D3KooWG1CevVV3nUPXz1jAzn1GqTnMkikAHyxN98tYcVtLsotY"
B = "12D3KooWMqkEn1qcXCXmHAaDoVShDdhrXUzsxw6m4Zc1mkZfR584"
C = "12D3KooWDTkgYmWnjEsiswuNF4G32HXSfuaURkFcfyaFUujC1Bj5"
D = "12D3KooWGvMACfYXQgB469ruZicawdmnSdrnYJUcFTFR3s41Q8zr"
HOSTS = {A: "gpu-a", B: "gpu-b", C: "gpu-c", D: "gpu-d"}
GPUS = {A: ("H100", 80.0, 2), B: ("A100", 80.0, 2), C: ("L40", 48.0, 2), D: ("A6000", 48.0, 2)}
EVENT_T = 1_795_563_404.0


def hardware(peer: str) -> dict[str, Any]:
    """``HardwareProfile.to_dict()`` of a simulated node."""
    kind, memory, count = GPUS[peer]
    gpu = {
        "type": kind,
        "name": f"simulated {kind}",
        "memory_gb": memory,
        "tflops": 312.0,
        "hbm_gb_s": 2039.0,
        "simulated": True,
        "measured_tflops": None,
        "measured_hbm_gb_s": None,
    }
    return {"gpus": [dict(gpu) for _ in range(count)], "cpu_count": 2, "memory_gb": 25.3, "intra_host_gb_s": 450.0}


def four_peer_status() -> dict[str, Any]:
    """``Node.status()`` of gpu-a in a four-host swarm serving llama-2-7b disaggregated: a TP2 prefill group
    on gpu-a, two pipelined decode groups across gpu-b, gpu-c and gpu-d, and one GPU of gpu-d unused."""
    gpu_map = {"0": [A, 0], "1": [A, 1], "2": [B, 0], "3": [B, 1], "4": [C, 0], "5": [C, 1], "6": [D, 0], "7": [D, 1]}
    plan = {
        "throughput_rps": 7.412,
        "bottleneck": "decode",
        "groups": [
            {
                "id": 0,
                "role": "prefill",
                "capacity_rps": 11.903,
                "batch": 32,
                "stages": [{"gpus": [0, 1], "layers": [0, 32]}],
            },
            {
                "id": 1,
                "role": "decode",
                "capacity_rps": 4.871,
                "batch": 128,
                "stages": [{"gpus": [2, 3], "layers": [0, 20]}, {"gpus": [4], "layers": [20, 32]}],
            },
            {
                "id": 2,
                "role": "decode",
                "capacity_rps": 2.541,
                "batch": 96,
                "stages": [{"gpus": [5], "layers": [0, 16]}, {"gpus": [6], "layers": [16, 32]}],
            },
        ],
        "flows": [
            {"src": 1, "dst": "sink", "rate": 4.871},
            {"src": 0, "dst": 2, "rate": 2.541},
            {"src": "source", "dst": 0, "rate": 7.412},
            {"src": 0, "dst": 1, "rate": 4.871},
            {"src": 2, "dst": "sink", "rate": 2.541},
            {"src": 0, "dst": 0, "rate": 0.0},
        ],
        "meta": {"unused_gpus": [7], "tokens_per_s": 948.7, "model": "llama-2-7b", "planner": "hexgen2"},
    }
    loads = {
        A: {"in_flight": 3, "tokens_per_s": 181.4, "requests": 57},
        B: {"in_flight": 5, "tokens_per_s": 412.9, "requests": 63},
        C: {"in_flight": 2, "tokens_per_s": 96.25, "requests": 41},
        D: {},
    }
    peer_records = [
        {
            "peer_id": p,
            "host": HOSTS[p],
            "addrs": [f"/ip4/10.0.0.{i}/tcp/4001/p2p/{p}"],
            "hardware": hardware(p),
            "load": loads[p],
            "last_seen_s": seen,
        }
        for i, (p, seen) in enumerate(((C, 0.4), (D, 3.25), (B, 1.5)), start=2)
    ]
    events = [
        ("election", f"coordinator is {C} (term 3)", {}),
        ("join", f"peer {B} joined (gpu-b)", {"peer": B}),
        ("plan", "adopted plan epoch 11 of term 3 (4 members): GPU 0 prefill in group 0 stage 0", {"epoch": 11}),
        ("failure", "worker 2 of epoch 11 failed: Connection closed by peer", {}),
        ("plan", "adopted plan epoch 12 of term 3 (4 members): GPU 0 prefill in group 0 stage 0", {"epoch": 12}),
    ]
    return {
        "peer_id": A,
        "addrs": [f"/ip4/10.0.0.1/tcp/4001/p2p/{A}"],
        "host": "gpu-a",
        "hardware": hardware(A),
        "model": "/models/Llama-2-7b-hf",
        "load": loads[A],
        "roles": [
            {"gpu": 0, "group": 0, "role": "prefill", "stage": 0, "tp": 2, "layers": [0, 32]},
            {"gpu": 1, "group": 0, "role": "prefill", "stage": 0, "tp": 2, "layers": [0, 32]},
        ],
        "swarm": "open",
        "coordinator": C,
        "term": 3,
        "is_coordinator": False,
        "members": sorted(HOSTS),
        "peers": sorted(peer_records, key=lambda r: r["peer_id"]),
        "plan": {
            "term": 3,
            "epoch": 12,
            "coordinator": C,
            "members": sorted(HOSTS),
            "body": {
                "plan": plan,
                "error": None,
                "throughput": 7.412,
                "gpus": gpu_map,
                "term": 3,
                "epoch": 12,
                "members": sorted(HOSTS),
                "peers": [{"peer_id": p, "host": HOSTS[p], "hardware": hardware(p)} for p in HOSTS],
                "restart": False,
            },
        },
        "rejections": {"stale-term": 2},
        "links": [],
        "serving": {
            "model": "/models/Llama-2-7b-hf",
            "epoch": 12,
            "workers": {
                "0": {"replica": 0, "role": "prefill", "formed": 12, "state": "ready", "error": None, "pid": 4711},
                "1": {"replica": 0, "role": "prefill", "formed": 12, "state": "ready", "error": None, "pid": 4712},
            },
            "in_flight": 3,
        },
        "events": [
            {"t": EVENT_T + 7.5 * i, "kind": kind, "text": text, **extra}
            for i, (kind, text, extra) in enumerate(events)
        ],
    }


def lonely_status() -> dict[str, Any]:
    """A daemon just started: no peers, no lease, no plan, nothing served (plans for a named model only)."""
    status = four_peer_status()
    status |= {
        "load": {},
        "roles": [],
        "coordinator": None,
        "term": 0,
        "members": [A],
        "peers": [],
        "plan": None,
        "serving": None,
        "events": [],
    }
    return status


# --- the view model --------------------------------------------------------------------------------------


def test_peer_rows_put_this_node_first_with_its_roles_load_and_gpus() -> None:
    rows = peer_rows(four_peer_status())
    assert [r.key for r in rows] == [A, B, C, D]
    assert [r.cells for r in rows] == [
        ("…tLsotY", "gpu-a", "H100x2 80GB", "prefill", "0", "3", "181.4", MISSING, MISSING, "this node"),
        ("…ZfR584", "gpu-b", "A100x2 80GB", "decode", "1", "5", "412.9", "1.5 s ago", MISSING, MISSING),
        ("…jC1Bj5", "gpu-c", "L40x2 48GB", "decode", "1, 2", "2", "96.2", "0.4 s ago", MISSING, "coordinator"),
        ("…41Q8zr", "gpu-d", "A6000x2 48GB", "decode", "2", MISSING, MISSING, "3.2 s ago", MISSING, MISSING),
    ]


def test_the_peer_table_shows_reachability_and_how_each_peer_is_linked() -> None:
    status = four_peer_status() | {"reachability": "private"}
    peers = status["peers"]
    peers[0] |= {"reachability": "public", "link": "direct"}
    peers[1] |= {"reachability": "private", "link": "relayed", "kv": {"carrier": "splice", "relay": "12D3KooWrelay9"}}
    peers[2] |= {"reachability": "unknown", "link": None}
    network = {r.key: r.cells[PEER_COLUMNS.index("network")] for r in peer_rows(status)}
    assert network[A] == "private"
    assert sorted(network[p["peer_id"]] for p in peers) == [
        "private, relayed, KV spliced by …relay9",
        "public, direct",
        "unknown, -",
    ]
    assert "private, relayed, KV spliced by …relay9" in render_text(status)
    peers[1]["kv"] = {"carrier": "stream", "relay": None}
    assert "private, relayed, KV on a libp2p stream" in render_text(status)
    peers[1]["kv"] = {"carrier": "direct", "relay": "12D3KooWrelay9", "worker_links": {"direct": 2, "splice": 1}}
    assert "private, relayed, KV hole-punched (3 worker-to-worker)" in render_text(status)
    peers[0]["measured"] = {"a": A, "b": peers[0]["peer_id"], "gb_s": 1.234, "rtt_ms": 0.42, "path": "tcp"}
    peers[1]["measured"] = {"gb_s": 0.5, "path": "kv-link"}
    peers[2]["measured"] = {"gb_s": "fast", "rtt_ms": 3}
    text = render_text(status)
    assert "public, direct 1.23 GB/s, 0.4 ms (tcp)" in text
    assert "private, relayed 0.50 GB/s (kv-link), KV hole-punched (3 worker-to-worker)" in text
    assert "unknown, -" in text and "GB/s" not in network_text(peers[2], False)


def test_peers_flagged_by_spot_checks_are_marked() -> None:
    status = four_peer_status() | {"flagged": {D: {"by": A, "reason": "outvoted", "t": 1.0}}}
    notes = {r.key: r.cells[-1] for r in peer_rows(status)}
    assert notes == {A: "this node", B: MISSING, C: "coordinator", D: "FLAGGED"}
    assert peer_rows(four_peer_status() | {"flagged": ["not", "a", "map"]})[3].cells[-1] == MISSING


def test_group_rows_name_gpus_by_host_and_show_the_parallel_layout() -> None:
    rows = group_rows(four_peer_status())
    assert [r.cells for r in rows] == [
        ("0", "prefill", "gpu-a:0+gpu-a:1", "PP1 [TP2]", "[0, 32)", "11.903 req/s", "32"),
        ("1", "decode", "gpu-b:0+gpu-b:1 | gpu-c:0", "PP2 [TP2,TP1]", "[0, 20) | [20, 32)", "4.871 req/s", "128"),
        ("2", "decode", "gpu-c:1 | gpu-d:0", "PP2 [TP1,TP1]", "[0, 16) | [16, 32)", "2.541 req/s", "96"),
    ]


def test_flows_go_from_the_source_through_the_groups_to_the_sink_and_skip_idle_edges() -> None:
    assert flow_lines(four_peer_status()) == [
        "source -> group 0 (prefill): 7.412 req/s",
        "group 0 (prefill) -> group 1 (decode): 4.871 req/s, KV over gloo",
        "group 0 (prefill) -> group 2 (decode): 2.541 req/s, KV over gloo",
        "group 1 (decode) -> sink: 4.871 req/s",
        "group 2 (decode) -> sink: 2.541 req/s",
    ]


def test_a_relayed_hand_off_says_its_kv_goes_over_libp2p_and_on_which_links() -> None:
    status = four_peer_status()
    body = status["plan"]["body"]
    a, b = body["members"][:2]
    body |= {"exchange": "libp2p", "gloo_groups": [0, 2]}
    body["links"] = [
        {"peers": [a, b], "use": "handoff", "kind": "relayed", "groups": [0, 1], "transport": "libp2p"},
        {"peers": [a, b], "use": "handoff", "kind": "direct", "groups": [0, 2], "transport": "torch"},
    ]
    assert flow_lines(status)[1:3] == [
        "group 0 (prefill) -> group 1 (decode): 4.871 req/s, KV over libp2p (relayed)",
        "group 0 (prefill) -> group 2 (decode): 2.541 req/s, KV over gloo",
    ]


def test_summaries_give_throughput_bottleneck_unused_gpus_and_workers() -> None:
    status = four_peer_status()
    assert plan_summary(status) == (
        "predicted 7.412 req/s, 949 tokens/s, bottleneck: decode, planner: hexgen2, unused GPUs: gpu-d:1"
    )
    assert serving_summary(status) == "this node serves epoch 12 with 2 workers (2 ready)"
    assert header_text(status) == (
        "gpu-a (…tLsotY) │ swarm open │ model Llama-2-7b-hf │ coordinator gpu-c │ term 3 │ epoch 12 │ 4 members"
    )


def test_event_rows_show_local_time_and_short_peer_ids() -> None:
    rows = event_rows(four_peer_status())
    assert len(rows) == 5 and len({r.key for r in rows}) == 5
    assert rows[0].cells == (
        time.strftime("%H:%M:%S", time.localtime(EVENT_T)),
        "election",
        "coordinator is …jC1Bj5 (term 3)",
    )
    assert rows[1].cells[1:] == ("join", "peer …ZfR584 joined (gpu-b)")


def test_gpu_text_groups_mixed_gpus_and_says_what_is_missing() -> None:
    mixed = {
        "gpus": [{"type": "A100", "memory_gb": 40}, {"type": "L40", "memory_gb": 48}, {"type": "A100", "memory_gb": 40}]
    }
    assert gpu_text(mixed) == "A100x2 40GB, L40x1 48GB"
    assert gpu_text({"gpus": []}) == "none"
    assert gpu_text(None) == MISSING
    assert gpu_text({"gpus": [{"type": "H100"}]}) == "H100x1 ?GB"


def test_a_lonely_daemon_shows_dashes_and_says_there_is_no_plan() -> None:
    status = lonely_status()
    assert [r.cells for r in peer_rows(status)] == [
        ("…tLsotY", "gpu-a", "H100x2 80GB", MISSING, MISSING, MISSING, MISSING, MISSING, MISSING, "this node")
    ]
    assert group_rows(status) == [] and flow_lines(status) == [] and event_rows(status) == []
    assert plan_summary(status) == "no plan adopted yet"
    assert serving_summary(status).startswith("this node serves nothing")
    assert header_text(status).endswith("coordinator - │ term 0 │ epoch - │ 1 members")
    status["coordinator"] = A
    assert "coordinator this node" in header_text(status)
    assert "events: none" in render_text(status)


def test_a_plan_the_coordinator_could_not_make_shows_its_error_and_unused_peers() -> None:
    status = four_peer_status()
    status["plan"]["body"] |= {"plan": None, "error": "the model does not fit in the swarm's memory"}
    assert plan_summary(status) == "the coordinator could not plan: the model does not fit in the swarm's memory"
    assert group_rows(status) == [] and flow_lines(status) == []
    assert {r.cells[3] for r in peer_rows(status)[1:]} == {MISSING}


def test_a_failed_worker_is_counted_and_its_error_shown() -> None:
    status = four_peer_status()
    status["serving"]["workers"]["1"] |= {"state": "failed", "error": "Connection closed\n   by peer"}
    assert serving_summary(status) == (
        "this node serves epoch 12 with 2 workers (1 failed, 1 ready); error: Connection closed by peer"
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _damage(value: Any, data: st.DataObject, depth: int = 0) -> Any:
    """``value`` with some subtrees replaced by arbitrary JSON, chosen by hypothesis."""
    if depth > 0 and data.draw(st.integers(0, 5)) == 0:
        return data.draw(JSON)
    if isinstance(value, dict):
        return {k: _damage(v, data, depth + 1) for k, v in value.items() if data.draw(st.integers(0, 9)) > 0}
    if isinstance(value, list):
        return [_damage(v, data, depth + 1) for v in value]
    return value


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_damaged_status_renders_without_raising(data: st.DataObject) -> None:
    status = _damage(four_peer_status(), data)
    text = render_text(status)
    assert " │ swarm " in text.splitlines()[0] and "\npeers\n" in text
    for row in peer_rows(status) + group_rows(status) + event_rows(status):
        assert all(isinstance(cell, str) and cell for cell in row.cells)


@pytest.mark.parametrize(
    ("url", "port", "expected"),
    [
        (None, None, "http://127.0.0.1:8000"),
        (None, 9123, "http://127.0.0.1:9123"),
        ("http://10.1.2.3:8080/", None, "http://10.1.2.3:8080"),
        ("http://127.0.0.1:8000/status", None, "http://127.0.0.1:8000"),
    ],
)
def test_status_url(url: str | None, port: int | None, expected: str) -> None:
    assert status_url(url, port) == expected


# --- a real HTTP server for the app and the command ----------------------------------------------------------


class StatusServer(ThreadingHTTPServer):
    """Serves ``payload`` as JSON at ``GET /status`` (404 elsewhere); the test may change it at any time."""

    daemon_threads = True

    def __init__(self, payload: Any) -> None:
        super().__init__(("127.0.0.1", 0), StatusHandler)
        self.payload = payload

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer

    def do_GET(self) -> None:
        if self.path != "/status":
            self.send_error(404)
            return
        body = json.dumps(self.server.payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server() -> Iterator[StatusServer]:
    httpd = StatusServer(four_peer_status())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(WAIT_S)


@pytest.fixture
def closed_url() -> str:
    """The URL of a port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- the Textual app, headless ---------------------------------------------------------------------------


def cells(table: DataTable[Any]) -> list[list[str]]:
    return [[str(table.get_cell_at((y, x))) for x in range(len(table.columns))] for y in range(table.row_count)]


def text_of(app: Any, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


@pytest.mark.asyncio
async def test_the_app_shows_peers_plan_and_events_and_switches_views_with_tab(
    server: StatusServer, tmp_path: Path
) -> None:
    app = status_app(server.url, interval=0.05)
    async with app.run_test(size=(120, 28)) as pilot:
        await asyncio.wait_for(app.polled(1), WAIT_S)
        await pilot.pause()
        assert text_of(app, "#header") == header_text(four_peer_status())
        assert "refreshed every 0.05 s" in text_of(app, "#connection")
        peers = app.query_one("#peers", DataTable)
        assert cells(peers) == [list(r.cells) for r in peer_rows(four_peer_status())]
        assert (
            str(peers.get_cell_at((2, 1))) == "gpu-c"
            and str(peers.get_cell_at((2, PEER_COLUMNS.index("note")))) == "coordinator"
        )

        views = app.query_one("#views")
        await pilot.press("tab")
        assert views.active == "plan-view"
        groups = app.query_one("#groups", DataTable)
        assert (
            str(groups.get_cell_at((1, 3))) == "PP2 [TP2,TP1]"
            and str(groups.get_cell_at((1, 2))) == "gpu-b:0+gpu-b:1 | gpu-c:0"
        )
        assert "bottleneck: decode" in text_of(app, "#plan-summary")
        assert "group 0 (prefill) -> group 1 (decode): 4.871 req/s" in text_of(app, "#flows")

        await pilot.press("tab")
        assert views.active == "events-view"
        events = app.query_one("#events", DataTable)
        assert events.row_count == 5
        assert str(events.get_cell_at((0, 1))) == "plan" and "epoch 12" in str(
            events.get_cell_at((0, 2))
        )  # newest first

        # a peer leaves and another's load changes: the next poll shows it
        changed = four_peer_status()
        changed["peers"] = [p for p in changed["peers"] if p["peer_id"] != D]
        changed["load"]["in_flight"] = 9
        server.payload = changed
        await asyncio.wait_for(app.polled(app.polls + 2), WAIT_S)
        await pilot.pause()
        assert [r.value for r in peers.rows] == [A, B, C] and str(peers.get_cell_at((0, 5))) == "9"

        await pilot.press("tab")
        assert views.active == "peers-view"
        await pilot.press("shift+tab")
        assert views.active == "events-view"
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@pytest.mark.asyncio
async def test_a_screenshot_of_the_plan_view(server: StatusServer, tmp_path: Path) -> None:
    """The picture in the README: set HEXGEN_UPDATE_SCREENSHOT=1 to rewrite docs/status.svg."""
    app = status_app(server.url)  # the default interval, as an operator sees it
    async with app.run_test(size=(120, 28)) as pilot:
        await asyncio.wait_for(app.polled(1), WAIT_S)
        await pilot.press("tab")
        await pilot.pause()
        app.save_screenshot(filename="status.svg", path=str(tmp_path))
        if os.environ.get("HEXGEN_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            app.save_screenshot(filename=SCREENSHOT.name, path=str(SCREENSHOT.parent))
    svg = (tmp_path / "status.svg").read_text().replace("&#160;", " ")
    assert svg.startswith("<svg") and "gpu-b:0+gpu-b:1" in svg and "refreshed every 1 s" in svg


@pytest.mark.asyncio
async def test_the_app_says_when_the_daemon_is_unreachable_and_keeps_trying(closed_url: str) -> None:
    app = status_app(closed_url, interval=0.05)
    async with app.run_test(size=(150, 30)) as pilot:
        await asyncio.wait_for(app.polled(3), WAIT_S)
        await pilot.pause()
        port = closed_url.rsplit(":", 1)[1]
        line = text_of(app, "#connection")
        assert line.startswith(
            f"cannot reach {closed_url}: connection refused — is `hexgen-node join --http {port}` running?"
        )
        assert "retrying every 0.05 s" in line and app.query_one("#connection").has_class("error")
        assert app.query_one("#peers", DataTable).row_count == 0
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@pytest.mark.asyncio
async def test_the_app_shows_a_lonely_daemon_and_a_later_outage(server: StatusServer) -> None:
    server.payload = lonely_status()
    app = status_app(server.url, interval=0.05)
    async with app.run_test(size=(150, 30)) as pilot:
        await asyncio.wait_for(app.polled(1), WAIT_S)
        await pilot.pause()
        assert app.query_one("#peers", DataTable).row_count == 1
        assert text_of(app, "#plan-summary") == "no plan adopted yet"
        server.payload = ["not", "a", "status"]
        await asyncio.wait_for(app.polled(app.polls + 2), WAIT_S)
        await pilot.pause()
        assert "answered JSON that is not an object" in text_of(app, "#connection")
        assert "the tables show the last status received" in text_of(app, "#connection")
        assert app.query_one("#peers", DataTable).row_count == 1


@pytest.mark.asyncio
async def test_markup_in_peer_supplied_text_is_shown_literally(server: StatusServer) -> None:
    hostile = four_peer_status()
    hostile["peers"][0]["host"] = "[/]evil[bold red]"
    hostile["events"][-1]["text"] = "[/] closing tag from nowhere [link=x]"
    hostile["plan"]["body"] |= {"plan": None, "error": "cannot build the cluster: [/b] bad [GPU]"}
    server.payload = hostile
    app = status_app(server.url, interval=0.05)
    async with app.run_test(size=(120, 28)) as pilot:
        await asyncio.wait_for(app.polled(1), WAIT_S)
        await pilot.pause()
        assert "[/]evil[bold red]" in [row[1] for row in cells(app.query_one("#peers", DataTable))]
        assert str(app.query_one("#events", DataTable).get_cell_at((0, 2))) == hostile["events"][-1]["text"]
        assert (
            text_of(app, "#plan-summary") == "the coordinator could not plan: cannot build the cluster: [/b] bad [GPU]"
        )
        await pilot.press("tab", "tab")
        await pilot.pause()
        assert app.is_running


# --- the command -----------------------------------------------------------------------------------------


def test_once_json_prints_the_status_as_served(server: StatusServer) -> None:
    result = node("status", "--once", "--json", "--url", server.url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == four_peer_status()


def test_once_prints_the_tables_as_text(server: StatusServer) -> None:
    result = node("status", "--once", "--http", server.server_address[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == render_text(four_peer_status())
    for text in ("gpu-a", "gpu-b", "gpu-c", "gpu-d", "PP2 [TP2,TP1]", "group 1 (decode) -> sink", "bottleneck: decode"):
        assert text in result.stdout


def test_an_unreachable_daemon_is_one_line_and_exit_status_2(closed_url: str) -> None:
    result = node("status", "--once", "--json", "--url", closed_url)
    assert_one_line_error(
        result.returncode, result.stdout, result.stderr, f"cannot reach {closed_url}: connection refused"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--url", "ftp://example.org"], "expected an HTTP address"),
        (["--url", "http://127.0.0.1:99999"], "expected an HTTP address"),
        (["--http", "0"], "expected a port from 1 to 65535"),
        (["--interval", "0"], "expected a positive number of seconds"),
        (["--interval", "nan"], "expected a positive number of seconds"),
    ],
)
def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> None:
    assert_one_line_error(*run_main(capsys, "status", "--once", *args), fragment)


def test_a_server_that_is_not_a_daemon_is_named(server: StatusServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(*run_main(capsys, "status", "--once", "--url", f"{server.url}/elsewhere"), "HTTP 404")


def test_the_live_view_needs_a_terminal(server: StatusServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(*run_main(capsys, "status", "--url", server.url), "needs a terminal")


def test_a_fallback_plan_shows_why_the_swarm_serves_less() -> None:
    status = four_peer_status()
    status["plan"]["body"]["error"] = "peers a and b cannot form a world; serving colocated replicas"
    assert plan_summary(status).endswith("; degraded: peers a and b cannot form a world; serving colocated replicas")
    status["plan"]["body"]["error"] = None
    assert "degraded" not in plan_summary(status)
