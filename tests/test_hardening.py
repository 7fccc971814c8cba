"""Issue #12: bad input fails first and in one line; secrets stay out of everything lensflow writes; a local run
listens on loopback only; a killed run is closed by the next one; a tracking outage loses nothing.

The bad-input table calls the CLI in-process (preflight runs before Prefect or any model, so each row takes
seconds). The rest is one scenario on a real `mlflow server` on 127.0.0.1, with real CLI subprocesses: run A is
SIGKILLed once its MLflow run exists; run B closes it as stale, then loses the server mid-run; run C, after the
server restarts on the same port and database, finds the store and logs everything. Each test asserts one part."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import psutil
import pytest
import zarr
from loopback import BIN, MlflowServer, answers, free_port, kill_tree, wait_until
from mlflow.tracking import MlflowClient
from prefect.settings import (
    Settings,  # what the CLI subprocesses read (env, profile), not a test harness's override
)

import lensflow.flows.cli as cli  # sets the CLI's MLflow HTTP retry defaults in this process too
from lensflow.tasks.core import tracking
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.registry import load_config

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
NO_AWS = {"AWS_EC2_METADATA_DISABLED": "true",  # never ask the cloud metadata address for credentials
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def _serve(folder: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *a) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback holding one bucket: a store.root there fails only for want of credentials."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url), 60, "moto_server")
        import s3fs

        s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": url}).mkdir("lensflow-hardening")
        yield url
    finally:
        kill_tree(proc.pid, signal.SIGTERM)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a hung server), for the tracking timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


# (id, --set overrides or ("--flag", value), substrings the one line must hold, environment); {names} are filled in
# from the test's context: files it wrote, a closed port, a silent port, the S3 endpoint.
BAD = [
    ("layers-empty", ["store.layers=[]"], ["store.layers"], {}),
    ("layers-negative", ["store.layers=[-1]"], ["store.layers", "-1"], {}),
    ("layers-beyond-model", ["store.layers=[0, 9]"], ["store.layers", "[9]", "0..4"], {}),  # tiny-gpt2: 4 blocks
    ("store-unwritable", ["store.root=/proc/lensflow/store"], ["store.root", "/proc"], {}),
    ("store-s3-no-credentials", ["store.root=s3://lensflow-hardening/store"], ["store.root", "credentials"],
     {"AWS_ENDPOINT_URL": "{s3}"}),
    ("tracking-scheme", ["tracking.uri=foo://bar"], ["tracking.uri", "foo://bar"], {}),
    ("tracking-closed-port", ["tracking.uri=http://127.0.0.1:{closed}"], ["tracking.uri", "refused"], {}),
    ("tracking-silent", ["tracking.uri=http://127.0.0.1:{silent}"], ["tracking.uri", "timed out"], {}),
    ("tracking-experiment-empty", ["tracking.experiment="], ["tracking.experiment"], {}),
    ("tracking-stale-below-heartbeat", ["tracking.heartbeat_s=60", "tracking.stale_after_s=30"],
     ["tracking.stale_after_s"], {}),
    ("prompts-not-utf8", ["data.prompts_file={tmp}/latin1.txt"], ["latin1.txt", "UTF-8"], {}),
    ("prompts-empty", ["data.prompts_file={tmp}/empty.txt"], ["empty.txt", "no prompts"], {}),
    ("prompts-bad-jsonl", ["data.prompts_file={tmp}/rows.jsonl"], ["rows.jsonl", "line 2"], {}),
    ("prompts-missing", ["data.prompts_file=/no/such/prompts.txt"], ["data.prompts_file", "/no/such/prompts.txt"], {}),
    ("prompts-url-404", ["data.prompts_file=http://127.0.0.1:{web}/nope.txt?token=abc"], ["nope.txt?token=***", "404"],
     {}),
    ("ray-address", ["ray.address=garbage"], ["ray.address", "garbage"], {}),
    ("ray-cpus", ["ray.cpus_per_actor=1000"], ["ray.cpus_per_actor=1000"], {}),
    ("unknown-key", ["store.nosuch=1"], ["store.nosuch"], {}),
    ("config-missing", ["--config", "{tmp}/nope.yaml"], ["nope.yaml"], {}),
]


class _Context(dict):
    """Placeholders resolved on first use, so only the S3 row starts the S3 server."""

    def __init__(self, request, **known):
        super().__init__(**known)
        self.request = request

    def __missing__(self, key: str) -> str:
        self[key] = {"s3": lambda: self.request.getfixturevalue("s3_endpoint"),
                     "web": lambda: str(self.request.getfixturevalue("web_root").server_address[1])}[key]()
        return self[key]


@pytest.fixture(scope="module")
def web_root(tmp_path_factory):
    """An HTTP server on loopback for files of a temporary folder (prompts by URL)."""
    folder = tmp_path_factory.mktemp("web")
    httpd = _serve(folder)
    httpd.folder = folder
    yield httpd
    httpd.shutdown()


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_first_in_one_line(case, tmp_path, monkeypatch, capsys, silent_port, request):
    _, sets, needles, env = case
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written to a relative default (.lensflow/) would show up here
    ctx = _Context(request, tmp=str(tmp_path), closed=str(free_port()), silent=str(silent_port))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**NO_AWS, **env}.items():
        monkeypatch.setenv(k, v.format_map(ctx))
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    argv, items = ["run", "extract"], iter(["model.name=tiny-gpt2", f"store.root={store}", f"tracking.uri=sqlite:///{db}",
                                             *(s.format_map(ctx) for s in sets)])
    for item in items:
        argv += [item, next(items)] if item.startswith("--") else ["--set", item]
    capsys.readouterr()
    t0 = time.monotonic()
    rc = cli.main(argv)
    seconds = time.monotonic() - t0
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert rc == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("lensflow: error: "), out.err
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert "Traceback" not in out.err + out.out
    assert not store.exists() and not db.exists() and not any(work.iterdir())
    assert seconds < 15, f"{seconds:.1f} s"


def test_dead_tracking_server_fails_in_seconds_in_one_redacted_line():
    """MLflow's own client (after the CLI's retry defaults): a closed port gives up in seconds, not minutes."""
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    uri = f"http://user:hunter2@127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as exc:
        tracking.RunRef(uri, "0", "r").client.get_experiment_by_name("x")
    assert time.monotonic() - t0 < 20
    msg = str(exc.value)
    assert "\n" not in msg and "hunter2" not in msg and "user:***@" in msg and "Connection refused" in msg


# ---------------------------------------------------------------------------------- reuse and stale-run rules

def test_reuse_accepts_only_finished_runs_of_the_same_model(tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = tracking.experiment_id(tracking_uri, f"reuse-{uuid.uuid4().hex[:6]}")

    def run(status: str | None, tags: dict) -> str:
        r = client.create_run(exp, tags=tags)
        if status:
            client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    good = run("FINISHED", {"model.name": "tiny-gpt2", "model.weights_hash": "abc"})
    client.log_param(good, "future_lens.n_future", "4")
    tracking.check_reusable(tracking_uri, good, "tiny-gpt2", "abc", {"future_lens.n_future": 4})
    bad = [
        (run(None, {"model.name": "tiny-gpt2"}), {}, "is RUNNING, not FINISHED"),
        (run("KILLED", {"model.name": "tiny-gpt2"}), {}, "is KILLED, not FINISHED"),
        (run("FINISHED", {"model.name": "tiny-llama"}), {}, "of model 'tiny-llama', not model.name 'tiny-gpt2'"),
        (good, {"weights_hash": "other"}, "other weights"),
        (good, {"settings": {"future_lens.n_future": 2}}, "future_lens.n_future=4, not 2"),
        ("0" * 32, {}, "not found"),
    ]
    for run_id, kwargs, needle in bad:
        with pytest.raises(ConfigError) as exc:
            tracking.check_reusable(tracking_uri, run_id, "tiny-gpt2", **kwargs)
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert tracking.latest_run(tracking_uri, client.get_experiment(exp).name, "x") is None


def test_stale_rule_spares_nested_runs_of_live_runs(tracking_uri):
    """A per-layer child run older than stale_after_s lives as long as its parent's heartbeat does."""
    client = MlflowClient(tracking_uri)
    exp = tracking.experiment_id(tracking_uri, f"stale-{uuid.uuid4().hex[:6]}")
    long_ago = int((time.time() - 3600) * 1000)
    live = client.create_run(exp, start_time=long_ago, tags={tracking.HEARTBEAT: f"{time.time():.0f}"}).info.run_id
    child = client.create_run(exp, start_time=long_ago, tags={"mlflow.parentRunId": live}).info.run_id
    dead = client.create_run(exp, start_time=long_ago, tags={tracking.HEARTBEAT: f"{time.time() - 1800:.0f}"}).info.run_id
    orphan = client.create_run(exp, start_time=long_ago, tags={"mlflow.parentRunId": dead}).info.run_id
    slow = client.create_run(exp, start_time=long_ago, tags={tracking.HEARTBEAT: f"{time.time() - 700:.0f}",
                                                             tracking.HEARTBEAT_S: "300"}).info.run_id  # 3 beats: 900 s
    me = client.create_run(exp).info.run_id
    conf = load_config(None, [f"tracking.uri={tracking_uri}"]).tracking
    closed = tracking.close_stale(tracking.RunRef(tracking_uri, exp, me), conf)
    assert sorted(closed) == sorted([dead, orphan])
    for run_id, status in [(live, "RUNNING"), (child, "RUNNING"), (slow, "RUNNING"), (me, "RUNNING"),
                           (dead, "KILLED"), (orphan, "KILLED")]:
        assert client.get_run(run_id).info.status == status
    assert client.get_run(dead).data.tags[tracking.CLOSED_BY].startswith(f"run {me}: no heartbeat for 18")


