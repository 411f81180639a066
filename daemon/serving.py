"""The serving side of a daemon that holds a checkpoint: its workers' supervisor, the request router, the
rendezvous of worlds it hosts, and the loop that keeps the workers on the adopted plan."""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio

from hexgen.daemon.deployment import DeploymentError, deployment_from_plan
from hexgen.daemon.host import Host, Stream, stream_peer
from hexgen.daemon.kv_relay import KvRelay
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.rate_limit import RateLimiter
from hexgen.daemon.reports import Reports
from hexgen.daemon.router import Router
from hexgen.daemon.rpc import RENDEZVOUS_PROTOCOL, RPC_TIMEOUT_S, call, serve_rpc
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.swarm_state import SwarmState
from hexgen.engine.bounds import SECRET_BYTES
from hexgen.engine.tokenizer import Tokenizer

log = logging.getLogger("hexgen.daemon")

# How long a store's daemon waits for the plan that puts an asker in one of its worlds (plans reach daemons
# a moment apart); the asker asks again until its world's start times out.
GRANT_WAIT_S = 3.0
MAX_PREFIX_CHARS = 256
RATE_BURST_S = 5.0  # a rate-limited peer may send this many seconds' worth of requests at once
DEPLOY_CHECK_S = 1.0


def store_socket(host: str) -> socket.socket:
    """A socket listening on a port of ``host`` that the system picked, for the store of worlds whose rank 0
    runs here: the store serves on this very socket, so no other server (this daemon's HTTP gateway asking
    for any free port, say) can take the port between its choice and the store's start."""
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class Serving:
    """Workers and requests of one daemon. Built once the host listens: the store binds where libp2p
    listens, and peers reach it where they reach this host."""

    def __init__(self, state: SwarmState, host: Host, reports: Reports, metrics: Metrics, max_context: int) -> None:
        config = state.config
        self.state = state
        self.host = host
        store = store_socket(config.host.listen_host)
        self.rendezvous = (host.hosts[0], int(store.getsockname()[1]))
        self.supervisor = Supervisor(
            state.peer_id,
            config.model,
            device=config.worker_device,
            threads=config.worker_threads,
            connect_timeout_s=config.connect_timeout_s,
            prefill_chunk=config.prefill_chunk,
        )
        self.supervisor.store_address = self.rendezvous
        self.supervisor.store_socket = store
        self.supervisor.on_failure = reports.report_failure
        self.supervisor.fetch_secret = self.fetch_secret
        self.kv_relay = KvRelay(host, state.peer_id, self.supervisor, member=lambda peer: state.may_ask(peer, None))
        self.supervisor.kv_pump = self.kv_relay.pump
        self.router = Router(
            host,
            state.peer_id,
            self.supervisor,
            Tokenizer.from_dir(config.model),
            max_context,
            state.may_ask,
            metrics=metrics,
            verify_fraction=config.verify_fraction,
            tamper_tokens=config.tamper_tokens,
            on_verdict=reports.report_verdict,
            limiter=RateLimiter(config.max_request_rate, RATE_BURST_S * config.max_request_rate),
            request_timeout_s=config.request_timeout_s,
            plan_error=self.plan_error,
        )

    def plan_error(self) -> str | None:
        """Why the adopted plan is not the swarm's best (or why there is none), in the coordinator's words."""
        plan = self.state.plan
        return plan.body.error or None if plan is not None else None

    def load(self) -> dict[str, Any]:
        """This node's serving load: requests in flight on its workers, tokens/s they produced lately."""
        return {
            "in_flight": len(self.supervisor.listeners),
            "tokens_per_s": round(self.router.meter.rate(trio.current_time()), 2),
            "requests": self.router.served,
        }

    async def deploy(self) -> None:
        """Keep the supervisor on the adopted plan's world (the rendezvous comes from the members' adverts)."""
        state = self.state
        failed_for: tuple[int, int] | None = None
        while True:
            plan = state.plan
            if plan is not None:
                rendezvous = {peer: a.rendezvous for peer, (_, a) in state.adverts.items() if a.rendezvous is not None}
                rendezvous[state.peer_id] = self.rendezvous
                try:
                    self.supervisor.want(deployment_from_plan(plan.body, rendezvous))
                    failed_for = None
                except DeploymentError as exc:
                    if failed_for != (plan.term, plan.epoch):
                        log.warning("cannot deploy plan epoch %d: %s", plan.epoch, exc)
                        failed_for = (plan.term, plan.epoch)
                    self.supervisor.want(None)
            await state.changed.wait(DEPLOY_CHECK_S)

    async def serve_rendezvous(self, stream: Stream) -> None:
        """Hands the store secret of a world this daemon hosts to a peer of that world, and to nobody else."""
        asker = stream_peer(stream)

        async def answer(request: dict[str, Any]) -> dict[str, Any]:
            prefix = request.get("prefix")
            if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_PREFIX_CHARS:
                return {"error": f"a rendezvous request names a world prefix of 1 to {MAX_PREFIX_CHARS} characters"}
            try:
                return {"secret": await self.supervisor.grant(asker, prefix, GRANT_WAIT_S)}
            except PermissionError as exc:
                self.state.reject("not-in-world", f"rendezvous request: {exc}")
                return {"error": str(exc)}

        await serve_rpc(stream, "rendezvous", answer, self.state.may_ask, self.state.reject)

    async def fetch_secret(self, head: str, prefix: str) -> bytes:
        """Ask the daemon of ``head`` for the store secret of the world under ``prefix``."""
        with trio.fail_after(RPC_TIMEOUT_S):
            request = self.state.credentials() | {"prefix": prefix}
            reply = await call(self.host, head, RENDEZVOUS_PROTOCOL, request)
        secret = reply.get("secret")
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise ValueError(reply.get("error") or "the rendezvous reply holds no secret")
        return secret
