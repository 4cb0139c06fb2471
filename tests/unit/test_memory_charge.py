"""The charge of an instance: the estimate until a load was measured, then the measurement."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.config import ModelConfig
from node_agent.footprints import Footprints
from node_agent.memory_charge import charge, read_model_memory
from rolemesh.memory_estimate import NotAGGUFFile
from rolemesh.tiny_gguf import LETTERS, write_tiny_model, write_tiny_projector


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("m") / "m.gguf", charset=LETTERS,
                            n_embd=256, n_layer=4)


def config(path: Path, **fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"model_id": "m", "path": str(path), "ctx_size": 2048,
                                       **fields})


def test_before_any_load_the_estimate_is_charged(model_file, tmp_path):
    memory = read_model_memory(config(model_file))
    c = charge(memory, ["cpu"], Footprints(tmp_path))
    assert c.source == "estimated"
    assert c.per_device_mb == memory.need(["cpu"]).per_device_mb
    assert c.measured_mb is None
    assert c.error_pct is None


def test_after_a_measured_load_the_measurement_is_charged_and_the_error_known(
        model_file, tmp_path):
    model = config(model_file)
    memory = read_model_memory(model)
    footprints = Footprints(tmp_path)
    estimate = charge(memory, ["cpu"], footprints).estimated_mb
    footprints.record(model, estimate * 2, ("cpu",))
    c = charge(memory, ["cpu"], Footprints(tmp_path))  # survives a restart
    assert (c.source, c.per_device_mb, c.measured_mb) == ("measured", {"cpu": estimate * 2},
                                                          estimate * 2)
    assert c.error_pct == -50.0


def test_a_gpu_group_uses_nvmls_per_device_figures(model_file, tmp_path):
    model = config(model_file, tensor_split=[1, 1])
    memory = read_model_memory(model)
    footprints = Footprints(tmp_path)
    footprints.record(model, 900, ("gpu:0", "gpu:1"), per_device_mb={"gpu:0": 500,
                                                                      "gpu:1": 400})
    c = charge(memory, ["gpu:0", "gpu:1"], footprints)
    assert c.source == "measured"
    assert c.per_device_mb == {"gpu:0": 500, "gpu:1": 400}
    # a total alone cannot be split over two devices: the estimate stays
    only_total = Footprints(tmp_path / "other")
    only_total.record(model, 900, ("gpu:0", "gpu:1"))
    assert charge(memory, ["gpu:0", "gpu:1"], only_total).source == "estimated"


def test_a_changed_config_goes_back_to_the_estimate(model_file, tmp_path):
    footprints = Footprints(tmp_path)
    footprints.record(config(model_file), 123, ("cpu",))
    bigger = read_model_memory(config(model_file, ctx_size=8192))
    assert charge(bigger, ["cpu"], footprints).source == "estimated"


def test_the_projector_is_read_once_with_the_model(model_file, tmp_path):
    mmproj = write_tiny_projector(tmp_path / "mmproj.gguf", text_n_embd=256, n_embd=128)
    memory = read_model_memory(config(model_file, mmproj=str(mmproj)))
    assert memory.projector_bytes > mmproj.stat().st_size // 2
    assert memory.need(["gpu:0"]).per_device["gpu:0"].projector_bytes == memory.projector_bytes


def test_a_model_file_that_is_not_a_gguf_says_so(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    with pytest.raises(NotAGGUFFile):
        read_model_memory(config(bad))
