"""Real servers on 127.0.0.1 for integration tests: free ports, waiting with a deadline, stopping a process tree by
its own ids (never `ray stop` or a pattern kill, which would hit other work on the machine), `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ok, timeout: float, what: str, every: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := ok():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process this test started and every process under it, each by its id."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.RequestException:
        return False


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own database and proxied artifact folder; stop() and start() keep
    both."""

    def __init__(self, folder: Path, password: str | None = None):
        """password: MLflow's basic-auth app with that admin password (user `admin`); clients then need
        MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`auth_env`)."""
        self.folder, self.port, self.proc, self.password = folder, free_port(), None, password

    @property
    def auth_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.password or ""}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.folder / "server.log").open("a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        auth: list[str] = []
        if self.password is not None:
            ini = self.folder / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.folder / 'auth.db'}\n"
                           "admin_username = admin\nauthorization_function = "
                           "mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
            auth = ["--app-name", "basic-auth"]
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *auth,
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")], stdout=log, stderr=log, env=env)
        wait_until(lambda: self.proc.poll() is not None or answers(self.url + "/health"), 180, "mlflow server")
        assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]

    def stop(self) -> None:
        kill_tree(self.proc.pid, signal.SIGTERM)


def cli(*args: str) -> tuple[int, list[str]]:
    """The real `lensflow` command in its own process: (exit status, stderr lines)."""
    p = subprocess.run([sys.executable, "-m", "lensflow.flows.cli", *args], check=False, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr.strip().splitlines()
