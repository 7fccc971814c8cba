"""infra/ as written: every YAML parses, every Ray cluster definition turns on token auth on every node, nothing
listens for the world without authentication, the KubeRay worker group holds conf/gptj-6b.yaml's actors, GPU
nodes install the CUDA torch build, and no placeholder is left where startup reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
GPTJ = yaml.safe_load((INFRA.parent / "conf" / "gptj-6b.yaml").read_text())
PLACEHOLDER = re.compile(r"YOUR_|<[a-z-]+>|CHANGE|example\.com|change-me")


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


@pytest.mark.parametrize("path", sorted(INFRA.glob("*.yaml")), ids=lambda p: p.name)
def test_every_infra_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def _containers(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_token_auth_in_every_container_from_a_secret():
    rc = _load("kuberay-raycluster.yaml")
    containers = _containers(rc)
    assert len(containers) == 2
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], c["name"]  # never an inline token
        assert "value" not in env["RAY_AUTH_TOKEN"]


def test_kuberay_startup_reads_no_placeholder_and_installs_what_exists():
    rc = _load("kuberay-raycluster.yaml")
    for c in _containers(rc):
        values = [str(e.get("value", "")) for e in c["env"]] + [c["image"]]
        values += c.get("lifecycle", {}).get("postStart", {}).get("exec", {}).get("command", [])
        assert not [v for v in values if PLACEHOLDER.search(v)], c["name"]
        assert "/opt/lensflow-wheel/" in " ".join(values)  # the wheel from the lensflow-wheel ConfigMap
        assert any(m["mountPath"] == "/opt/lensflow-wheel" for m in c["volumeMounts"])
    head, worker = (rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0])
    worker_install = " ".join(worker["lifecycle"]["postStart"]["exec"]["command"])
    assert "whl/cpu" not in worker_install and "torch.cuda.is_available()" in worker_install  # the CUDA build
    assert "whl/cpu" in " ".join(head["lifecycle"]["postStart"]["exec"]["command"])


def test_kuberay_workers_hold_the_paper_configs_actors():
    rc = _load("kuberay-raycluster.yaml")
    (group,) = rc["spec"]["workerGroupSpecs"]
    ray_conf = GPTJ["ray"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    per_pod = gpus // ray_conf["gpus_per_actor"]
    assert group["replicas"] * per_pod == ray_conf["actors"]
    assert group["minReplicas"] * per_pod >= ray_conf["actors"]  # placed at start, not after scaling up
    assert float(worker["resources"]["limits"]["cpu"]) >= ray_conf["cpus_per_actor"] * per_pod
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # dashboard / client not on a public address


def test_ray_up_token_auth_on_every_node_and_cuda_torch_on_gpu_workers():
    rc = _load("ray-cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in rc[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts), key
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/(\S+)", rc["head_start_ray_commands"][-1]).group(1)
    assert f"~/{token_path}" in rc["file_mounts"]  # the same token file reaches every node
    assert any("RAY_AUTH_MODE=token" in c for c in rc["setup_commands"])  # drivers started on a node too
    workers = " ".join(rc["worker_setup_commands"])
    assert "torch==" in workers and "whl/cpu" not in workers and "torch.cuda.is_available()" in workers
    assert "whl/cpu" in " ".join(rc["head_setup_commands"])
    assert "--dashboard-host=127.0.0.1" in rc["head_start_ray_commands"][-1]
    assert "0.0.0.0" not in " ".join(rc["head_start_ray_commands"])
    gpu = rc["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] >= GPTJ["ray"]["actors"] * GPTJ["ray"]["gpus_per_actor"]


def test_compose_publishes_nothing_to_the_world_and_mlflow_authenticates():
    dc = _load("docker-compose.mlflow.yaml")
    published = [(name, p) for name, svc in dc["services"].items() for p in svc.get("ports", [])]
    assert published
    for name, port in published:  # HOST_IP:HOST:CONTAINER with a loopback default, never a bare HOST:CONTAINER
        assert str(port).startswith("${LENSFLOW_BIND_ADDR:-127.0.0.1}:"), (name, port)
    mlflow = dc["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name basic-auth" in command and "--serve-artifacts" in command
    assert "--artifacts-destination s3://" in command  # artifacts in the object store, proxied by the server
    secrets = [v for svc in dc["services"].values() for v in (svc.get("environment") or {}).values()
               if isinstance(v, str) and "PASSWORD" in v]
    assert secrets and all(":?" in v for v in secrets)  # no default password: compose refuses to start without one
