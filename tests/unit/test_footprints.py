"""Measured footprints: kept per model and config fingerprint, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node_agent.config import ModelConfig
from node_agent.footprints import FILE_NAME, Footprints, fingerprint


def model(tmp_path: Path, **fields: object) -> ModelConfig:
    path = tmp_path / "m.gguf"
    if not path.exists():
        path.write_bytes(b"GGUF" + b"\0" * 100)
    return ModelConfig.model_validate({"model_id": "m", "path": str(path), **fields})


def test_a_recorded_figure_is_found_again_after_a_restart(tmp_path):
    Footprints(tmp_path).record(model(tmp_path, ctx_size=4096), 5321,
                                per_device_mb={"gpu:0": 5000})
    again = Footprints(tmp_path)
    assert again.lookup(model(tmp_path, ctx_size=4096)) == 5321
    assert again.lookup_per_device(model(tmp_path, ctx_size=4096)) == {"gpu:0": 5000}


def test_nothing_measured_is_none(tmp_path):
    assert Footprints(tmp_path / "fresh").lookup(model(tmp_path)) is None


@pytest.mark.parametrize("changed", [
    {"ctx_size": 8192}, {"parallel": 2}, {"cache_type_k": "q8_0"}, {"n_cpu_moe": 4},
    {"gpu_layers": 10}, {"override_tensor": ["exps=CPU"]}, {"server_args": {"--seed": 1}},
])
def test_a_config_that_changes_memory_is_estimated_again(tmp_path, changed):
    store = Footprints(tmp_path)
    store.record(model(tmp_path, ctx_size=4096), 5321)
    assert store.lookup(model(tmp_path, **{"ctx_size": 4096, **changed})) is None


def test_roles_alias_and_threads_keep_the_measurement(tmp_path):
    store = Footprints(tmp_path)
    store.record(model(tmp_path), 800)
    assert store.lookup(model(tmp_path, roles=["chat"], alias="x", threads=3)) == 800


def test_a_replaced_model_file_is_measured_again(tmp_path):
    store = Footprints(tmp_path)
    m = model(tmp_path)
    store.record(m, 800)
    before = fingerprint(m)
    m.path.write_bytes(b"GGUF" + b"\0" * 5000)
    assert fingerprint(m) != before
    assert store.lookup(m) is None


def test_the_file_is_json_written_whole_and_a_torn_one_is_ignored(tmp_path):
    store = Footprints(tmp_path)
    store.record(model(tmp_path), 800)
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert list(data.values()) == [{"total_mb": 800}]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".footprints-")] == []
    (tmp_path / FILE_NAME).write_text('{"m@abc": {"total_')
    assert Footprints(tmp_path).lookup(model(tmp_path)) is None


def test_a_negative_figure_is_refused(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        Footprints(tmp_path).record(model(tmp_path), -1)
