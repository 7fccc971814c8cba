"""Flows on a real two-node Ray cluster on this machine (tests/twonode.py): an S3 server as store.root and
`mlflow server` with basic authentication and proxied artifacts as tracking.uri; the second node cannot see the
driver's files and has no credentials of its own (the driver holds them). Results equal a local run's; losing the
second node mid-run completes; nothing waits forever; no secret shows in the job table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import zarr
from loopback import MlflowServer, free_port, wait_until
from test_extraction import reference
from twonode import S3Server, TwoNodeCluster, wait_for_nodes

from lensflow.tasks.core import extraction, store
from lensflow.tasks.core.actors import ModelPool, map_remote
from lensflow.tasks.core.config import CONF_DIR, ConfigError
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.registry import load_config

pytestmark = pytest.mark.integration

TINY = ["model.name=tiny-llama", "ray.actors=2", "data.max_tokens=16"]
EXTRACT = [*TINY, "data.max_prompts=24", "store.chunk_size=4"]
LENS = [*TINY, "store.chunk_size=4", "lenses.max_prompts=12", "lenses.heldout=0.25", "lenses.epochs=2",
        "lenses.batch_tokens=32"]
CONF = str(CONF_DIR / "default.yaml")  # the driver works in a temporary folder
MLFLOW_PASSWORD = "pw-" + os.urandom(8).hex()  # a value no job table, log or run may show
LOSS_PROMPTS, LOSS_CHUNK = 96, 2  # the node-loss run: 48 chunks, long enough to kill a node in the middle


class Cluster:
    """What the tests need of the running services."""

    def __init__(self, nodes: TwoNodeCluster, s3: S3Server, mlflow: MlflowServer, local: dict):
        self.nodes, self.s3, self.mlflow, self.local = nodes, s3, mlflow, local

    def sets(self, root: str) -> list[str]:
        return [f"ray.address={self.nodes.address}", f"store.root=s3://{self.s3.bucket}/{root}",
                f"tracking.uri={self.mlflow.url}", "ray.timeout_s=60", "ray.connect_timeout_s=5"]


# the item functions below travel by value: workers cannot import this test module (not even see its folder)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def node_of(lm, item) -> str:
    """An item that says which node ran it."""
    return ray.get_runtime_context().get_node_id()


def nodes_in_use(pool: ModelPool, deadline: float) -> set[str]:
    """Nodes that ran items, asked until both nodes answer (actors come up one by one) or the deadline."""
    seen: set[str] = set()
    while len(seen) < 2 and time.monotonic() < deadline:
        seen = set(pool.map(node_of, list(range(8)), desc="where"))
    return seen


def sleep_item(lm, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def needs_a_gpu(item: int) -> int:
    return item


@ray.remote(num_cpus=0)
class StartLog:
    """Where each task started, kept on the head: a task that ran again shows up twice."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, str]] = []

    def start(self, item: int, node: str) -> None:
        self.starts.append((item, node))

    def all(self) -> list[tuple[int, str]]:
        return self.starts


def logged_layer_job(job: tuple) -> int:
    """Stands in for a per-layer training job (a model-free Ray task of map_remote)."""
    log, item = job
    ray.get(log.start.remote(item, ray.get_runtime_context().get_node_id()))
    time.sleep(1.0)
    return item


