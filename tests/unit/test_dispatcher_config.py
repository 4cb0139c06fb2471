"""The dispatcher's config: defaults, strictness, the token from the environment, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.cli import EXIT_CONFIG, main
from dispatcher.config import DispatcherConfig
from rolemesh.config_loading import ConfigError, load_config, load_config_file
from rolemesh.simulate.cluster import load_cluster_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "dispatcher.example.yaml"


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv("ROLEMESH_CLUSTER_TOKEN", raising=False)


def load(text: str) -> DispatcherConfig:
    return load_config(text, DispatcherConfig, source="d.yaml")


def test_an_empty_config_gets_every_default():
    c = load("")
    assert c.listen_host == "127.0.0.1"
    assert c.listen_port == 8080
    assert c.cluster_token is None
    assert c.heartbeat_interval_s == 5.0
    assert c.node_timeout_s == 15.0
    assert c.node_forget_s == 60.0
    assert c.vram_safety_margin == 0.9
    assert c.aliases == {}
    assert c.routing.task_types == {}
    assert c.api_keys is None
    assert c.max_body_bytes == 16 * 1024 * 1024
    assert c.request_timeout_s == 600.0
    assert c.max_attempts == 3


def test_node_timeout_defaults_to_three_heartbeat_intervals():
    c = load("heartbeat_interval_s: 2")
    assert c.node_timeout_s == 6.0
    assert c.node_forget_s == 24.0


def test_explicit_timeouts_are_kept():
    c = load("heartbeat_interval_s: 1\nnode_timeout_s: 10\nnode_forget_s: 100")
    assert (c.timeout_s, c.forget_s) == (10.0, 100.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("listen_prot: 80", "d.yaml: listen_prot: unknown key"),
    ("aliases: {planning: planner}\nrole: {}", "d.yaml: role: unknown key"),
    ("listen_port: 70000", "d.yaml: listen_port: Input should be less than or equal to 65535"),
    ("vram_safety_margin: 1.5", "d.yaml: vram_safety_margin: Input should be less than or "
                                "equal to 1"),
    ("heartbeat_interval_s: 5\nnode_timeout_s: 4",
     "d.yaml: node_timeout_s: 4 must be longer than heartbeat_interval_s (5)"),
    ("node_timeout_s: 10\nnode_forget_s: 10",
     "d.yaml: node_forget_s: 10 must be longer than node_timeout_s (10)"),
    ("api_keys: []", "d.yaml: api_keys: an empty list would refuse every client"),
    ("api_keys: ['']", "d.yaml: api_keys: an api key cannot be empty"),
    ("aliases: {code: 'my coder'}",
     "d.yaml: aliases: code: 'my coder' is not a role or model id"),
    ("aliases: {code: code}", "d.yaml: aliases: code: an alias cannot name itself"),
    ("aliases: {a: b, b: coder}", "d.yaml: aliases: a: 'b' is itself an alias"),
    ("roles: {a: b, b: coder}", "d.yaml: roles: a: 'b' is itself an alias"),
    ("roles: {a: coder}\naliases: {b: coder}", "d.yaml: roles: is the old name of aliases"),
    ("admin_keys: []", "d.yaml: admin_keys: an empty list would refuse every client"),
    ("routing: {task_types: {infra: operator}, keyword_rules: [{pattern: k8s, "
     "task_type: infar}]}", "d.yaml: routing: keyword_rules.0: task type 'infar' has no row"),
    ("routing: {keyword_rules: [{pattern: '(', task_type: x}]}",
     "d.yaml: routing.keyword_rules.0.pattern: '(' is not a regular expression"),
    ("routing: {task_types: {a: b}, content_rules: [{name: x, when: {images: true}, "
     "role: v}, {name: x, when: {}, role: w}]}",
     "d.yaml: routing: content_rules.1: the name 'x' is used twice"),
    ("routing: {fallbacks: {big: [big]}}",
     "d.yaml: routing: fallbacks: big: a role cannot fall back to itself"),
])
def test_a_bad_config_names_the_file_the_key_and_the_problem(text, expected):
    with pytest.raises(ConfigError) as err:
        load(text)
    assert str(err.value).startswith(expected)


def test_the_cluster_token_comes_from_the_environment_when_not_in_the_file(monkeypatch):
    monkeypatch.setenv("ROLEMESH_CLUSTER_TOKEN", "from-env")
    assert load("").cluster_token == "from-env"
    assert load("cluster_token: from-file").cluster_token == "from-file"


def test_aliases_are_read_as_a_mapping():
    c = load("aliases:\n  planning: planner\n  code: coder\n")
    assert c.aliases == {"planning": "planner", "code": "coder"}
    assert c.deprecated_keys == []


def test_the_old_roles_key_is_read_as_aliases_and_reported_deprecated():
    c = load("roles:\n  planning: planner\n")
    assert c.aliases == {"planning": "planner"}
    assert c.deprecated_keys == ["roles"]
    assert "roles" not in c.public_dump()


def test_the_routing_file_sits_beside_the_config_file_unless_named():
    assert load("").routing_file == "d.routing.json"
    assert load_config("", DispatcherConfig, source="/etc/rm/disp.yaml").routing_file == \
        "/etc/rm/disp.routing.json"
    assert load_config("", DispatcherConfig).routing_file is None  # text without a file
    assert load("routing_file: /var/lib/rm/t.json").routing_file == "/var/lib/rm/t.json"


def test_admin_keys_are_masked_like_api_keys():
    c = load("admin_keys: [adm-1]")
    assert c.public_dump()["admin_keys"] == ["***"]
    assert "adm-1" not in repr(c)


def test_secrets_are_masked_in_the_public_dump_and_the_repr():
    c = load("cluster_token: tok-123\napi_keys: [k-1, k-2]")
    dump = c.public_dump()
    assert dump["cluster_token"] == "***"
    assert dump["api_keys"] == ["***", "***"]
    assert "tok-123" not in repr(c)
    assert "k-1" not in repr(c)


def test_the_example_config_loads_and_documents_every_key():
    config = load_config_file(EXAMPLE, DispatcherConfig)
    assert config.aliases  # the example shows aliases
    assert config.routing.task_types  # and a routing table
    assert config.routing.content_rules
    text = EXAMPLE.read_text()
    for key in DispatcherConfig.model_fields:
        assert f"{key}:" in text, f"{key} is not documented in {EXAMPLE.name}"


def test_check_config_prints_the_resolved_config_with_secrets_masked(tmp_path, capsys):
    path = tmp_path / "d.yaml"
    path.write_text("cluster_token: tok-123\nheartbeat_interval_s: 2\n")
    assert main(["--config", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out)
    assert resolved["node_timeout_s"] == 6.0
    assert resolved["cluster_token"] == "***"
    assert "tok-123" not in out


def test_a_bad_config_exits_with_the_config_error_code(tmp_path, capsys):
    path = tmp_path / "d.yaml"
    path.write_text("listen_prot: 80\n")
    assert main(["--config", str(path), "--check-config"]) == EXIT_CONFIG
    assert f"{path}: listen_prot: unknown key" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG


def test_every_shipped_dispatcher_config_loads() -> None:
    files = sorted((ROOT / "configs").glob("dispatcher*.yaml"))
    assert len(files) >= 2
    for path in files:
        load_config_file(path, DispatcherConfig)


def test_every_file_in_configs_is_a_node_or_dispatcher_config_a_test_loads() -> None:
    # The rule: a file directly in configs/ is a service config (node*.yaml, loaded by
    # test_node_config; dispatcher*.yaml, loaded above). Other kinds live in a subfolder
    # named for what reads them, and every file there must load as that kind.
    configs = ROOT / "configs"
    names = [p.name for p in configs.iterdir() if p.is_file()]
    assert names
    assert all(n.startswith(("node", "dispatcher")) and n.endswith(".yaml") for n in names)
    folders = {p.name for p in configs.iterdir() if p.is_dir()}
    assert folders <= {"simulate"}, f"configs/ holds an unknown kind of file: {folders}"
    simulated = sorted((configs / "simulate").glob("*"))
    assert all(p.suffix == ".yaml" for p in simulated)
    for path in simulated:
        assert load_cluster_file(path).nodes  # a cluster for `rolemesh simulate`
