"""A child's environment: the agent's, less RoleMesh secrets."""

from __future__ import annotations

from rolemesh.child_env import child_env


def test_rolemesh_secrets_are_dropped_and_everything_else_kept():
    base = {"PATH": "/usr/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0",
            "LLAMA_ARG_THREADS": "4", "ROLEMESH_CLUSTER_TOKEN": "t0ken",
            "ROLEMESH_API_KEY": "sk-1", "ROLEMESH_ADMIN_KEYS": "a,b",
            "ROLEMESH_DASHBOARD_TOKEN": "x", "rolemesh_api_key": "lower",
            "ROLEMESH_URL": "http://127.0.0.1:8080", "ROLEMESH_LLAMA_SERVER_BIN": "/bin/ls",
            "HF_TOKEN": "not ours"}
    env = child_env(base)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0",
                   "LLAMA_ARG_THREADS": "4", "ROLEMESH_URL": "http://127.0.0.1:8080",
                   "ROLEMESH_LLAMA_SERVER_BIN": "/bin/ls", "HF_TOKEN": "not ours"}
    assert "ROLEMESH_CLUSTER_TOKEN" in base  # the input is not changed