def _local_runs(root: Path, tracking_uri: str) -> dict:
    """The same work on a private local Ray: the reference every cluster result must equal."""
    from lensflow.flows.extract import extract_flow
    from lensflow.flows.logit_lens import logit_lens_flow

    local = [f"store.root={root}", f"tracking.uri={tracking_uri}"]
    out = {"extract": extract_flow(CONF, [*EXTRACT, *local]), "lens": logit_lens_flow(CONF, [*LENS, *local])}
    conf = load_config(None, [*TINY, *local, f"data.max_prompts={LOSS_PROMPTS}", f"store.chunk_size={LOSS_CHUNK}"])
    with ModelPool(conf) as pool:
        out["loss_store"] = extraction.extract(conf, builtin_texts(LOSS_PROMPTS), pool, label="loss").url
    ray.shutdown()
    return out


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """Services start first (they boot while the local reference runs); one cluster for the whole module. The
    driver works in a temporary folder that, like HOME and every test folder, the second node cannot see."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("the second node needs a mount namespace: `unshare -m` is refused here (root or CAP_SYS_ADMIN)")
    folder = Path(tempfile.mkdtemp(prefix="lensflow-cluster-"))
    base = tmp_path_factory.getbasetemp()
    driver = tmp_path_factory.mktemp("driver")
    s3, mlflow = S3Server(folder), MlflowServer(folder, password=MLFLOW_PASSWORD)
    nodes = TwoNodeCluster(folder, hidden=[base, Path.home()], env={})  # credentials: the driver's alone
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        try:
            s3.start()
            nodes.start()
            threading.Thread(target=mlflow.start, daemon=True).start()
            request.getfixturevalue("prefect_harness")
            if ray.is_initialized():
                ray.shutdown()
            os.chdir(driver)
            local = _local_runs(driver / "store", f"sqlite:///{driver / 'mlflow.db'}")
            for k, v in {**s3.env, **mlflow.auth_env, **nodes.env}.items():
                mp.setenv(k, v)
            s3.wait()
            nodes.wait()
            from loopback import answers, wait_until

            wait_until(lambda: answers(mlflow.url + "/health"), 120, "mlflow server")
            yield Cluster(nodes, s3, mlflow, local)
        finally:
            ray.shutdown()
            os.chdir(cwd)
            nodes.stop()
            if mlflow.proc is not None:
                mlflow.stop()
            s3.stop()
            shutil.rmtree(folder, ignore_errors=True)


def test_extract_on_two_nodes_equals_local(cluster, caplog):
    """Model actors on both nodes write one S3 store, equal to the local run's and to a plain forward."""
    from mlflow.tracking import MlflowClient

    from lensflow.flows.extract import extract_flow

    out = extract_flow(CONF, [*EXTRACT, *cluster.sets("extract")])
    # the pool's line in the flow run's log (on a loaded machine the run can finish before the second node's actor
    # is up: test_credentials_reach_workers_but_never_the_job_table makes both nodes write and log)
    assert "model actor" in caplog.text and "up on node" in caplog.text
    assert out["store"].startswith(f"s3://{cluster.s3.bucket}/extract/activations/")
    assert out["chunks_computed"] == 6
    acts, local = store.Activations(out["store"]), store.Activations(cluster.local["extract"]["store"])
    assert acts.attrs["fingerprint"] == local.attrs["fingerprint"]  # the same stage key on any root
    for name in ("resid", "token_ids", "lengths"):
        np.testing.assert_array_equal(acts.group[name][:], local.group[name][:])
    conf = load_config(None, EXTRACT)
    ref = np.stack([r.numpy() for r in reference(conf, acts.texts(), acts.layers)])
    np.testing.assert_allclose(acts.resid[:], ref, atol=1e-4)
    run = MlflowClient(cluster.mlflow.url).get_run(out["run_id"])  # logged through the server
    assert run.info.status == "FINISHED" and run.data.tags["store.prompts"] == out["store"]


def test_logit_lens_on_two_nodes_equals_local(cluster):
    """A training flow: translators trained as Ray tasks on both nodes, artifacts proxied by the MLflow server."""
    from mlflow.tracking import MlflowClient

    from lensflow.flows.logit_lens import logit_lens_flow

    out = logit_lens_flow(CONF, [*LENS, *cluster.sets("lens")])
    local = cluster.local["lens"]
    assert out["trained_layers"] == local["trained_layers"] == 4
    assert sorted(out["per_layer"]) == sorted(local["per_layer"])
    for metric, by_layer in local["per_layer"].items():
        assert out["per_layer"][metric] == pytest.approx(by_layer, rel=1e-5, abs=1e-6), metric
    client = MlflowClient(cluster.mlflow.url)
    arts = {a.path for a in client.list_artifacts(out["run_id"], "tuned_lens")}
    assert "tuned_lens/translators.safetensors" in arts
    assert list((cluster.mlflow.folder / "artifacts").rglob("translators.safetensors"))  # proxied by the server


