"""Start the real llama-server on a model just long enough to read what it allocated.

The server is stopped as soon as it has printed its compute buffer (the last figure of a
load), so a tiny model costs a fraction of a second per start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from rolemesh.llama_memory_log import LlamaMemoryFigures, parse_memory_log
from rolemesh.net import free_loopback_port

_DONE_MARKERS = ("model loaded", "exiting due to", "failed to load", "error:")


class ProbeFailed(RuntimeError):
    pass


def probe(binary: Path, model: Path, args: list[str],
          timeout_s: float = 30.0) -> tuple[LlamaMemoryFigures, str]:
    """(the figures llama-server printed, its log) for one start with these flags."""
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1",
            "--port", str(free_loopback_port()), "-t", "1", "-lv", "4", *args]
    if "--mmproj" not in args:
        argv.append("--no-warmup")  # a projector reserves its compute buffer while warming up
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "LLAMA_ARG_CACHE_RAM": "0"})
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                log.seek(0)
                text = log.read().decode(errors="replace")
                if any(m in text for m in _DONE_MARKERS) or proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise ProbeFailed(f"llama-server did not finish loading in {timeout_s}s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    figures = parse_memory_log(text)
    if not figures.complete:
        tail = "\n".join(text.splitlines()[-12:])
        raise ProbeFailed(f"llama-server did not report its buffers ({' '.join(argv)}):\n{tail}")
    return figures, text
