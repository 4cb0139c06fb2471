"""The agent registers with a dispatcher, heartbeats, and re-registers when forgotten."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from rolemesh.api import HeartbeatRequest, RegisterRequest
from tests.agent_harness import agent_config, running_agent
from tests.waiting import free_port, wait_until


@dataclass
class FakeDispatcher:
    """Records what agents send; can forget a node or be away."""

    token: str
    interval_s: float = 0.05
    registers: list[RegisterRequest] = field(default_factory=list)
    heartbeats: list[HeartbeatRequest] = field(default_factory=list)
    auth_seen: list[str] = field(default_factory=list)
    known: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/nodes/register", self.register)
        app.router.add_post("/v1/nodes/heartbeat", self.heartbeat)
        return app

    async def register(self, request: web.Request) -> web.Response:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"code": "invalid_token"}}, status=401)
        reg = RegisterRequest.model_validate_json(await request.read())
        self.registers.append(reg)
        self.known.add(reg.inventory.node_id)
        return web.json_response({"node_id": reg.inventory.node_id,
                                  "heartbeat_interval_s": self.interval_s})

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        beat = HeartbeatRequest.model_validate_json(await request.read())
        if beat.node_id not in self.known:
            return web.json_response({"error": {"code": "node_not_found"}}, status=404)
        self.heartbeats.append(beat)
        return web.json_response({"accepted": True, "heartbeat_interval_s": self.interval_s})


async def test_agent_registers_heartbeats_at_the_dispatchers_pace_and_reregisters_after_404(
        tmp_path, tiny_models, fake_llama_server_bin):
    fake = FakeDispatcher(token="tok")
    port = free_port()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    models = [{"model_id": "letters-1", "path": str(tiny_models["letters"])}]
    # The agent's own interval is long: the beats below come at the dispatcher's 0.05 s.
    config = agent_config(tmp_path, models, cluster_token="tok", heartbeat_interval_s=30,
                          dispatcher_base_url=f"http://127.0.0.1:{port}")
    try:
        async with running_agent(config, fake_llama_server_bin):
            await wait_until(lambda: len(fake.heartbeats) >= 3, what="heartbeats")
            inv = fake.registers[0].inventory
            assert inv.node_id == "node-a"
            assert inv.url == config.url
            assert [m.model_id for m in inv.models] == ["letters-1"]
            seqs = [h.seq for h in fake.heartbeats]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)
            assert seqs[0] > inv.seq
            assert set(fake.auth_seen) == {"Bearer tok"}
            assert fake.heartbeats[0].models is not None
            assert all(h.models is None for h in fake.heartbeats[1:3])  # nothing changed
            fake.known.clear()  # the dispatcher restarts and forgets the node
            await wait_until(lambda: len(fake.registers) >= 2, what="re-registration")
    finally:
        await runner.cleanup()


async def test_agent_keeps_retrying_while_the_dispatcher_is_away(
        tmp_path, tiny_models, fake_llama_server_bin):
    fake = FakeDispatcher(token="tok")
    port = free_port()
    models = [{"model_id": "letters-1", "path": str(tiny_models["letters"])}]
    config = agent_config(tmp_path, models, cluster_token="tok", heartbeat_interval_s=0.05,
                          dispatcher_base_url=f"http://127.0.0.1:{port}")
    async with running_agent(config, fake_llama_server_bin):
        runner = web.AppRunner(fake.app())  # the dispatcher comes up after the agent
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await wait_until(lambda: len(fake.registers) >= 1, timeout_s=10,
                             what="registration once the dispatcher is up")
        finally:
            await runner.cleanup()
