"""Device backends: real figures from a real source, or a clear refusal."""

from __future__ import annotations

import json

import pytest

from node_agent.backends import BackendUnavailable
from node_agent.backends.cpu import CpuBackend, read_meminfo
from node_agent.backends.cuda import CudaBackend
from node_agent.backends.other import MetalBackend, RocmBackend, parse_rocm_smi
from node_agent.backends.select import select_backend

MB = 1024 * 1024


class FakeNvml:
    """NVML behind the backend's seam: fixed GPUs, records shutdown."""

    def __init__(self, gpus: list[tuple[str, int, int]], fail_init: bool = False,
                 processes: dict[int, dict[int, int]] | None = None) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.shut_down = False
        self.processes = processes or {}  # gpu index -> {pid: bytes}, as NVML reports it

    def init(self) -> None:
        if self.fail_init:
            raise BackendUnavailable("cuda backend: NVML could not start (driver not loaded)")

    def shutdown(self) -> None:
        self.shut_down = True

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, index: int) -> str:
        return self.gpus[index][0]

    def memory_bytes(self, index: int) -> tuple[int, int, int]:
        _, total, used = self.gpus[index]
        return total, used, total - used

    def utilization_pct(self, index: int) -> float | None:
        return 10.0 * index if index else None

    def process_memory_bytes(self, index: int) -> dict[int, int]:
        return dict(self.processes.get(index, {}))


def test_cuda_backend_reports_each_gpu_pinned_by_index():
    nvml = FakeNvml([("RTX 4090", 24564 * MB, 1000 * MB), ("RTX 3090", 24576 * MB, 0)])
    devices = CudaBackend(nvml).devices()
    assert [d.device_id for d in devices] == ["gpu:0", "gpu:1"]
    assert devices[0].name == "RTX 4090"
    assert (devices[0].memory_total_mb, devices[0].memory_used_mb,
            devices[0].memory_free_mb) == (24564, 1000, 23564)
    assert devices[0].utilization_pct is None  # unknown stays unknown
    assert devices[1].utilization_pct == 10.0
    assert dict(devices[1].pin_env) == {"CUDA_VISIBLE_DEVICES": "1"}


def test_cuda_backend_with_no_gpu_refuses_and_shuts_nvml_down():
    nvml = FakeNvml([])
    with pytest.raises(BackendUnavailable, match="sees no GPU"):
        CudaBackend(nvml)
    assert nvml.shut_down


def test_cuda_backend_without_a_driver_says_so():
    with pytest.raises(BackendUnavailable, match="NVML could not start"):
        CudaBackend(FakeNvml([], fail_init=True))


def test_meminfo_gives_total_and_available_in_mb():
    text = "MemTotal:       16384000 kB\nMemFree:  1000 kB\nMemAvailable:   8192000 kB\n"
    assert read_meminfo(text) == (16000, 8000)


def test_cpu_backend_reads_this_hosts_ram_and_hides_gpus_from_its_child():
    (cpu,) = CpuBackend().devices()
    assert cpu.device_id == "cpu"
    assert cpu.memory_total_mb
    assert cpu.memory_total_mb > 0
    assert cpu.memory_free_mb is not None
    assert 0 <= cpu.memory_free_mb <= cpu.memory_total_mb
    assert dict(cpu.pin_env) == {"CUDA_VISIBLE_DEVICES": ""}


def test_rocm_smi_json_is_parsed_into_devices():
    text = json.dumps({
        "card0": {"VRAM Total Memory (B)": str(16 * 1024 * MB),
                  "VRAM Total Used Memory (B)": str(1024 * MB), "Card series": "RX 7800 XT"},
        "card1": {"VRAM Total Memory (B)": str(8 * 1024 * MB),
                  "VRAM Total Used Memory (B)": "0"},
        "system": {"Driver version": "6.7"},
    })
    devices = parse_rocm_smi(text)
    assert [(d.device_id, d.memory_total_mb, d.memory_free_mb) for d in devices] == [
        ("gpu:0", 16384, 15360), ("gpu:1", 8192, 8192)]
    assert devices[0].name == "RX 7800 XT"
    assert dict(devices[1].pin_env) == {"HIP_VISIBLE_DEVICES": "1"}


def test_rocm_backend_uses_rocm_smi_through_its_runner():
    text = json.dumps({"card0": {"VRAM Total Memory (B)": str(1024 * MB),
                                 "VRAM Total Used Memory (B)": "0"}})
    backend = RocmBackend(run=lambda argv: text)
    assert backend.devices()[0].memory_total_mb == 1024


def test_metal_backend_needs_macos():
    with pytest.raises(BackendUnavailable, match="needs macOS"):
        MetalBackend(platform="linux")


def test_metal_backend_reads_unified_memory_and_admits_used_is_unknown():
    backend = MetalBackend(run=lambda argv: str(32 * 1024 * MB) + "\n", platform="darwin")
    (gpu,) = backend.devices()
    assert gpu.memory_total_mb == 32768
    assert gpu.memory_used_mb is None
    assert gpu.memory_free_mb is None


@pytest.mark.parametrize("name", ["vulkan", "sycl"])
def test_backends_without_a_real_source_refuse_by_name(name):
    with pytest.raises(BackendUnavailable, match=f"{name} backend: not supported"):
        select_backend(name)


def test_auto_falls_back_to_cpu_on_a_host_without_nvidia_gpus():
    backend = select_backend("auto")
    assert backend.name in ("cpu", "cuda")
    assert backend.devices()


def test_cuda_backend_measures_a_process_tree_per_gpu_from_nvml():
    nvml = FakeNvml([("A", 24 * 1024 * MB, 0), ("B", 24 * 1024 * MB, 0)],
                    processes={0: {100: 5000 * MB, 999: 300 * MB}, 1: {101: 2500 * MB + 1}})
    backend = CudaBackend(nvml)
    # pid 100 is the llama-server, 101 its child; 999 is somebody else's
    assert backend.process_memory_mb([100, 101]) == {"gpu:0": 5000, "gpu:1": 2501}
    assert backend.process_memory_mb([100]) == {"gpu:0": 5000}
    assert backend.process_memory_mb([42]) == {}
