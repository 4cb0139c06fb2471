"""`rolemesh up`: one command starts a dispatcher and an agent; Ctrl-C stops all of it."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai

from tests.processes import llama_server_pids
from tests.waiting import free_port, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


class Up:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rolemesh.cli", "up", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float = 90) -> None:
        def arrived() -> bool:
            while not self.lines.empty():
                self.seen.append(self.lines.get_nowait())
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("rolemesh up exited:\n" + "".join(self.seen))
            return any(text in line for line in self.seen)
        wait_until_sync(arrived, timeout_s=timeout_s, interval_s=0.1, what=text)

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def children_serving(folder: Path) -> set[int]:
    """llama-servers (fake or real) whose command line names a model in `folder`."""
    out = set()
    for pid in llama_server_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            out.add(pid)
    return out


def env_with(fake: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ROLEMESH_CLUSTER_TOKEN"}
    env["LLAMA_SERVER"] = str(fake)
    return env


def test_up_serves_a_models_folder_prints_its_urls_and_ctrl_c_stops_everything(
        tmp_path, tiny_models, fake_llama_server_bin):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_models["letters"], models / "tiny-chat.gguf")
    shutil.copy(tiny_models["digits"], models / "tiny-coder.gguf")
    port, agent_port = free_port(), free_port()
    up = Up(["--models-dir", str(models), "--port", str(port), "--agent-port",
             str(agent_port), "--state-dir", str(tmp_path / "state")],
            env_with(fake_llama_server_bin))
    try:
        up.wait_for("Ctrl-C stops both")
        text = up.output()
        base = f"http://127.0.0.1:{port}"
        assert f"OpenAI API   {base}/v1" in text
        assert f"dashboard    {base}/" in text
        assert f"metrics      {base}/metrics" in text
        assert "coder" in text

        client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=60)
        answer = client.chat.completions.create(
            model="coder", max_tokens=3, messages=[{"role": "user", "content": "x"}])
        assert "tiny-coder" in (answer.choices[0].message.content or "")
        status = subprocess.run([sys.executable, "-m", "rolemesh.cli", "--url", base, "status"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "nodes up: 1" in status.stdout
        assert children_serving(models)  # the coder's llama-server runs

        token_file = tmp_path / "state" / "cluster_token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.read_text().strip() not in (tmp_path / "state" / "agent.yaml"
                                                      ).read_text()
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.output()
    assert "stopping" in up.output()
    assert children_serving(models) == set()


def test_up_without_models_serves_the_generated_demo_models(tmp_path, fake_llama_server_bin):
    port = free_port()
    up = Up(["--port", str(port), "--agent-port", str(free_port()),
             "--state-dir", str(tmp_path / "state")], env_with(fake_llama_server_bin))
    try:
        up.wait_for("Ctrl-C stops both")
        assert "the demo models" in up.output()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-",
                               max_retries=0, timeout=60)
        ids = {m.id for m in client.models.list().data}
        assert {"demo-letters", "demo-digits", "chat", "coder"} <= ids
    finally:
        code = up.stop(signal.SIGTERM)
    assert code == 0, up.output()


def test_up_says_what_is_wrong_with_an_empty_models_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rolemesh.cli", "up", "--models-dir",
                             str(tmp_path), "--state-dir", str(tmp_path / "s")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"--models-dir {tmp_path}: no .gguf file there" in result.stderr


def test_ctrl_c_while_starting_stops_both_at_once(tmp_path, tiny_models, fake_llama_server_bin):
    config = tmp_path / "up.yaml"  # an agent that never registers: `up` waits for it
    config.write_text(f"agent:\n  dispatcher_base_url: http://127.0.0.1:9\n  models:\n"
                      f"    - {{model_id: m, path: {tiny_models['letters']}, roles: [chat]}}\n")
    up = Up(["--config", str(config), "--port", str(free_port()), "--agent-port",
             str(free_port()), "--state-dir", str(tmp_path / "state")],
            env_with(fake_llama_server_bin))
    up.wait_for("starting a dispatcher and a node agent")
    code = up.stop(signal.SIGINT)
    assert code == 0, up.output()
    assert "stopping" in up.output()
