"""Config fixes a new user asked for: YAML's `off` kept, model paths from the config's
folder, the cluster token from a private file."""

from __future__ import annotations

import os

import pytest

from dispatcher.config import DispatcherConfig
from node_agent.config import NodeAgentConfig
from node_agent.llama_argv import build_argv
from rolemesh.config_loading import ConfigError, load_config, load_config_file
from rolemesh.cors import allowed_origin

AGENT = """
node_id: a
models:
  - model_id: m
    path: models/m.gguf
    flash_attn: on
    server_args:
      --reasoning: off
      --metrics: true
      --seed: 7
"""


def test_yaml_off_in_server_args_stays_the_string_and_reaches_the_argv(tmp_path):
    config = load_config(AGENT, NodeAgentConfig, source="<test>")
    model = config.models[0]
    assert model.server_args["--reasoning"] == "off"
    assert model.flash_attn is True  # typed fields still read on/off
    argv = build_argv("llama-server", model, 9000)
    assert argv[argv.index("--reasoning") + 1] == "off"
    assert "--metrics" in argv


def test_a_relative_model_path_is_read_from_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "agent.yaml").write_text(AGENT)
    monkeypatch.chdir(tmp_path)
    config = load_config_file("etc/agent.yaml", NodeAgentConfig)
    assert config.models[0].path == folder / "models" / "m.gguf"


def test_the_cluster_token_comes_from_a_private_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ROLEMESH_CLUSTER_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    monkeypatch.setenv("CREDS", str(tmp_path))
    agent = load_config("cluster_token_file: ${CREDS}/token\n", NodeAgentConfig)
    assert agent.cluster_token == "s3cret"
    dispatcher = load_config(f"cluster_token_file: {token}\n", DispatcherConfig)
    assert dispatcher.cluster_token == "s3cret"
    assert "s3cret" not in str(dispatcher.public_dump())


def test_a_token_file_others_can_read_is_refused_and_named(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    os.chmod(token, 0o644)
    with pytest.raises(ConfigError, match=r"agent.yaml: .*readable by others \(mode 0644\)"):
        load_config(f"cluster_token_file: {token}\n", NodeAgentConfig, source="agent.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(f"cluster_token_file: {tmp_path}/none\n", DispatcherConfig)


@pytest.mark.parametrize(("origin", "allowed", "expected"), [
    ("http://a.lan", [], None), ("http://a.lan", ["http://a.lan"], "http://a.lan"),
    ("http://b.lan", ["http://a.lan"], None), ("http://b.lan", ["*"], "*"),
    (None, ["*"], None)])
def test_cors_answers_only_listed_origins(origin, allowed, expected):
    assert allowed_origin(origin, allowed) == expected


def test_environment_references_in_values_fill_ports_and_urls(monkeypatch):
    monkeypatch.setenv("AGENT_PORT", "9101")
    monkeypatch.delenv("DISPATCHER_PORT", raising=False)
    text = ("# a comment with ${NOT_EXPANDED}\nlisten_port: ${AGENT_PORT:-8081}\n"
            "dispatcher_base_url: http://127.0.0.1:${DISPATCHER_PORT:-8080}\n")
    config = load_config(text, NodeAgentConfig, source="a.yaml")
    assert config.listen_port == 9101
    assert config.dispatcher_base_url == "http://127.0.0.1:8080"


def test_an_unset_environment_reference_without_a_default_names_key_and_variable(monkeypatch):
    monkeypatch.delenv("NOPE_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"a.yaml: listen_port: \$\{NOPE_PORT\} is not set"):
        load_config("listen_port: ${NOPE_PORT}\n", NodeAgentConfig, source="a.yaml")


def test_the_one_machine_example_moves_its_ports_with_the_environment(monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.setenv("ROLEMESH_DISPATCHER_PORT", "9200")
    monkeypatch.setenv("ROLEMESH_AGENT_A_PORT", "9201")
    dispatcher = load_config_file(ROOT / "configs" / "dispatcher.local.yaml", DispatcherConfig)
    agent = load_config_file(ROOT / "configs" / "node_agent.local-a.yaml", NodeAgentConfig)
    assert dispatcher.listen_port == 9200
    assert agent.listen_port == 9201
    assert agent.dispatcher_base_url == "http://127.0.0.1:9200"
    assert agent.models[0].path == ROOT / ".rolemesh-demo" / "models" / "letters.gguf"
    assert agent.state_dir == ROOT / ".rolemesh-demo" / "state-a"
