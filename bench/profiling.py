"""Where a RoleMesh process spends its CPU under load: py-spy samples, summarised.

Optional: used only with `--profile DIR`, and only if `py-spy` is on PATH (pip install
py-spy). Samples are taken in a separate load phase after the measured runs, so the
sampling never disturbs the figures. The folded stacks are kept in DIR (open them with any
flame graph tool); the summary lists the functions with the most samples, by self time and
including what they call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

# Frames on every stack (interpreter and event-loop entry points): no news in "inclusive".
_ENTRY = ("_run_module_as_main", "_run_code", "<module>", "main", "run", "Runner.run",
          "run_service", "run_app", "run_forever", "run_until_complete")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def start(pids: dict[str, int], out_dir: Path, seconds: float,
          rate: int = 1000) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy")
    assert spy is not None
    running = {}
    for name, pid in pids.items():
        path = out_dir / f"{name}.folded"
        proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(rate),
                                 "--duration", str(max(1, round(seconds))), "--format", "raw",
                                 "--nonblocking", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running[name] = (proc, path)
    return running


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/", "/"):
        if marker in file:
            file = file.split(marker)[-1]
            break
    return f"{match.group('func')} ({file})"


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    """The top functions by samples: self (the frame running) and inclusive (on the stack)."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    idle = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0, "self": [], "inclusive": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        if frames[-1].startswith(("select ", "poll ", "run_forever", "_run_once")) or \
                "epoll" in frames[-1]:
            idle += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            if f.split(" (", 1)[0] not in _ENTRY:
                incl_counts[f] += count
    def rows(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, c / total) for f, c in counter.most_common(top)] if total else []
    return {"samples": total, "idle_share": idle / total if total else 0.0,
            "self": rows(self_counts), "inclusive": rows(incl_counts)}
