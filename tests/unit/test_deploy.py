"""deploy/: the Kubernetes manifests validate offline against kubernetes-validate's bundled
schemas, the configs they and the systemd units carry load, and the units are hardened."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dispatcher.config import DispatcherConfig
from node_agent.config import NodeAgentConfig
from rolemesh.config_loading import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
K8S_VERSION = "1.30.0"
TOKEN = "deploy-test-token"


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def test_every_manifest_is_valid_kubernetes_offline_and_strict():
    import kubernetes_validate

    docs = documents()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "DaemonSet", "Deployment", "Namespace", "Secret",
                     "Service"]
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def test_an_invalid_manifest_is_caught():
    import kubernetes_validate

    _, deployment = next((n, d) for n, d in documents() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def by_kind(kind: str) -> dict:
    return next(d for _, d in documents() if d["kind"] == kind)


def test_the_agent_runs_on_gpu_nodes_and_the_token_is_a_secret_file_never_env_or_argv():
    agent = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    for pod in (agent, by_kind("Deployment")["spec"]["template"]["spec"]):
        token_volume = next(v for v in pod["volumes"] if v["name"] == "token")
        assert token_volume["secret"]["secretName"] == "rolemesh-cluster-token"
        for container in pod["containers"]:
            text = yaml.safe_dump(container)
            assert "cluster_token" not in " ".join(container.get("args", []))
            assert "secretKeyRef" not in text
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_configs_in_the_config_maps_and_units_load(tmp_path, monkeypatch):
    token = tmp_path / "cluster_token"
    token.write_text(TOKEN)
    token.chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("POD_IP", "10.0.0.7")
    maps = [d for _, d in documents() if d["kind"] == "ConfigMap"]
    texts = {k: v for m in maps for k, v in m["data"].items()}
    texts["systemd/dispatcher.yaml"] = (SYSTEMD / "dispatcher.yaml").read_text()
    texts["systemd/node_agent.yaml"] = (SYSTEMD / "node_agent.yaml").read_text()
    for name, text in texts.items():
        filled = text.replace("/secrets/rolemesh/cluster_token", str(token)).replace(
            "${POD_IP}", "10.0.0.7")
        model = DispatcherConfig if "dispatcher" in name else NodeAgentConfig
        config = load_config(filled, model, source=name)
        assert config.cluster_token == TOKEN, name
        assert config.listen_host == "0.0.0.0"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


@pytest.mark.parametrize("name", ["rolemesh-dispatcher.service", "rolemesh-node-agent.service"])
def test_the_systemd_units_are_hardened_and_keep_the_token_out_of_argv(name):
    service = unit(name)["Service"]
    assert service["User"] == "rolemesh"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert service["LoadCredential"] == "cluster_token:/etc/rolemesh/cluster_token"
    assert "token" not in service["ExecStart"]
    config = (SYSTEMD / ("dispatcher.yaml" if "dispatcher" in name else "node_agent.yaml"))
    assert "cluster_token_file: ${CREDENTIALS_DIRECTORY}/cluster_token" in config.read_text()


def test_systemd_accepts_every_key_of_the_units(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for path in SYSTEMD.glob("*.service"):
        # The units name the install location; point them at this checkout's python.
        text = path.read_text().replace("/opt/rolemesh/venv/bin", str(Path(sys.executable).parent))
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.glob("*.service"))],
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "Unknown key" in line or "Invalid" in line or "Failed to parse" in line]
    assert complaints == []
