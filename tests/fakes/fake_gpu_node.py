"""A whole node agent process on fake GPUs: `python -m tests.fakes.fake_gpu_node --config F`.

The backend seam, faked: $FAKE_GPUS_MB ("12288,12288") gives the GPUs and their memory, so a
cluster test can run a 2 x 12 GB node on a machine without a GPU (with the fake llama-server,
whose models declare their `memory_mb`).
"""

from __future__ import annotations

import os
import sys

from node_agent.cli import main
from tests.agent_harness import FakeGpuBackend


def fake_backend(_name: str) -> FakeGpuBackend:
    sizes = os.environ.get("FAKE_GPUS_MB", "24576")
    return FakeGpuBackend([int(mb) for mb in sizes.split(",")])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], backend_factory=fake_backend))
