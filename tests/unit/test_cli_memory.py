"""`rolemesh check-fit`: the breakdown per device and host RAM, judged where it would run."""

from __future__ import annotations

import argparse
import json

import pytest

from rolemesh import cli, cli_memory
from rolemesh.memory_estimate import read_gguf_facts
from rolemesh.placement_memory import Placement, estimate_need
from rolemesh.tiny_gguf import LETTERS, write_tiny_model


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "moe.gguf", charset=LETTERS,
                            n_embd=128, n_layer=4, n_expert=8, n_ff=256)


def args(path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_memory.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["check-fit", str(path), *extra])


NODES = {"data": [
    {"node_id": "big", "host_memory_available_mb": 64000, "devices": [
        {"status": {"device_id": "gpu:0", "memory_total_mb": 24000}}]},
    {"node_id": "tiny", "devices": [{"status": {"device_id": "gpu:0", "memory_total_mb": 8}},
                                    {"status": {"device_id": "cpu", "memory_total_mb": 9000}}]},
]}


def test_every_registered_device_is_judged_with_its_breakdown(moe):
    text, fits = cli_memory.check_fit(args(moe, "--ctx-size", "1024"), NODES, cli.table)
    assert fits
    assert "big gpu:0: fits" in text
    assert "tiny gpu:0: no" in text
    assert "tiny cpu: fits" in text
    assert "8 experts (2 active)" in text


def test_experts_on_the_cpu_show_as_host_ram(moe):
    text, _ = cli_memory.check_fit(args(moe, "--cpu-moe", "--device-mb", "100"), None,
                                   cli.table)
    host_row = next(line for line in text.splitlines() if line.startswith("host RAM"))
    assert host_row.split()[2] != "0M"  # the experts' weights


def test_offline_without_sizes_prints_the_breakdown_only(moe, capsys):
    assert cli.main(["check-fit", str(moe), "--offline", "--cache-type-k", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "KV q8_0/f16" in out
    assert "gpu:0" in out


def test_a_bad_file_or_flag_is_a_clear_error(tmp_path, moe, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    assert cli.main(["check-fit", str(bad), "--offline"]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
    assert cli.main(["check-fit", str(moe), "--offline", "--cache-type-k", "q3"]) == 1
    assert "unknown KV cache type 'q3'" in capsys.readouterr().err


def test_the_breakdown_as_data_adds_up(moe):
    need = estimate_need(Placement(ctx_size=1024, n_cpu_moe=2), read_gguf_facts(moe),
                         ["gpu:0"])
    data = json.loads(json.dumps(need.as_dict()))
    assert data["per_device"]["gpu:0"]["total_mb"] == need.per_device_mb["gpu:0"]
    assert data["host"]["weights_mb"] == need.weights_host_mb
    assert data["host_pageable_mb"] == need.host_pageable_mb
