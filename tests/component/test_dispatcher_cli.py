"""The real `rolemesh-dispatcher` process: it starts, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.waiting import free_port, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_the_dispatcher_process_serves_health_and_stops_on_sigterm(tmp_path):
    port = free_port()
    config = tmp_path / "dispatcher.yaml"
    config.write_text(f"listen_port: {port}\nlog_format: console\ncluster_token: tok-secret\n")
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_sync(lambda: healthy(url) or proc.poll() is not None, timeout_s=20,
                        what="the dispatcher to answer /health")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    text = out.decode()
    assert "dispatcher.started" in text
    assert "dispatcher.stopped" in text
    assert "tok-secret" not in text