SEEN = """
import hashlib, os, sys
import ray
from lensflow.tasks.core.actors import map_remote
from lensflow.tasks.core.ray_cluster import connect
from lensflow.tasks.core.config import RayConf

def seen(_):  # what a Ray task on the cluster finds in its environment (a hash, never the value)
    return hashlib.sha256(os.environ.get("MLFLOW_TRACKING_PASSWORD", "").encode()).hexdigest()

# secret names listed in ray.env_vars, as the README used to advise: they must not reach the runtime_env
conf = RayConf(address=sys.argv[1], env_vars=["TOKENIZERS_PARALLELISM", "MLFLOW_TRACKING_PASSWORD",
                                               "AWS_SECRET_ACCESS_KEY"])
print(set(map_remote(seen, list(range(4)), "seen", conf)))
print(ray.get_runtime_context().get_job_id())
"""


def write_and_log(lm, job: tuple) -> str:
    """An item that needs both credentials: an object in the store, a run on the tracking server."""
    import fsspec
    from mlflow.tracking import MlflowClient

    root, uri, experiment_id, i = job
    node = ray.get_runtime_context().get_node_id()
    with fsspec.open(f"{root}/probe/{i}.txt", "w") as f:
        f.write(node)
    client = MlflowClient(uri)
    client.set_terminated(client.create_run(experiment_id, tags={"node": node}).info.run_id)
    return node


@ray.remote(num_cpus=0, resources={"node2": 0.01}, runtime_env={"env_vars": {"LENSFLOW_FRESH_WORKER": "1"}})
def node2_environment(names: list[str]) -> list[str]:
    """Which of `names` a fresh worker on the second node has before lensflow sets anything (the runtime_env above
    forces a new worker: one that ran lensflow tasks has had the driver's credentials applied)."""
    return [n for n in names if n in os.environ]


