"""llama-server's command line from a model's config: a pure function."""

from __future__ import annotations

from pathlib import Path

from node_agent.config import ModelConfig


def _flag_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_argv(binary: str | Path, model: ModelConfig, port: int) -> list[str]:
    argv = [str(binary), "--model", str(model.path), "--host", "127.0.0.1",
            "--port", str(port), "--alias", model.alias or model.model_id,
            "--parallel", str(model.parallel)]
    numeric = {
        "--ctx-size": model.ctx_size,
        "--batch-size": model.batch_size,
        "--ubatch-size": model.ubatch_size,
        "--threads": model.threads,
        "--threads-batch": model.threads_batch,
        "--n-gpu-layers": model.gpu_layers,
        "--main-gpu": model.main_gpu,
    }
    for flag, number in numeric.items():
        if number is not None:
            argv += [flag, str(number)]
    if model.tensor_split is not None:
        argv += ["--tensor-split", ",".join(_flag_value(v) for v in model.tensor_split)]
    if model.split_mode is not None:
        argv += ["--split-mode", model.split_mode]
    if model.flash_attn is not None:
        argv += ["--flash-attn", _flag_value(model.flash_attn)]
    if model.embeddings:
        argv += ["--embeddings", "--pooling", "mean"]
    argv += _memory_flags(model)
    for flag, value in model.server_args.items():
        if value is None or value is True:
            argv.append(flag)  # a bare switch such as --metrics
        elif value is False:
            continue
        else:
            argv += [flag, _flag_value(value)]
    return argv


def _memory_flags(model: ModelConfig) -> list[str]:
    """KV cache types, projector, and where tensors go (rolemesh.placement_memory reads the
    same fields in the same order: overrides first, then --cpu-moe, then --n-cpu-moe)."""
    argv = []
    if model.cache_type_k != "f16":
        argv += ["--cache-type-k", model.cache_type_k]
    if model.cache_type_v != "f16":
        argv += ["--cache-type-v", model.cache_type_v]
    if model.mmproj is not None:
        argv += ["--mmproj", str(model.mmproj)]
    for override in model.override_tensor:
        argv += ["--override-tensor", override]
    if model.cpu_moe:
        argv.append("--cpu-moe")
    if model.n_cpu_moe:
        argv += ["--n-cpu-moe", str(model.n_cpu_moe)]
    return argv
