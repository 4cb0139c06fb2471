"""The node scheduler through its launcher seam: queueing, co-residency, eviction, TTL,
pinned restarts, unload and drain, with fake processes (no llama-server, no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import NodeAgentConfig
from node_agent.llama_process import StartFailed
from node_agent.scheduler import Budget, NodeScheduler
from rolemesh.api import InstanceState, StopReason
from rolemesh.errors import DeviceBusy, ModelNotReady, NodeDraining, QueueTimeout
from tests.waiting import wait_until as async_wait_until


class FakeProcess:
    def __init__(self, launcher: FakeLauncher, model_id: str) -> None:
        self.launcher = launcher
        self.model_id = model_id
        self.pid = 1000 + len(launcher.started)
        self.base_url = f"http://fake/{model_id}"
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait_exit(self) -> int:
        return await self.exited

    async def stop(self, grace_s: float) -> int:
        self.launcher.stopped.append(self.model_id)
        if not self.exited.done():
            self.exited.set_result(0)
        return 0

    def crash(self) -> None:
        self.exited.set_result(-9)

    def tail_text(self, lines: int = 12) -> str:
        return "fake output"


class FakeLauncher:
    """Starts 'processes' that are ready after `load_s`, or fail for models in `broken`."""

    def __init__(self, load_s: float = 0.0) -> None:
        self.load_s = load_s
        self.started: list[tuple[str, tuple[str, ...]]] = []
        self.stopped: list[str] = []
        self.running: dict[str, FakeProcess] = {}
        self.broken: set[str] = set()
        self.gate: asyncio.Event | None = None

    async def launch(self, model: Any, devices: tuple[str, ...]) -> FakeProcess:
        self.started.append((model.model_id, devices))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.load_s)
        if model.model_id in self.broken:
            raise StartFailed(f"{model.model_id} cannot load", exited=True)
        proc = FakeProcess(self, model.model_id)
        self.running[model.model_id] = proc
        return proc


def config(tmp_path: Path, models: list[dict[str, Any]], **kw: Any) -> NodeAgentConfig:
    for m in models:
        m.setdefault("path", str(tmp_path / f"{m['model_id']}.gguf"))
    return NodeAgentConfig.model_validate({"node_id": "n", "state_dir": str(tmp_path),
                                           "models": models, **kw})


def scheduler(cfg: NodeAgentConfig, launcher: FakeLauncher, gpus: list[int],
              queue_timeout_s: float = 5.0) -> NodeScheduler:
    ids = [f"gpu:{i}" for i in range(len(gpus))]
    budgets = {d: Budget(mb, None) for d, mb in zip(ids, gpus, strict=True)}
    needs = {m.model_id: m.memory_mb or 1000 for m in cfg.models}
    return NodeScheduler(cfg, ids, lambda: budgets, needs, launcher,
                         queue_timeout_s=queue_timeout_s)


async def ask(s: NodeScheduler, model_id: str, devices: tuple[str, ...] = ("gpu:0",),
              hold: asyncio.Event | None = None) -> str:
    model = s.config.model(model_id)
    assert model is not None
    async with s.lease(model, devices) as inst:
        if hold is not None:
            await hold.wait()
        return inst.model_id


def resident(s: NodeScheduler) -> set[str]:
    return {i.model_id for i in s.instances.values() if i.state is InstanceState.READY}


async def test_two_models_that_fit_together_alternate_with_exactly_two_loads(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a", "memory_mb": 4000},
                                    {"model_id": "b", "memory_mb": 4000}]), launcher, [12_000])
    for _ in range(5):
        assert await ask(s, "a") == "a"
        assert await ask(s, "b") == "b"
    assert launcher.started == [("a", ("gpu:0",)), ("b", ("gpu:0",))]
    assert resident(s) == {"a", "b"}
    await s.shutdown()


async def test_with_co_residency_off_every_alternation_is_a_restart(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a", "memory_mb": 4000},
                                    {"model_id": "b", "memory_mb": 4000}], co_residency=False),
                  launcher, [12_000])
    for _ in range(3):
        await ask(s, "a")
        await ask(s, "b")
    assert len(launcher.started) == 6
    await s.shutdown()


async def test_an_instance_with_requests_in_flight_is_never_stopped_by_an_eviction(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a", "memory_mb": 8000},
                                    {"model_id": "b", "memory_mb": 8000}],
                         max_switch_wait_s=0.0), launcher, [12_000])
    s.load_seconds["b"] = 0.0  # patience is never shorter than b's load: make it nothing
    hold = asyncio.Event()
    first = asyncio.create_task(ask(s, "a", hold=hold))
    await async_wait_until(lambda: resident(s) == {"a"})
    second = asyncio.create_task(ask(s, "b"))
    await asyncio.sleep(0.05)
    assert launcher.stopped == []  # a is busy: b waits, a is draining at most
    assert s.instances["a@gpu:0"].state is InstanceState.DRAINING
    hold.set()
    assert await first == "a"
    assert await second == "b"
    assert launcher.stopped == ["a"]
    assert s.stops[-1].reason is StopReason.EVICTED_FOR
    assert s.stops[-1].detail == "b"
    await s.shutdown()


async def test_an_idle_model_is_unloaded_after_its_ttl_with_no_traffic_at_all(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a", "ttl_s": 0.2}]), launcher, [12_000])
    await ask(s, "a")
    assert resident(s) == {"a"}
    await async_wait_until(lambda: not s.instances, timeout_s=5)
    assert s.stops[-1].reason is StopReason.TTL
    await s.shutdown()


async def test_a_pinned_model_loads_at_start_and_comes_back_after_a_crash(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "embed", "pinned": True}]), launcher, [8_000])
    s.start()
    await async_wait_until(lambda: resident(s) == {"embed"})
    launcher.running["embed"].crash()
    await async_wait_until(lambda: len(launcher.started) == 2 and resident(s) == {"embed"})
    assert s.instances["embed@gpu:0"].restarts == 1
    assert [st.reason for st in s.stops] == [StopReason.CRASH]
    await s.shutdown()


async def test_preloaded_models_load_at_start_and_stay_evictable(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a", "memory_mb": 8000, "preload": True},
                                    {"model_id": "b", "memory_mb": 8000}]), launcher, [12_000])
    s.start()
    await async_wait_until(lambda: resident(s) == {"a"})
    assert await ask(s, "b") == "b"
    assert resident(s) == {"b"}
    await s.shutdown()


async def test_a_model_whose_load_fails_is_refused_fast_during_its_backoff(tmp_path):
    launcher = FakeLauncher()
    launcher.broken.add("a")
    s = scheduler(config(tmp_path, [{"model_id": "a"}], load_failure_backoff_s=60.0),
                  launcher, [8_000])
    with pytest.raises(ModelNotReady, match=r"cannot load|failed to load"):
        await ask(s, "a")
    with pytest.raises(ModelNotReady, match="next try in"):
        await ask(s, "a")
    assert len(launcher.started) == 1  # not retried on every request
    assert "a" in s.failed_models("gpu:0")
    await s.shutdown()


async def test_a_full_queue_is_busy_at_once_and_a_long_wait_is_a_queue_timeout(tmp_path):
    launcher = FakeLauncher()
    launcher.gate = asyncio.Event()  # loads never finish
    s = scheduler(config(tmp_path, [{"model_id": "a"}], max_pending_requests_per_device=2),
                  launcher, [8_000], queue_timeout_s=0.2)
    waiting = [asyncio.create_task(ask(s, "a")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(DeviceBusy):
        await ask(s, "a")
    for task in waiting:
        with pytest.raises(QueueTimeout):
            await task
    launcher.gate.set()
    await s.shutdown()


async def test_unload_waits_for_the_request_in_flight_then_stops_with_its_reason(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a"}]), launcher, [8_000])
    hold = asyncio.Event()
    busy = asyncio.create_task(ask(s, "a", hold=hold))
    await async_wait_until(lambda: resident(s) == {"a"})
    unloading = asyncio.create_task(s.unload("a"))
    await asyncio.sleep(0.05)
    assert not unloading.done()
    assert launcher.stopped == []
    hold.set()
    assert await busy == "a"
    assert await unloading == ["a@gpu:0"]
    assert s.stops[-1].reason is StopReason.UNLOAD
    await s.shutdown()


async def test_drain_refuses_new_requests_stops_models_and_undrain_resumes(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "a"}]), launcher, [8_000])
    await ask(s, "a")
    s.drain()
    await async_wait_until(lambda: not s.instances)
    assert s.stops[-1].reason is StopReason.DRAIN
    with pytest.raises(NodeDraining):
        await ask(s, "a")
    s.undrain()
    assert await ask(s, "a") == "a"
    await s.shutdown()


async def test_a_model_split_over_two_gpus_is_charged_to_both(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "big", "memory_mb": 20_000,
                                     "devices": ["gpu:0", "gpu:1"], "tensor_split": [1, 1.5]},
                                    {"model_id": "chat", "memory_mb": 3_000}]),
                  launcher, [12_000, 24_000])
    assert await ask(s, "big", ("gpu:0", "gpu:1")) == "big"
    assert s.charged_on("gpu:0") == 8_000
    assert s.charged_on("gpu:1") == 12_000
    assert await ask(s, "chat", ("gpu:1",)) == "chat"  # beside it, in what is left
    assert launcher.started[0] == ("big", ("gpu:0", "gpu:1"))
    await s.shutdown()


async def test_holding_a_device_for_a_set_loads_it_and_keeps_others_off(tmp_path):
    launcher = FakeLauncher()
    s = scheduler(config(tmp_path, [{"model_id": "architect", "memory_mb": 6000},
                                    {"model_id": "builder", "memory_mb": 6000}],
                         sets={"arch": ["architect"], "build": ["builder"]}),
                  launcher, [12_000])
    await ask(s, "builder")
    s.hold("gpu:0", "arch")
    await async_wait_until(lambda: resident(s) == {"architect"})
    assert s.stops[-1].reason is StopReason.MODE
    with pytest.raises(ModelNotReady):
        await ask(s, "builder")
    s.hold("gpu:0", None)
    assert await ask(s, "builder") == "builder"
    await s.shutdown()


async def test_a_pinned_model_that_started_on_the_cpu_moves_to_the_gpu_once_it_has_room(
        tmp_path):
    launcher = FakeLauncher()
    cfg = config(tmp_path, [{"model_id": "filler", "memory_mb": 7000},
                            {"model_id": "embed", "memory_mb": 2000, "pinned": True}])
    budgets = {"gpu:0": Budget(8000, None), "cpu": Budget(64_000, None)}
    s = NodeScheduler(cfg, ["gpu:0", "cpu"], lambda: budgets,
                      {"filler": 7000, "embed": 2000}, launcher, queue_timeout_s=5.0)
    hold = asyncio.Event()
    busy = asyncio.create_task(ask(s, "filler", hold=hold))  # the GPU is taken and busy
    await async_wait_until(lambda: "filler" in resident(s))
    s.start()  # the pinned model finds no room on the GPU: the CPU takes it
    await async_wait_until(lambda: "embed@cpu" in s.instances
                           and s.instances["embed@cpu"].state is InstanceState.READY)
    hold.set()
    await busy
    await s.unload("filler")  # the GPU has room again: embed moves back by itself
    await async_wait_until(lambda: set(s.instances) == {"embed@gpu:0"})
    assert s.stops[-1].reason is StopReason.MOVED
    assert s.stops[-1].detail == "gpu:0"
    await s.shutdown()
