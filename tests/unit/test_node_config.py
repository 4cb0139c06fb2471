"""The node agent's config: defaults, every way a file can be wrong, and the shipped examples.

Errors are checked as the operator reads them: `file: a.b.c: problem`.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from node_agent.config import AGENT_OWNED_FLAGS, STRUCTURED_FLAGS, ModelConfig, NodeAgentConfig
from rolemesh.config_loading import ConfigError, load_config, load_config_file

ROOT = Path(__file__).resolve().parents[2]
NODE_CONFIGS = sorted((ROOT / "configs").glob("node*.yaml"))

ONE_MODEL = """
models:
  - model_id: qwen-7b
    path: ./models/qwen-7b.gguf
"""


def load(text: str) -> NodeAgentConfig:
    return load_config(text, NodeAgentConfig, source="n.yaml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return str(caught.value)


def with_model(**fields: object) -> str:
    model = {"model_id": "qwen-7b", "path": "./models/qwen-7b.gguf", **fields}
    return yaml.safe_dump({"models": [model]})


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROLEMESH_CLUSTER_TOKEN", raising=False)


# -- defaults ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "default"), [
    ("listen_host", "127.0.0.1"),
    ("listen_port", 8081),
    ("heartbeat_interval_s", 5.0),
    ("max_pending_requests_per_device", 4),
    ("llama_server_startup_timeout_s", 30.0),
    ("llama_server_probe_interval_s", 0.5),
    ("llama_server_stop_grace_s", 5.0),
    ("max_switch_wait_s", 30.0),
    ("request_timeout_s", 600.0),
    ("memory_safety_margin", 0.9),
    ("backend", "auto"),
    ("devices", None),
    ("advertise_url", None),
    ("dispatcher_base_url", None),
    ("cluster_token", None),
    ("llama_server_bin", None),
    ("log_format", "json"),
    ("log_level", "info"),
    ("models", []),
])
def test_an_empty_file_gives_the_default(key: str, default: object) -> None:
    assert getattr(load(""), key) == default


def test_the_node_id_defaults_to_the_hostname() -> None:
    assert load("").node_id == socket.gethostname()


def test_the_state_dir_defaults_under_the_home_directory() -> None:
    assert load("").state_dir == Path.home() / ".local/state/rolemesh"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"],
                         ids=["empty", "blank lines", "only a comment", "an empty document"])
def test_a_file_with_no_keys_is_all_defaults(text: str) -> None:
    assert load(text) == load("")


@pytest.mark.parametrize(("key", "default"), [
    ("roles", []), ("ctx_size", None), ("gpu_layers", None), ("parallel", 1),
    ("embeddings", False), ("server_args", {}), ("alias", None), ("tensor_split", None),
])
def test_a_model_gets_the_default(key: str, default: object) -> None:
    (model,) = load(ONE_MODEL).models
    assert getattr(model, key) == default


def test_the_url_is_built_from_host_and_port_unless_advertised() -> None:
    assert load("listen_port: 9000\n").url == "http://127.0.0.1:9000"
    assert load("advertise_url: http://box.lan:9000/\n").url == "http://box.lan:9000"
    assert load("listen_host: 0.0.0.0\n").url == f"http://{socket.gethostname()}:8081"


# -- errors: `file: key.path: problem` --------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("foo: 1\n", "n.yaml: foo: unknown key"),
    (with_model(foo=1), "n.yaml: models.0.foo: unknown key"),
    (yaml.safe_dump({"models": [{"model_id": "a", "path": "a.gguf"},
                                {"model_id": "b", "path": "b.gguf", "ctx": 4096}]}),
     "n.yaml: models.1.ctx: unknown key"),
    (with_model(extra={"nested": True}), "n.yaml: models.0.extra: unknown key"),
    ("listen_port: 70000\n", "n.yaml: listen_port: Input should be less than or equal to 65535"),
    ("listen_port: http\n", "n.yaml: listen_port: Input should be a valid integer, unable to "
                            "parse string as an integer"),
    ("heartbeat_interval_s: 0\n", "n.yaml: heartbeat_interval_s: Input should be greater than 0"),
    ("max_pending_requests_per_device: 0\n",
     "n.yaml: max_pending_requests_per_device: Input should be greater than or equal to 1"),
    ("memory_safety_margin: 1.5\n",
     "n.yaml: memory_safety_margin: Input should be less than or equal to 1"),
    ("log_level: loud\n",
     "n.yaml: log_level: Input should be 'debug', 'info', 'warning' or 'error'"),
    ("backend: opencl\n", "n.yaml: backend: Input should be 'auto', 'cuda', 'cpu', 'rocm', "
                          "'metal', 'vulkan' or 'sycl'"),
    ("models:\n  - model_id: a\n", "n.yaml: models.0.path: Field required"),
    ("models:\n  - path: a.gguf\n", "n.yaml: models.0.model_id: Field required"),
    (with_model(model_id="has space"),
     "n.yaml: models.0.model_id: String should match pattern '^[A-Za-z0-9._:/@+-]+$'"),
    (with_model(parallel=0), "n.yaml: models.0.parallel: Input should be greater than or "
                             "equal to 1"),
    (with_model(ctx_size=8), "n.yaml: models.0.ctx_size: Input should be greater than or "
                             "equal to 16"),
    (with_model(roles=["chat bot"]), "n.yaml: models.0.roles: 'chat bot' is not a role name"),
    (with_model(roles=[""]), "n.yaml: models.0.roles: '' is not a role name"),
    ("models: {a: 1}\n", "n.yaml: models: Input should be a valid list"),
], ids=[
    "an unknown top-level key",
    "an unknown key in a model",
    "an unknown key in the second model names its index",
    "an unknown key holding a mapping",
    "a port out of range",
    "a port that is not a number",
    "a zero heartbeat interval",
    "a pending limit of zero",
    "a safety margin over one",
    "an unknown log level",
    "an unknown backend",
    "a model without a path",
    "a model without an id",
    "a model id with a space",
    "a parallel of zero",
    "a context too small to use",
    "a role with a space",
    "an empty role",
    "models as a mapping instead of a list",
])
def test_a_bad_value_is_reported_with_its_key_path(text: str, message: str) -> None:
    assert error_of(text) == message


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    text = "foo: 1\nlisten_port: -1\nmodels:\n  - {model_id: a, path: a.gguf, bar: 2}\n"
    assert sorted(error_of(text).splitlines()) == [
        "n.yaml: foo: unknown key",
        "n.yaml: listen_port: Input should be greater than or equal to 0",
        "n.yaml: models.0.bar: unknown key",
    ]


@pytest.mark.parametrize(("text", "starts"), [
    ("models: [\n", "n.yaml: not valid YAML: "),
    ("a: b: c\n", "n.yaml: not valid YAML: "),
    ("- listen_port: 1\n", "n.yaml: the top level must be a mapping, not list"),
    ("just a string\n", "n.yaml: the top level must be a mapping, not str"),
    ("42\n", "n.yaml: the top level must be a mapping, not int"),
], ids=["an unclosed list", "a colon inside a plain value", "a list at the top level",
        "a string at the top level", "a number at the top level"])
def test_a_file_that_is_not_a_yaml_mapping_is_rejected(text: str, starts: str) -> None:
    assert error_of(text).startswith(starts)


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read: "):
        load_config_file(missing, NodeAgentConfig)


# -- server_args ------------------------------------------------------------------------------

STRUCTURED_LONG = sorted(
    (flag, field) for field, flags in STRUCTURED_FLAGS.items()
    for flag in flags.split() if flag.startswith("--"))
STRUCTURED_SHORT = sorted(
    flag for flags in STRUCTURED_FLAGS.values() for flag in flags.split()
    if not flag.startswith("--"))


@pytest.mark.parametrize(("flag", "field"), STRUCTURED_LONG,
                         ids=[f"{flag} duplicates {field}" for flag, field in STRUCTURED_LONG])
def test_server_args_may_not_repeat_a_structured_field(flag: str, field: str) -> None:
    assert error_of(with_model(server_args={flag: 1})) == (
        f"n.yaml: models.0.server_args: '{flag}' is set by the structured field '{field}'; "
        "use that")


@pytest.mark.parametrize("flag", [*STRUCTURED_SHORT, "-s", "seed", "-"],
                         ids=lambda f: f"short or bare flag {f}")
def test_server_args_keys_must_be_long_flags(flag: str) -> None:
    assert error_of(with_model(server_args={flag: 1})) == (
        f"n.yaml: models.0.server_args: '{flag}': server_args keys are long flags such as "
        "'--seed'")


@pytest.mark.parametrize("flag", [f for f in AGENT_OWNED_FLAGS if f.startswith("--")],
                         ids=lambda f: f"agent-owned flag {f}")
def test_server_args_may_not_override_what_the_agent_owns(flag: str) -> None:
    assert error_of(with_model(server_args={flag: "x"})) == (
        f"n.yaml: models.0.server_args: '{flag}' is set by the agent itself and cannot be "
        "overridden")


def test_the_agent_owns_the_model_and_where_the_server_listens() -> None:
    assert {"--model", "--host", "--port"} <= set(AGENT_OWNED_FLAGS)


def test_server_args_accept_other_long_flags_of_any_scalar_kind() -> None:
    args = {"--seed": 42, "--no-mmap": True, "--temp": 0.7, "--chat-template": "chatml",
            "--log-disable": None}
    (model,) = load(with_model(server_args=args)).models
    assert model.server_args == args


# -- the models as a whole ---------------------------------------------------------------------

def test_a_model_id_used_twice_is_rejected() -> None:
    text = yaml.safe_dump({"models": [{"model_id": "a", "path": "a.gguf"},
                                      {"model_id": "a", "path": "b.gguf"}]})
    message = error_of(text)
    assert message.startswith("n.yaml: ")
    assert "model_id 'a' appears twice" in message


def test_a_role_named_like_a_model_id_is_rejected() -> None:
    text = yaml.safe_dump({"models": [{"model_id": "a", "path": "a.gguf", "roles": ["b"]},
                                      {"model_id": "b", "path": "b.gguf"}]})
    message = error_of(text)
    assert message.startswith("n.yaml: ")
    assert "role 'b' is also a model_id" in message


@pytest.mark.parametrize("devices", [["cpu"], ["gpu:0"], ["gpu:0", "gpu:1"], ["gpu:10", "cpu"]],
                         ids=lambda d: f"devices {d}")
def test_good_device_names_are_accepted(devices: list[str]) -> None:
    assert load(yaml.safe_dump({"devices": devices})).devices == devices


@pytest.mark.parametrize("name", ["gpu0", "gpu:", "gpu:x", "GPU:0", "cuda:0", "gpu:-1", ""],
                         ids=lambda n: f"device name {n!r}")
def test_bad_device_names_are_rejected(name: str) -> None:
    message = error_of(yaml.safe_dump({"devices": [name]}))
    assert message.startswith("n.yaml: ")
    assert f"devices: {name!r} is not 'cpu' or 'gpu:N'" in message


ROLES = yaml.safe_dump({"models": [
    {"model_id": "qwen-7b", "path": "q.gguf", "roles": ["planner", "chat"]},
    {"model_id": "coder-7b", "path": "c.gguf", "roles": ["coder", "chat"]},
    {"model_id": "embed", "path": "e.gguf", "embeddings": True},
]})


@pytest.mark.parametrize(("name", "expected"), [
    ("qwen-7b", ["qwen-7b"]),
    ("embed", ["embed"]),
    ("planner", ["qwen-7b"]),
    ("coder", ["coder-7b"]),
    ("chat", ["qwen-7b", "coder-7b"]),
    ("nobody", []),
    ("", []),
], ids=["a model id names that model", "a model with no roles is reached by its id",
        "a role names its model", "another role names its model",
        "a shared role names every model that carries it, in file order",
        "an unknown name names nothing", "an empty name names nothing"])
def test_models_for_resolves_a_model_id_or_a_role(name: str, expected: list[str]) -> None:
    config = load(ROLES)
    assert [m.model_id for m in config.models_for(name)] == expected


def test_model_finds_a_model_by_id_only() -> None:
    config = load(ROLES)
    assert config.model("embed") is not None
    assert config.model("chat") is None


# -- the cluster token --------------------------------------------------------------------------

def test_the_cluster_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", "from-env")
    assert load("").cluster_token == "from-env"


def test_a_token_in_the_file_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", "from-env")
    assert load("cluster_token: from-file\n").cluster_token == "from-file"


def test_an_empty_token_in_the_environment_means_no_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", "")
    assert load("").cluster_token is None


def test_public_dump_masks_the_token_and_keeps_the_rest() -> None:
    config = load("cluster_token: s3cret\nlisten_port: 9001\n" + ONE_MODEL)
    dumped = config.public_dump()
    assert dumped["cluster_token"] == "***"
    assert dumped["listen_port"] == 9001
    assert "s3cret" not in str(dumped)
    assert "s3cret" not in repr(config)


def test_public_dump_of_a_token_from_the_environment_is_masked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", "env-s3cret")
    assert load("").public_dump()["cluster_token"] == "***"


def test_public_dump_without_a_token_shows_none() -> None:
    assert load("").public_dump()["cluster_token"] is None


# -- the shipped example configs -------------------------------------------------------------

def test_there_are_example_node_configs() -> None:
    assert NODE_CONFIGS, "configs/ has no node*.yaml"


@pytest.mark.parametrize("path", NODE_CONFIGS, ids=lambda p: p.name)
def test_every_example_node_config_loads(path: Path) -> None:
    config = load_config_file(path, NodeAgentConfig)
    assert config.models, f"{path.name} serves no models"


def test_the_full_example_names_every_key_of_the_agent_and_of_a_model() -> None:
    data = yaml.safe_load((ROOT / "configs" / "node_agent.example.yaml").read_text())
    assert set(data) == set(NodeAgentConfig.model_fields)
    assert set(data["models"][0]) == set(ModelConfig.model_fields)


def test_a_state_dir_under_the_home_directory_is_expanded() -> None:
    assert load("state_dir: ~/.local/state/rolemesh\n").state_dir == (
        Path.home() / ".local/state/rolemesh")


# -- memory placement fields (docs/memory.md) --------------------------------------------------

def test_memory_fields_default_to_llama_servers_own_behaviour() -> None:
    m = ModelConfig.model_validate({"model_id": "a", "path": "a.gguf"})
    assert (m.cache_type_k, m.cache_type_v, m.mmproj, m.n_cpu_moe, m.cpu_moe,
            m.override_tensor, m.allow_disk_paging) == ("f16", "f16", None, None, False, [],
                                                        False)


@pytest.mark.parametrize(("fields", "message"), [
    ({"cache_type_k": "q3_k"}, "models.0.cache_type_k: Input should be 'f32', 'f16'"),
    ({"cache_type_v": "int8"}, "models.0.cache_type_v: Input should be"),
    ({"n_cpu_moe": -1}, "models.0.n_cpu_moe: Input should be greater than or equal to 0"),
    ({"override_tensor": ["exps"]}, "is not 'REGEX=BUFFER_TYPE'"),
    ({"override_tensor": ["=CPU"]}, "is not 'REGEX=BUFFER_TYPE'"),
    ({"override_tensor": ["a=CPU,b=CPU"]}, "no commas"),
    ({"override_tensor": ["blk.(=CPU"]}, "is not a regex"),
    ({"cache_type_v": "q4_0", "flash_attn": False}, "needs flash attention"),
], ids=["k type", "v type", "negative n_cpu_moe", "no buffer", "no pattern", "comma",
        "bad regex", "quantized v without flash attention"])
def test_bad_memory_fields_are_reported_with_their_key(fields: dict[str, object],
                                                       message: str) -> None:
    text = yaml.safe_dump({"models": [{"model_id": "a", "path": "a.gguf", **fields}]})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(text, NodeAgentConfig, source="n.yaml")


def test_a_quantized_cache_with_flash_attention_unset_or_on_is_accepted() -> None:
    for flash in (None, True):
        m = ModelConfig.model_validate({"model_id": "a", "path": "a.gguf", "flash_attn": flash,
                                        "cache_type_k": "q8_0", "cache_type_v": "q8_0"})
        assert m.cache_type_v == "q8_0"


def test_a_missing_projector_is_a_problem_named_by_its_key(tmp_path: Path) -> None:
    present = tmp_path / "mmproj.gguf"
    present.write_bytes(b"GGUF")
    config = NodeAgentConfig.model_validate({"models": [
        {"model_id": "a", "path": "a.gguf", "mmproj": str(present)},
        {"model_id": "b", "path": "b.gguf", "mmproj": "missing-mmproj.gguf"},
        {"model_id": "c", "path": "c.gguf"}]})
    assert config.projector_problems() == [
        "models.1.mmproj (b): missing-mmproj.gguf does not exist or is not a file"]
    assert config.models[0].mmproj == present
# -- lifecycle keys (docs/lifecycle.md) -------------------------------------------------------

@pytest.mark.parametrize(("key", "default"), [
    ("co_residency", True), ("cpu_device", False), ("default_ttl_s", None), ("sets", {}),
    ("load_failure_backoff_s", 2.0), ("unload_timeout_s", 30.0),
])
def test_the_residency_keys_default_to_memory_deciding_and_no_ttl(key: str,
                                                                  default: object) -> None:
    assert getattr(load(""), key) == default


@pytest.mark.parametrize(("key", "default"), [
    ("pinned", False), ("preload", False), ("ttl_s", None), ("exclusive", False),
    ("devices", None), ("memory_mb", None), ("split_mode", None),
])
def test_a_model_gets_the_lifecycle_default(key: str, default: object) -> None:
    (model,) = load(ONE_MODEL).models
    assert getattr(model, key) == default


@pytest.mark.parametrize(("text", "message"), [
    (with_model(pinned=True, ttl_s=60),
     "n.yaml: models.0: a pinned model is never unloaded: ttl_s does not apply"),
    (with_model(ttl_s=0), "n.yaml: models.0.ttl_s: ttl_s must be > 0 seconds, or 'never'"),
    (with_model(devices=[]),
     "n.yaml: models.0.devices: name at least one device, or leave devices out"),
    (with_model(devices=["gpu:0", "gpu:0"]), "n.yaml: models.0.devices: a device appears twice"),
    (with_model(devices=["gpu:0", "cpu"]),
     "n.yaml: models.0.devices: a device group is made of GPUs; 'cpu' cannot be in one"),
    (with_model(devices=["tpu:0"]), "n.yaml: models.0.devices: 'tpu:0' is not 'cpu' or 'gpu:N'"),
    (with_model(devices=["gpu:0", "gpu:1"], tensor_split=[1, 2, 3]),
     "n.yaml: models.0: tensor_split has 3 weights for 2 devices"),
    (with_model(memory_mb=0),
     "n.yaml: models.0.memory_mb: Input should be greater than or equal to 1"),
    (with_model(split_mode="diagonal"),
     "n.yaml: models.0.split_mode: Input should be 'none', 'layer' or 'row'"),
    (yaml.safe_dump({"sets": {"voice": []}, "models": [{"model_id": "a", "path": "a.gguf"}]}),
     "n.yaml: sets.voice: a set names at least one model"),
    (yaml.safe_dump({"sets": {"voice": ["a", "ghost"]},
                     "models": [{"model_id": "a", "path": "a.gguf"}]}),
     "n.yaml: sets.voice: ghost is not a model_id here"),
    ("default_ttl_s: 0\n", "n.yaml: default_ttl_s: Input should be greater than 0"),
    ("load_failure_backoff_s: 0\n",
     "n.yaml: load_failure_backoff_s: Input should be greater than 0"),
    ("unload_timeout_s: -1\n",
     "n.yaml: unload_timeout_s: Input should be greater than or equal to 0"),
], ids=["pinned with a ttl", "ttl not positive", "no devices", "a device twice",
        "cpu in a group", "not a device id", "split of the wrong length", "memory_mb zero",
        "unknown split mode", "an empty set", "a set naming an unknown model",
        "default ttl zero", "backoff zero", "unload timeout negative"])
def test_bad_lifecycle_settings_are_errors_naming_the_key(text: str, message: str) -> None:
    assert message in error_of(text)


@pytest.mark.parametrize(("model_ttl", "default_ttl", "pinned", "ttl"), [
    (None, None, False, None), (None, 120.0, False, 120.0), (30.0, 120.0, False, 30.0),
    ("never", 120.0, False, None), (None, 120.0, True, None), ("never", 120.0, True, None),
], ids=["no ttl anywhere", "the agent default", "the model's own", "never beats the default",
        "a pinned model has none", "a pinned model may say never"])
def test_a_models_ttl_comes_from_itself_then_the_agent_default_never_when_pinned(
        model_ttl: object, default_ttl: float | None, pinned: bool, ttl: float | None) -> None:
    model: dict[str, object] = {"model_id": "m", "path": "m.gguf", "pinned": pinned}
    if model_ttl is not None:
        model["ttl_s"] = model_ttl
    config = load(yaml.safe_dump({"default_ttl_s": default_ttl, "models": [model]}))
    assert config.ttl_of(config.models[0]) == ttl


def test_a_device_group_is_a_placement_with_its_split() -> None:
    (model,) = load(with_model(devices=["gpu:0", "gpu:1"], tensor_split=[1, 1.5])).models
    assert (model.placement, model.split) == (("gpu:0", "gpu:1"), (1.0, 1.5))
    (single,) = load(with_model(devices=["gpu:1"], tensor_split=[3, 1])).models
    assert (single.placement, single.split) == (("gpu:1",), None)  # one device: no split


def test_a_relative_projector_is_read_from_the_config_files_folder_like_the_model(
        tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    config_file = tmp_path / "node.yaml"
    config_file.write_text("models:\n  - model_id: v\n    path: models/v.gguf\n"
                           "    mmproj: models/mmproj-v.gguf\n")
    model = load_config_file(config_file, NodeAgentConfig).models[0]
    assert model.path == tmp_path.resolve() / "models/v.gguf"
    assert model.mmproj == tmp_path.resolve() / "models/mmproj-v.gguf"
