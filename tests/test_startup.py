"""How the `lensflow` command starts (issue #20): Prefect's temporary server launched before anything heavy imports
and kept or stopped by Prefect's own settings; the flow's first model actor started while the rest comes up, and
taken by the pool that asks for the same actors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import ray

from lensflow.tasks.core import actors
from lensflow.tasks.core.actors import ModelPool, start_early
from lensflow.tasks.core.ray_cluster import METRICS_SWITCH, no_metrics_export

SERVER = """
import json, os, urllib.request
from lensflow.flows import prefect_server
prefect_server.launch()
launched = prefect_server._server.process.pid if prefect_server._server else None
prefect_server.start()
from prefect import flow
from prefect.settings import PREFECT_API_URL, get_current_settings
url = PREFECT_API_URL.value()
health = urllib.request.urlopen(url + "/health", timeout=5).status if prefect_server._server else None

@flow
def heartbeat_seconds():  # as the flow engine reads it
    return get_current_settings().flows.heartbeat_frequency

default = get_current_settings().flows.heartbeat_frequency
with prefect_server.heartbeats_off():
    heartbeat = heartbeat_seconds() if prefect_server._server else get_current_settings().flows.heartbeat_frequency
prefect_server.stop(5)
print(json.dumps({"launched": launched, "url": url, "env": os.environ.get("PREFECT_API_URL"), "health": health,
                  "heartbeat": heartbeat, "default": default,
                  "heartbeat_after": get_current_settings().flows.heartbeat_frequency}))
"""


def _server_script(tmp_path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {**base, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           **env}
    out = subprocess.run([sys.executable, "-c", SERVER], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOCAL_RAY = """
import json, psutil, ray
from lensflow.tasks.core.config import RayConf
from lensflow.tasks.core.ray_cluster import METRICS_SWITCH, connect
connect(RayConf())
ray.get(ray.remote(lambda: 0).remote())  # a worker has started too
switch = {}
for p in psutil.Process().children(recursive=True):
    if env := p.environ():  # empty where a new process title was written over it (Ray's agents)
        switch.setdefault(p.name(), set()).add(env.get(METRICS_SWITCH))
print(json.dumps({name: sorted(map(str, values)) for name, values in switch.items()}))
"""


def test_temporary_server_answers_on_loopback_and_stops(tmp_path):
    got = _server_script(tmp_path)
    assert got["url"].startswith("http://127.0.0.1:") and got["url"].endswith("/api")
    assert got["env"] == got["url"] and got["health"] == 200
    assert got["default"] is not None  # Prefect's default: on
    assert got["heartbeat"] is None and got["heartbeat_after"] == got["default"]  # off for flows on this server alone
    assert not psutil.pid_exists(got["launched"])


def test_a_profile_api_wins_and_the_launched_server_stops(tmp_path):
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    got = _server_script(tmp_path, PREFECT_PROFILES_PATH=str(profiles))
    assert got["launched"] is not None  # launched before Prefect's settings were read ...
    assert not psutil.pid_exists(got["launched"])  # ... and stopped once they named an API
    assert got["url"] == "http://127.0.0.1:9/api" and got["env"] is None and got["health"] is None
    assert got["heartbeat"] == got["default"] is not None  # a named server keeps Prefect's heartbeats


def test_pool_takes_the_early_actor_only_when_it_asks_for_the_same(ray_session, make_conf):
    conf = make_conf()
    try:
        early = start_early(conf)
        pid = ray.get(early.pid.remote())
        with ModelPool(conf) as pool:
            assert pool.size == 1 and ray.get(pool.actors[0].pid.remote()) == pid
        early = start_early(conf)
        pid = ray.get(early.pid.remote())
        with ModelPool(make_conf(model="tiny-gpt2")) as pool:  # another model: an actor of its own
            assert pool.size == 1 and ray.get(pool.actors[0].pid.remote()) != pid
        assert ray.get(early.pid.remote()) == pid  # still there for a pool of its config
    finally:
        for _, actor in actors._early.values():
            ray.kill(actor)
        actors._early.clear()


def test_every_process_of_a_local_ray_has_the_metrics_export_off(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != METRICS_SWITCH}
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    switch = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet", "ray::IDLE"} <= switch.keys(), switch
    assert all(values == ["0"] for values in switch.values()), switch
    monkeypatch.setenv(METRICS_SWITCH, "1")
    no_metrics_export()
    assert os.environ[METRICS_SWITCH] == "1"  # a user's own setting stands