# ----------------------------------------------------------------------------------- the live-server scenario

class CliRun:
    """`python -m lensflow.flows.cli run extract ...` as a subprocess whose listening sockets are sampled."""

    def __init__(self, folder: Path, name: str, sets: list[str], env: dict[str, str]):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        args = [a for s in sets for a in ("--set", s)]
        with self.out.open("w") as o, self.err.open("w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "lensflow.flows.cli", "run", "extract", *args],
                                         stdout=o, stderr=e, env=env)
        self.sockets: set[tuple[int, str, str, int]] = set()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                        self.sockets.add((p.pid, p.name(), c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def wait(self, until=None, timeout: float = 420.0):
        """Sample sockets until `until()` is truthy (its value is returned) or, without it, until the exit code."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sample()
            if until is not None and (value := until()):
                return value
            if self.proc.poll() is not None:
                assert until is None, f"exited {self.proc.returncode} first:\n{self.text()[-3000:]}"
                return self.proc.returncode
            time.sleep(0.25)
        kill_tree(self.proc.pid)
        raise AssertionError(f"timed out:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()


@dataclass
class Scenario:
    secrets: list[str]
    server: MlflowServer
    store: Path
    killed: str = ""  # run A's MLflow run
    cut: str = ""  # run B's
    outage_rc: int | None = None
    outage_err: str = ""
    rerun_rc: int | None = None
    rerun_out: str = ""
    runs: list[CliRun] = field(default_factory=list)

    def client(self) -> MlflowClient:
        return MlflowClient(self.server.url)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, web_root):
    tmp = tmp_path_factory.mktemp("hardening")
    secrets = [f"SECRET{i}x{uuid.uuid4().hex[:10]}" for i in (1, 2, 3)]
    (web_root.folder / "prompts.txt").write_text("\n".join(builtin_texts(96)) + "\n")
    server = MlflowServer(tmp)
    server.start()
    sc = Scenario(secrets, server, tmp / "store")
    experiment = "hardening"
    sets = ["model.name=tiny-gpt2", f"store.root={sc.store}", f"tracking.experiment={experiment}",
            f"tracking.uri=http://lensflow:{secrets[0]}@127.0.0.1:{server.port}",
            f"data.prompts_file=http://127.0.0.1:{web_root.server_address[1]}/prompts.txt?token={secrets[1]}",
            "data.max_prompts=96", "data.max_tokens=32", "store.chunk_size=16", "ray.actors=1",
            "tracking.heartbeat_s=1", "tracking.stale_after_s=3"]
    env = {**os.environ, **NO_AWS, "HF_TOKEN": secrets[2]}
    client = sc.client()

    def runs(status: str) -> list[str]:
        exp = client.get_experiment_by_name(experiment)
        return [r.info.run_id for r in client.search_runs([exp.experiment_id], f"attributes.status = '{status}'")] \
            if exp else []

    try:
        a = CliRun(tmp, "a", sets, env)  # killed as soon as its MLflow run exists
        sc.runs.append(a)
        sc.killed = a.wait(lambda: (r := runs("RUNNING")) and r[0])
        kill_tree(a.proc.pid)
        b = CliRun(tmp, "b", sets, env)  # closes A, then loses the server mid-run
        sc.runs.append(b)
        b.wait(lambda: client.get_run(sc.killed).info.status != "RUNNING")
        sc.cut = b.wait(lambda: (r := runs("RUNNING")) and r[0])
        b.wait(lambda: f"MLflow run {sc.cut} (experiment" in b.text())  # printed once its params are logged
        server.stop()  # the flow goes on computing; its next MLflow call finds the server gone
        sc.outage_rc, sc.outage_err = b.wait(), b.err.read_text()
        server.start()
        c = CliRun(tmp, "c", sets, env)  # the same command again
        sc.runs.append(c)
        sc.rerun_rc, sc.rerun_out = c.wait(), c.text()
        yield sc
    finally:
        for r in sc.runs:
            kill_tree(r.proc.pid)
        server.stop()


def test_killed_run_is_closed_by_the_next_run(scenario):
    run = scenario.client().get_run(scenario.killed)
    assert run.info.status == "KILLED"
    closer = run.data.tags[tracking.CLOSED_BY]
    assert closer.startswith(f"run {scenario.cut}: no heartbeat for ") and "tracking.stale_after_s=3" in closer


def test_tracking_outage_fails_in_one_line_and_keeps_the_store(scenario):
    assert scenario.outage_rc == 2, scenario.outage_err[-3000:]
    lines = [l for l in scenario.outage_err.splitlines() if l.startswith("lensflow: error: ")]
    assert len(lines) == 1, scenario.outage_err[-3000:]
    assert f"tracking.uri http://lensflow:***@127.0.0.1:{scenario.server.port}: the MLflow server stopped answering (" \
           in lines[0] and "rerun the same command" in lines[0]
    assert "Traceback" not in scenario.outage_err and "Retrying" not in scenario.outage_err


def test_rerun_after_outage_finds_the_store_and_logs_everything(scenario):
    assert scenario.rerun_rc == 0, scenario.rerun_out[-3000:]
    client = scenario.client()
    exp = client.get_experiment_by_name("hardening").experiment_id
    done = client.search_runs([exp], "attributes.status = 'FINISHED'")
    assert len(done) == 1
    m = {k.split("/", 1)[-1]: v for k, v in done[0].data.metrics.items()}  # names without their dashboard section
    assert m["extract.prompts.n_prompts"] == 96 and m["extract.prompts.chunks_total"] == 6
    assert m["extract.prompts.chunks_computed"] == 0 and m["extract.prompts.chunks_resumed"] == 6
    assert done[0].data.tags["model.name"] == "tiny-gpt2" and "model.weights_hash" in done[0].data.tags
    assert client.get_run(scenario.cut).info.status in ("KILLED", "FAILED")  # the cut run is closed too


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_no_secret_leaves_the_process(scenario, tmp_path):
    """The tracking password, the prompts URL's token and HF_TOKEN appear in none of: the runs' MLflow params, tags
    and downloaded artifacts, the server's raw database and artifact folder, the printed output, the store (zarr
    attributes and every other file), Prefect's database (flow run parameters). Sources that would hold a secret
    if redaction failed are first shown to hold its redacted form."""
    sc, client = scenario, scenario.client()
    texts: dict[str, str] = {}
    exp = client.get_experiment_by_name("hardening").experiment_id
    for run in client.search_runs([exp]):
        texts[f"mlflow run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
        folder = tmp_path / run.info.run_id
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder), tracking_uri=sc.server.url)
        texts.update({f"artifact {p}": p.read_bytes().decode("latin-1") for p in _files_under(folder)})
    assert "token=***" in texts[f"mlflow run {sc.cut}"] and "lensflow:***@" in texts[f"mlflow run {sc.cut}"]
    texts.update({f"output of {r.out.stem}": r.text() for r in sc.runs})
    assert "lensflow:***@" in texts["output of c"]
    groups = [p.parent for p in sc.store.rglob("zarr.json") if json.loads(p.read_text()).get("node_type") == "group"]
    attrs = [dict(zarr.open_group(str(g), mode="r").attrs) for g in groups]
    assert any(a.get("complete") for a in attrs)
    texts["store attributes"] = json.dumps(attrs)
    for p in [*_files_under(sc.store), *_files_under(sc.server.folder)]:
        if p.suffix not in (".out", ".err", ".txt"):  # outputs are read above; prompts.txt is the served input
            texts[str(p)] = p.read_bytes().decode("latin-1")
    db = Path(Settings().server.database.connection_url.get_secret_value().split(":///", 1)[1])
    texts["prefect database"] = "".join(p.read_bytes().decode("latin-1") for p in db.parent.glob(f"{db.name}*"))
    assert "token=***" in texts["prefect database"]  # the flow runs' parameters are there, redacted
    found = {source: [s[:7] for s in sc.secrets if s in text] for source, text in texts.items()}
    assert not {k: v for k, v in found.items() if v}


def test_local_run_listens_on_loopback_only(scenario):
    seen = {s for r in scenario.runs[1:] for s in r.sockets}
    roots = {r.proc.pid for r in scenario.runs}
    assert len(seen) >= 3 and {pid for pid, *_ in seen} - roots, seen  # Ray's processes were sampled too
    assert {ip for _, _, ip, _ in seen} <= LOOPBACK, sorted(seen)
