"""NAT benchmark: daemons at home behind masquerading routers join a swarm through a relay, in the NAT lab of
network namespaces (tests/support/nat_lab.py; needs root and iptables).

A relay daemon (``join --relay``) on the public network, and one daemon per home with ``--relay-peer``: homes 1
and 2 behind endpoint-independent NATs, home 3 (full run only) behind a symmetric one. Measured from the moment
every home daemon printed its ready line: ``join_via_relay_s``, until every daemon sees every other and all
adopted one plan (the homes reach each other only through the relay); ``hole_punch_s``, until homes 1 and 2
report their link as hole-punched (DCUtR); ``symmetric_stays_relayed`` (full run), whether home 3's links are
still relayed at the end. Not measured yet (the data plane over libp2p streams is not built): first token
through a relay, throughput per link kind, TPOT; their keys hold null.

    python bench/nat.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import trio

from hexgen.daemon.relay import circuit_address
from hexgen.testing.daemon_harness import Daemon, open_client
from hexgen.testing.nat_lab import NatLab, View, check_nat_available, converge, link
from hexgen.testing.netns import NetnsUnavailable, start_daemon, stop_daemons

NOT_MEASURED = "the data plane over libp2p streams (issue 17 part 4) is not built"


async def measure(lab: NatLab, root: Path, started: list[Daemon]) -> dict[str, Any]:
    relay = start_daemon(lab.hosts["p1"], root, "relay", extra=["--relay"])
    started.append(relay)
    names = [name for name in lab.hosts if name.startswith("h")]

    def home(name: str) -> Daemon:
        return start_daemon(lab.hosts[name], root, name, gpu="H100", extra=["--relay-peer", relay.addr])

    with ThreadPoolExecutor(len(names)) as pool:
        homes = list(pool.map(home, names))
    started.extend(homes)
    ready = time.monotonic()
    addrs = {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}
    a, b = homes[0].peer_id, homes[1].peer_id

    def punched(view: View) -> bool:
        return link(view, a, b) == link(view, b, a) == "hole-punched"

    async with open_client() as client:
        await converge(client, addrs)
        joined = time.monotonic() - ready
        view = await converge(client, addrs, punched)
        hole_punch = time.monotonic() - ready
    out: dict[str, Any] = {"join_via_relay_s": round(joined, 2), "hole_punch_s": round(hole_punch, 2)}
    if len(homes) > 2:
        c = homes[2].peer_id
        out["symmetric_stays_relayed"] = all(link(view, x, c) == "relayed" for x in (a, b))
    return out


def run(quick: bool) -> dict[str, Any]:
    homes, symmetric = ((1, 1), ()) if quick else ((1, 1, 1), (False, False, True))
    lab = NatLab(homes=homes, symmetric=symmetric)
    started: list[Daemon] = []
    with tempfile.TemporaryDirectory() as root:
        try:
            lab.open()
            result = trio.run(measure, lab, Path(root), started)
        finally:
            stop_daemons(started)
            lab.close()
    return result | {
        "first_token_via_relay_s": None,
        "throughput": [],
        "tpot_ms": {"flat": None, "relayed": None, "hole_punched": None},
        "not_measured": NOT_MEASURED,
        "homes": len(homes),
        "quick": quick,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two homes, no symmetric NAT (under a minute)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()
    try:
        check_nat_available()
    except NetnsUnavailable as exc:
        print(f"nat benchmark: cannot build the NAT lab: {exc}", file=sys.stderr)
        return 2
    result = run(args.quick)
    for key in ("join_via_relay_s", "hole_punch_s", "symmetric_stays_relayed"):
        if key in result:
            print(f"{key:<26} {result[key]}")
    print(f"not measured: {NOT_MEASURED}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
