"""The environment a child process (llama-server) gets: the agent's, less RoleMesh secrets.

A child needs PATH, HOME, the device pinning and whatever the operator set for llama.cpp
(LLAMA_ARG_*, CUDA_*); it never needs the cluster token or an API key, and anything in its
environment can be read by whoever can read /proc/<pid>/environ or a crash report.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "ROLEMESH_"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def is_secret(name: str) -> bool:
    """ROLEMESH_CLUSTER_TOKEN, ROLEMESH_API_KEY, ROLEMESH_*TOKEN*, *KEY*, *SECRET*, ..."""
    upper = name.upper()
    return upper.startswith(PREFIX) and any(word in upper[len(PREFIX):]
                                            for word in SECRET_WORDS)


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in base.items() if not is_secret(name)}