def test_credentials_reach_workers_but_never_the_job_table(cluster):
    """The second node has no credential (its raylet's environment, a fresh worker's); a driver started with a
    credentialed tracking URI on its command line and secret names in ray.env_vars gets them to its Ray tasks, and
    the GCS job table (what the dashboard and the Jobs API show) holds neither the password nor the S3 secret."""
    import hashlib

    secrets = [MLFLOW_PASSWORD, cluster.s3.secret]
    names = ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
             "MLFLOW_TRACKING_PASSWORD"]
    raylet_env = psutil.Process(cluster.nodes.node2.raylet_pid()).environ()
    assert not [n for n in names if n in raylet_env]
    conf = load_config(None, [*TINY, *cluster.sets("creds")])
    with ModelPool(conf) as pool:
        assert ray.get(node2_environment.remote(names), timeout=60) == []
        assert len(nodes_in_use(pool, time.monotonic() + 60)) == 2
        # both nodes' actors write to the S3 store and log to the MLflow server with the driver's credentials
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(cluster.mlflow.url).create_experiment("credentials")
        jobs = [(conf.store.root, conf.tracking.uri, experiment_id, i) for i in range(8)]
        done = pool.map(write_and_log, jobs, desc="creds")
    assert len(set(done)) == 2
    runs = MlflowClient(cluster.mlflow.url).search_runs([experiment_id])
    assert sorted(r.data.tags["node"] for r in runs) == sorted(done)
    argv = [sys.executable, "-c", SEEN, cluster.nodes.address, "--set",
            f"tracking.uri=http://admin:{MLFLOW_PASSWORD}@127.0.0.1:{cluster.mlflow.port}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes, job_id = proc.stdout.strip().splitlines()[-2:]
    assert hashes == str({hashlib.sha256(MLFLOW_PASSWORD.encode()).hexdigest()})  # every task got the password
    jobs = {j.job_id.hex(): j for j in ray._private.worker.global_worker.gcs_client.get_all_job_info().values()}
    job = jobs[job_id]
    assert f"admin:***@127.0.0.1:{cluster.mlflow.port}" in job.entrypoint  # the command line, redacted
    runtime_env = job.config.runtime_env_info.serialized_runtime_env
    assert "TOKENIZERS_PARALLELISM" in runtime_env or "TOKENIZERS_PARALLELISM" not in os.environ
    for j in jobs.values():  # this test process's job too, and every earlier one
        shown = str(j)
        assert not [s for s in secrets if s in shown], j.entrypoint
        assert "MLFLOW_TRACKING_PASSWORD" not in j.config.runtime_env_info.serialized_runtime_env
    logs = "".join(p.read_text(errors="replace") for p in cluster.nodes.folder.rglob("*")
                   if p.is_file() and p.suffix in (".log", ".out", ".err") and p.stat().st_size < 50_000_000)
    assert not [s for s in secrets if s in logs]  # Ray's own logs and the servers' logs


def test_node_loss_mid_extraction_completes_and_node_is_used_again(cluster):
    """The second node's raylet is killed mid-run: its items go to the head's actor and the store completes,
    equal to a clean run's; the node is started again and its actor (restarted by Ray) gets work again."""
    conf = load_config(None, [*TINY, *cluster.sets("loss"), f"data.max_prompts={LOSS_PROMPTS}",
                              f"store.chunk_size={LOSS_CHUNK}"])
    texts = builtin_texts(LOSS_PROMPTS)
    result: dict = {}
    with ModelPool(conf) as pool:
        first = nodes_in_use(pool, time.monotonic() + 90)
        assert len(first) == 2  # one actor per node
        stage, _ = extraction.plan(conf, texts, pool.describe(), "loss")  # describe() now: map is not thread-safe
        worker = threading.Thread(target=lambda: result.update(ex=extraction.extract(conf, texts, pool, label="loss")))
        worker.start()
        done_at_kill = 0
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:
            try:
                done_at_kill = int(zarr.open_group(stage.url, mode="r")["done"][:].sum())
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
                pass
            if done_at_kill >= 6:
                break
            time.sleep(0.2)
        t_kill = time.monotonic()
        cluster.nodes.kill_node2_raylet()
        cluster.nodes.restart_node2()  # a node comes back while the run goes on
        worker.join(timeout=120)
        assert not worker.is_alive(), "the extraction hung after the node was lost"
        assert 6 <= done_at_kill < LOSS_PROMPTS // LOSS_CHUNK  # killed mid-run
        ex = result["ex"]
        assert ex.chunks_computed == LOSS_PROMPTS // LOSS_CHUNK
        acts, clean = store.Activations(ex.url), store.Activations(cluster.local["loss_store"])
        assert (acts.group["done"][:] == 1).all()
        for name in ("resid", "token_ids", "lengths"):
            np.testing.assert_array_equal(acts.group[name][:], clean.group[name][:])
        wait_for_nodes(ray, 2)
        again = nodes_in_use(pool, t_kill + 90)  # the restarted actor answers on the new node
        assert len(again) == 2 and len(again & first) == 1, (first, again)


def test_node_loss_during_per_layer_tasks_reruns_them(cluster):
    """Per-layer training runs as Ray tasks (map_remote): a task on the lost node runs again on the head, and every
    result comes back in order."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lensflow.tasks.core.ray_cluster import connect

    conf = load_config(None, [*TINY, *cluster.sets("tasks")])
    connect(conf.ray)
    wait_for_nodes(ray, 2)
    head = ray.get_runtime_context().get_node_id()
    log = StartLog.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    result: dict = {}
    jobs = [(log, i) for i in range(8)]
    worker = threading.Thread(target=lambda: result.update(out=map_remote(logged_layer_job, jobs, "layers", conf.ray)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [i for i, n in ray.get(log.all.remote()) if n != head]:
        time.sleep(0.1)
    lost = [(i, n) for i, n in ray.get(log.all.remote()) if n != head]
    assert lost, "no task started on the second node"
    cluster.nodes.node2.stop()  # the whole node (raylet and workers) while its task sleeps
    worker.join(timeout=120)
    assert not worker.is_alive(), "map_remote hung after the node was lost"
    assert result["out"] == list(range(8))
    assert (lost[0][0], head) in ray.get(log.all.remote())  # the lost task ran again, on the node that remained
    cluster.nodes.restart_node2()  # the tests after this one expect two nodes, the lost one gone
    wait_until(lambda: {x["NodeID"] for x in ray.nodes() if x["Alive"]} - {head, lost[0][1]}, 60, "a new node2")
    wait_for_nodes(ray, 2)


def test_auto_actors_go_on_with_fewer_after_a_node_is_lost_for_good_then_grow(cluster):
    """ray.actors=auto takes the free room (one actor per node here); the second node is stopped mid-extraction and
    nothing replaces it while the run goes on (max_restarts=0: its actor is gone for good), so the run finishes
    with one actor, equal to a clean run; a node that joins later gets a new actor."""
    from lensflow.tasks.core.ray_cluster import connect

    conf = load_config(None, [*TINY, *cluster.sets("elastic"), "ray.actors=auto", "ray.max_actors=4",
                              "ray.max_restarts=0", f"data.max_prompts={LOSS_PROMPTS}", f"store.chunk_size={LOSS_CHUNK}"])
    connect(conf.ray)
    wait_for_nodes(ray, 2)
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 2, 30, "the earlier tests' actors to be gone")
    texts = builtin_texts(LOSS_PROMPTS)
    result: dict = {}
    with ModelPool(conf) as pool:
        assert pool.size == 2  # the free room: 1 CPU on each node
        assert len(nodes_in_use(pool, time.monotonic() + 90)) == 2
        stage, _ = extraction.plan(conf, texts, pool.describe(), "loss")
        worker = threading.Thread(target=lambda: result.update(ex=extraction.extract(conf, texts, pool, label="loss")))
        worker.start()
        wait_until(lambda: not worker.is_alive() or _done(stage.url) >= 6, 60, "6 chunks")
        cluster.nodes.node2.stop()  # for good: no node comes back while the run goes on
        worker.join(timeout=120)
        assert not worker.is_alive(), "the extraction hung after the node was lost"
        assert _done(stage.url) == LOSS_PROMPTS // LOSS_CHUNK and result["ex"].chunks_computed >= 1
        acts, clean = store.Activations(result["ex"].url), store.Activations(cluster.local["loss_store"])
        for name in ("resid", "token_ids", "lengths"):
            np.testing.assert_array_equal(acts.group[name][:], clean.group[name][:])
        assert len(set(pool.nodes.values())) == 1  # finished with fewer actors
        cluster.nodes.restart_node2()  # a node joins: the pool grows onto it
        wait_for_nodes(ray, 2)
        assert len(nodes_in_use(pool, time.monotonic() + 90)) == 2 and pool.size == 3


def _done(url: str) -> int:
    try:
        return int(zarr.open_group(url, mode="r")["done"][:].sum())
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return 0


def test_weights_once_per_cluster_from_the_store(cluster, tmp_path_factory):
    """A model that is a folder on the driver's machine alone (the second node cannot see it) is written once under
    store.root/models by its identity; both nodes' actors load it from there, to the same weights."""
    import fsspec
    import torch
    from transformers import AutoModelForCausalLM

    from lensflow.tasks.core import weights
    from lensflow.tasks.core.models import tiny_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("model") / "tiny-llama-hf"  # under the tests' temporary folder: hidden
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    conf = load_config(None, [*TINY, *cluster.sets("weights"), f"model.name={folder}"])
    url = weights.url_for(conf)
    assert url.startswith(f"s3://{cluster.s3.bucket}/weights/models/tiny-llama-hf-") and not weights.complete(url)
    with ModelPool(conf) as pool:
        assert weights.complete(url)  # written by the driver before any actor starts
        assert len(nodes_in_use(pool, time.monotonic() + 60)) == 2  # node2's actor could load it only from there
        hashes = set(pool.map(weights_hash_of, list(range(6)), desc="weights"))
    assert len(hashes) == 1
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.exists(f"{path}/model.safetensors") and fs.exists(f"{path}/tokenizer.json")


def weights_hash_of(lm, item) -> str:
    return lm.weights_hash


def test_infeasible_requests_fail_in_seconds(cluster):
    """Requests no node can hold, and a local store.root on a multi-node cluster, fail in one line naming the
    key and what the cluster has, before any model loads."""
    cases = [("ray.cpus_per_actor=4", "ray.actors=2 with ray.cpus_per_actor=4 and 0 GPU each: the cluster can place 0 "
                                      "(2 node(s): 1 CPU/0 GPU, 1 CPU/0 GPU)"),
             ("ray.gpus_per_actor=1", "ray.gpus_per_actor=1: the cluster has 0 GPUs")]
    for key, message in cases:
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            ModelPool(load_config(None, [*EXTRACT, *cluster.sets("x"), key]))
        assert str(err.value) == message and time.monotonic() - t0 < 10
    local = load_config(None, [*EXTRACT, *cluster.sets("x"), f"store.root={Path.cwd() / 'store'}"])
    with pytest.raises(ConfigError, match=r"^store.root=.*: a local folder, and the Ray cluster has 2 nodes"):
        ModelPool(local)
    with pytest.raises(ConfigError, match=r"^needs a GPU: each task asks for 1 CPU and 1 GPU; no node has that"):
        map_remote(needs_a_gpu, [1], "needs a GPU", local.ray, num_gpus=1)


def test_a_stalled_stage_times_out_naming_it(cluster):
    """Model loads and items are waited for at most ray.timeout_s with nothing finishing, then the stage fails
    naming itself and what is up."""
    conf = load_config(None, [*EXTRACT, *cluster.sets("x"), "ray.timeout_s=1"])
    with ModelPool(conf) as pool:
        t0 = time.monotonic()  # no actor loads its model (importing torch alone takes seconds) in 1 s
        with pytest.raises(TimeoutError, match=r"^warm up: nothing finished in ray.timeout_s=1 s \(0 of 2 model "
                                               r"actors up, 2 of 2 items left; cluster 2 node\(s\)"):
            pool.map(sleep_item, [0.0, 0.0], desc="warm up")
        assert time.monotonic() - t0 < 5
        pool.timeout_s = 60  # what ray.timeout_s sets
        pool.map(sleep_item, [0.0, 0.0], desc="warm up")
        pool.timeout_s = 3
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"^slow stage: nothing finished in ray.timeout_s=3 s \([12] of 2 model"):
            pool.map(sleep_item, [30.0], desc="slow stage")
        assert time.monotonic() - t0 < 8


def test_default_address_never_joins_a_stale_cluster():
    """A ray.address where nothing answers fails in seconds, in one line; ray.address "" starts a private Ray even
    where RAY_ADDRESS and the file `ray start` leaves name a cluster that is gone (plain ray.init() would join it
    and hang for minutes). A fresh process: this one is connected already."""
    dead = f"127.0.0.1:{free_port()}"
    tmp_path = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    code = f"""
import ray
from lensflow.tasks.core.ray_cluster import connect
from lensflow.tasks.core.config import ConfigError, RayConf
try:
    connect(RayConf(address="{dead}", connect_timeout_s=3))
except ConfigError as exc:
    print(exc)
connect(RayConf())
print("nodes", len(ray.nodes()), ray.get_runtime_context().gcs_address)
"""
    env = {**os.environ, "RAY_ADDRESS": dead, "RAY_TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused, joined = proc.stdout.strip().splitlines()[-2:]
    assert refused.startswith(f"ray.address={dead}: nothing answers there within ray.connect_timeout_s=3 ")
    assert joined.startswith("nodes 1 127.0.0.1:") and dead not in joined and time.monotonic() - t0 < 60
