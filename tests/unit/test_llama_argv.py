"""build_argv: llama-server's command line from a model's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.config import ModelConfig
from node_agent.llama_argv import build_argv


def model(**kw: object) -> ModelConfig:
    return ModelConfig.model_validate({"model_id": "m1", "path": "/models/m1.gguf", **kw})


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_agent_owns_model_host_port_and_alias():
    argv = build_argv(Path("/bin/llama-server"), model(), 4321)
    assert argv[0] == "/bin/llama-server"
    assert flag_value(argv, "--model") == "/models/m1.gguf"
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "4321"
    assert flag_value(argv, "--alias") == "m1"
    assert flag_value(argv, "--parallel") == "1"


@pytest.mark.parametrize(("field", "value", "flag", "expected"), [
    ("ctx_size", 4096, "--ctx-size", "4096"),
    ("batch_size", 512, "--batch-size", "512"),
    ("ubatch_size", 128, "--ubatch-size", "128"),
    ("threads", 1, "--threads", "1"),
    ("threads_batch", 2, "--threads-batch", "2"),
    ("gpu_layers", 99, "--n-gpu-layers", "99"),
    ("gpu_layers", -1, "--n-gpu-layers", "-1"),
    ("main_gpu", 1, "--main-gpu", "1"),
    ("tensor_split", [3, 1], "--tensor-split", "3,1"),
    ("tensor_split", [0.75, 0.25], "--tensor-split", "0.75,0.25"),
    ("flash_attn", True, "--flash-attn", "on"),
    ("flash_attn", False, "--flash-attn", "off"),
    ("alias", "friendly", "--alias", "friendly"),
    ("parallel", 4, "--parallel", "4"),
])
def test_each_structured_field_becomes_its_flag(field, value, flag, expected):
    argv = build_argv("llama-server", model(**{field: value}), 1)
    assert flag_value(argv, flag) == expected
    assert argv.count(flag) == 1


def test_unset_fields_leave_llama_servers_own_defaults():
    argv = build_argv("llama-server", model(), 1)
    for flag in ("--ctx-size", "--threads", "--n-gpu-layers", "--flash-attn", "--embeddings"):
        assert flag not in argv


def test_embeddings_adds_mean_pooling():
    argv = build_argv("llama-server", model(embeddings=True), 1)
    assert "--embeddings" in argv
    assert flag_value(argv, "--pooling") == "mean"


def test_server_args_pass_values_switches_and_skip_false():
    argv = build_argv("llama-server", model(server_args={
        "--seed": 42, "--no-mmap": True, "--mlock": False, "--temp": 0.5, "--cont": None}), 1)
    assert flag_value(argv, "--seed") == "42"
    assert flag_value(argv, "--temp") == "0.5"
    assert "--no-mmap" in argv
    assert "--cont" in argv
    assert "--mlock" not in argv


def test_secrets_in_server_args_are_masked_in_the_logged_argv():
    from node_agent.llama_process import masked_argv

    argv = build_argv("llama-server", model(server_args={"--hf-token-x": "s3cret",
                                                        "--seed": 4}), 1)
    logged = masked_argv(argv)
    assert "s3cret" not in logged
    assert logged[logged.index("--hf-token-x") + 1] == "***"
    assert logged[logged.index("--seed") + 1] == "4"
    assert "s3cret" in argv  # llama-server itself still gets it


# -- memory placement fields (docs/memory.md) --------------------------------------------------

@pytest.mark.parametrize(("fields", "expected"), [
    ({"cache_type_k": "q8_0"}, ["--cache-type-k", "q8_0"]),
    ({"cache_type_v": "q4_0"}, ["--cache-type-v", "q4_0"]),
    ({"cache_type_k": "q4_0", "cache_type_v": "q4_0"},
     ["--cache-type-k", "q4_0", "--cache-type-v", "q4_0"]),
    ({"n_cpu_moe": 30}, ["--n-cpu-moe", "30"]),
    ({"cpu_moe": True}, ["--cpu-moe"]),
    ({"override_tensor": [r"\.ffn_.*_exps\.=CPU", r"blk\.1\.=CUDA0"]},
     ["--override-tensor", r"\.ffn_.*_exps\.=CPU", "--override-tensor", r"blk\.1\.=CUDA0"]),
    ({"override_tensor": ["exps=CPU"], "cpu_moe": True, "n_cpu_moe": 2},
     ["--override-tensor", "exps=CPU", "--cpu-moe", "--n-cpu-moe", "2"]),
], ids=["k", "v", "k and v", "n_cpu_moe", "cpu_moe", "two overrides", "overrides first"])
def test_memory_fields_become_their_flags_in_llama_cpps_order(fields, expected):
    argv = build_argv("llama-server", model(**fields), 1)
    start = argv.index(expected[0])
    assert argv[start:start + len(expected)] == expected


def test_a_projector_is_passed_with_mmproj(tmp_path):
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF")
    argv = build_argv("llama-server", model(mmproj=str(projector)), 1)
    assert flag_value(argv, "--mmproj") == str(projector)


def test_default_memory_fields_add_no_flags():
    argv = build_argv("llama-server", model(allow_disk_paging=True, n_cpu_moe=0), 1)
    for flag in ("--cache-type-k", "--cache-type-v", "--mmproj", "--n-cpu-moe", "--cpu-moe",
                 "--override-tensor"):
        assert flag not in argv
