"""Measured, then trusted, on a cuda node through the NVML seam: after one load the agent
reads what llama-server's process holds on its GPU, reports both figures, charges the
measured one, and keeps it for the next start."""

from __future__ import annotations

import aiohttp

from node_agent.backends.cuda import CudaBackend
from tests.agent_harness import agent_config, post_chat, running_agent
from tests.processes import llama_server_pids

MB = 1024 * 1024


class MeasuringNvml:
    """One 24 GB GPU; every live llama-server (the fake) is seen holding 3 GB on it."""

    def __init__(self) -> None:
        self.seen_pids: set[int] = set()

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return "Fake 24GB"

    def memory_bytes(self, index: int) -> tuple[int, int, int]:
        used = 3072 * MB * len(self.processes())
        return 24576 * MB, used, 24576 * MB - used

    def utilization_pct(self, index: int) -> float | None:
        return 0.0

    def processes(self) -> set[int]:
        return llama_server_pids()

    def process_memory_bytes(self, index: int) -> dict[int, int]:
        return dict.fromkeys(self.processes(), 3072 * MB)


async def test_the_measured_gpu_figure_replaces_the_estimate_and_is_kept(
        tmp_path, tiny_models, fake_llama_server_bin):
    config = agent_config(tmp_path, [{"model_id": "letters-1", "path": str(tiny_models["letters"]),
                                      "roles": ["chat"]}])
    backend = CudaBackend(MeasuringNvml())
    async with running_agent(config, fake_llama_server_bin, backend=backend) as agent, \
            aiohttp.ClientSession() as s:
        before = {m.model_id: m for m in agent.node.model_statuses()}["letters-1"]
        assert before.memory_source == "estimated"
        assert before.memory_need_mb < 3072
        status, _, _ = await post_chat(s, agent.url, "chat")
        assert status == 200
        (inst,) = agent.node.device_status("gpu:0").instances
        assert inst.memory_source == "measured"
        assert inst.memory_measured_mb == 3072
        assert inst.memory_charged_mb == 3072
        assert inst.memory_estimated_mb == before.memory_need_mb
        after = {m.model_id: m for m in agent.node.model_statuses()}["letters-1"]
        assert after.memory_source == "measured"
        assert after.memory_need_mb == 3072
        metrics = await (await s.get(agent.url + "/metrics")).text()
        assert 'rolemesh_agent_memory_estimate_error_ratio{device="gpu:0",model="letters-1"}' \
            in metrics
    again = agent_config(tmp_path, [{"model_id": "letters-1", "path": str(tiny_models["letters"]),
                                     "roles": ["chat"]}])
    async with running_agent(again, fake_llama_server_bin,
                             backend=CudaBackend(MeasuringNvml())) as agent:
        kept = {m.model_id: m for m in agent.node.model_statuses()}["letters-1"]
        assert kept.memory_source == "measured"
        assert kept.memory_need_mb == 3072
