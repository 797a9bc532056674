"""The shipped deployment configs load and decide as the manifests mount them."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from decision.config import Settings, load_config
from decision.domain import RequestContext
from decision.service import Service
from policies.bundle import DEFAULT_BUNDLE

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def _pod_mounts() -> dict[str, str]:
    """mount path -> ConfigMap name, and the serve arguments, from the Deployment."""
    deployment = next(d for d in yaml.safe_load_all((K8S / "infermesh.yaml").read_text())
                      if d and d.get("kind") == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("configMap", {}).get("name", "") for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    mounts["args"] = " ".join(container["args"])
    return mounts


def test_the_k8s_config_decides_where_the_manifest_mounts_it(tmp_path: Path) -> None:
    mounts = _pod_mounts()
    assert mounts["/etc/infermesh"] == "infermesh-config" and mounts["/etc/infermesh-policies"] == "infermesh-policies"
    assert "--config /etc/infermesh/infermesh.yaml" in mounts["args"]
    text = (K8S / "infermesh-config.yaml").read_text()
    assert "policies: /etc/infermesh-policies" in text
    # The pod's layout under tmp_path: the config ConfigMap (config + fleet) and the bundle ConfigMap.
    etc = tmp_path / "etc" / "infermesh"
    etc.mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "demo" / "fleet.yaml", etc / "fleet.yaml")
    bundle = tmp_path / "etc" / "infermesh-policies"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    (etc / "infermesh.yaml").write_text(text.replace("/etc/infermesh-policies", str(bundle)))
    cfg = load_config(etc / "infermesh.yaml")
    assert cfg.server.host == "0.0.0.0"  # probes and Services reach the pod's IP, not its loopback
    service = Service(cfg, Settings(), audit_enabled=False)
    try:
        assert service.engine is not None
        d = service.engine.decide(RequestContext("k8s-1", "acme", model_family="llama", client_region="eu-west"))
        assert d.route.endpoint_id and d.policy_revision.startswith("pol-")
    finally:
        service.stop(0)


def test_the_image_runs_the_config_the_manifest_mounts() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    assert 'CMD ["serve", "--config", "/etc/infermesh/infermesh.yaml"]' in dockerfile
    assert "USER 10001" in dockerfile and "runAsUser: 10001" in (K8S / "infermesh.yaml").read_text()
