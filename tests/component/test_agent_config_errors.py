"""The agent's start-up errors name the config file; relative model paths are the file's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check_config(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node_agent.cli", "--config", str(config),
                           "--check-config"], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_a_missing_model_file_is_reported_with_the_config_file_that_names_it(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("models:\n  - {model_id: m, path: nowhere/m.gguf}\n")
    result = check_config(config, ROOT)
    assert result.returncode == 2
    assert (f"{config}: models.0.path (m): {tmp_path}/nowhere/m.gguf does not exist"
            in result.stderr)


def test_a_relative_model_path_is_found_beside_the_config_from_any_folder(tmp_path,
                                                                          tiny_models):
    (tmp_path / "conf" / "models").mkdir(parents=True)
    (tmp_path / "conf" / "models" / "m.gguf").write_bytes(tiny_models["letters"].read_bytes())
    config = tmp_path / "conf" / "agent.yaml"
    config.write_text("models:\n  - {model_id: m, path: models/m.gguf, roles: [chat]}\n")
    result = check_config(config, tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["models"][0]["path"] == str(tmp_path / "conf" / "models" / "m.gguf")
