"""A two-node Ray cluster, an S3 server and nothing else shared, on one machine, for cluster tests.

The head and the second node are separate `ray start --block` process trees on 127.0.0.1 with their own ports,
temporary folder and token (RAY_AUTH_MODE=token on every process). The second node runs in its own mount
namespace with empty tmpfs folders over the driver's working directory and HOME, so whatever the driver keeps
locally is invisible to it, as it would be on a second machine; it carries the custom resource {"node2": 1}.
Everything is stopped by its own process ids (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from loopback import BIN, answers, free_port, kill_tree, wait_until

from lensflow.tasks.core import credentials

NODE2 = "node2"  # the second node's custom resource

# `ray start`, except that --node-ip-address=127.0.0.1 is kept: the CLI replaces a loopback address by the
# machine's outward address (then every Ray server listens on all interfaces); Ray's servers listen on loopback
# alone when the node's address is loopback. Tests bind to 127.0.0.1 only.
RAY_START = [sys.executable, "-c", "import sys; from ray._private import services; "
             "services.resolve_ip_for_localhost = lambda host: host; from ray.scripts.scripts import main; "
             "sys.argv[0] = 'ray'; main()", "start"]


def _ports(n: int, taken: set[int]) -> list[int]:
    """n free ports, none of them in `taken` (which gains them): each free_port() closes its socket, so the OS may
    hand out the same port again, and Ray refuses a port given to two of a cluster's components."""
    ports: set[int] = set()
    while len(ports) < n:
        if (port := free_port()) not in taken:
            ports.add(port)
    taken |= ports
    return sorted(ports)


def driver_token() -> str:
    """The token this process authenticates with: a Ray driver loads it once (RAY_AUTH_TOKEN, else
    ~/.ray/auth_token, which a local Ray writes) and keeps it, so the cluster is given the same one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip()
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # before this process first talks to any Ray
    return os.environ["RAY_AUTH_TOKEN"]


class S3Server:
    """`moto_server` on 127.0.0.1: an S3 endpoint with one bucket; `env` is what clients need to reach it."""

    def __init__(self, folder: Path, bucket: str = "lensflow"):
        self.port, self.bucket = free_port(), bucket
        self.secret = "s3-" + secrets.token_hex(8)  # moto takes any key; a distinct one shows where it leaks
        self.log = folder / "moto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def wait(self) -> None:
        wait_until(lambda: answers(self.url), 60, "moto_server")
        import s3fs

        s3fs.S3FileSystem(key="test", secret=self.secret, client_kwargs={"endpoint_url": self.url}).mkdir(self.bucket)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, signal.SIGTERM)


class RayNode:
    """One `ray start --block` process tree; killing its raylet makes `ray start` stop the rest (node loss)."""

    def __init__(self, name: str, folder: Path, argv: list[str], env: dict[str, str]):
        self.name, self.folder, self.argv, self.env = name, folder, argv, env
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def started(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
        return "Ray runtime started" in self.log.read_text()

    def raylet_pid(self) -> int:
        assert self.proc is not None
        raylets = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet"]
        assert len(raylets) == 1, raylets
        return raylets[0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid, signal.SIGKILL)
        self.proc = None


class TwoNodeCluster:
    """Head (1 CPU) + second node (1 CPU, {"node2": 1}, its own mount namespace) on 127.0.0.1.

    `hidden` are the folders the second node must not see (the driver's working directory, HOME, the test's
    temporary folders); `env` goes to every node (none: the driver holds the store's and tracking server's
    credentials, as a RayJob's driver holds a mounted Secret). Nothing secret is inherited from this process."""

    def __init__(self, folder: Path, hidden: list[Path], env: dict[str, str]):
        self.folder, self.hidden = folder, hidden
        self.port = free_port()
        self._taken = {self.port}  # every port the cluster's nodes were given
        self.token = driver_token()
        # no node inherits a credential from the test's own environment: only `env` (and the driver) hold them
        inherited = {k: v for k, v in os.environ.items() if not credentials.is_secret(k)}
        common = {**inherited, **env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                  "RAY_USAGE_STATS_ENABLED": "0",
                  # a lost node is declared dead in ~3 s instead of ~15 s (the GCS checks each node every second)
                  "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                  "RAY_health_check_failure_threshold": "3"}
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}  # what a driver needs
        head_temp = folder / "ray-head"
        head_temp.mkdir(parents=True, exist_ok=True)
        self.head = RayNode("head", folder, [
            *RAY_START, "--head", "--block", "--port", str(self.port), "--temp-dir", str(head_temp),
            *self._node_args(), "--include-dashboard=false",
            "--ray-client-server-port", str(_ports(1, self._taken)[0])], common)
        self.node2 = RayNode(NODE2, folder, self._node2_argv(), common)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _node_args(self) -> list[str]:
        p = _ports(6, self._taken)
        workers = ",".join(map(str, _ports(12, self._taken)))
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
                "--object-store-memory", str(200 * 2**20), "--node-manager-port", str(p[0]),
                "--object-manager-port", str(p[1]), "--dashboard-agent-listen-port", str(p[2]),
                "--dashboard-agent-grpc-port", str(p[3]), "--metrics-export-port", str(p[4]),
                "--runtime-env-agent-port", str(p[5]), "--worker-port-list", workers]

    def _node2_argv(self) -> list[str]:
        """A shell in a private mount namespace hides `hidden` under empty tmpfs folders, then becomes the node.
        The Python installation stays visible where it lies under a hidden folder (pyenv under HOME): a second
        machine has the software installed, only not the driver's files."""
        q = shlex.quote
        python = Path(sys.base_prefix).resolve()
        keep = self.folder / "python"
        keep.mkdir(exist_ok=True)
        steps = [f"mount --bind {q(str(python))} {q(str(keep))}"]
        for p in self.hidden:
            steps.append(f"mount -t tmpfs none {q(str(p))}")
            if python.is_relative_to(p):
                steps += [f"mkdir -p {q(str(python))}", f"mount --bind {q(str(keep))} {q(str(python))}"]
        mounts = " && ".join(steps)
        start = shlex.join([*RAY_START, "--block", "--address", self.address, *self._node_args(),
                            "--resources", json.dumps({NODE2: 1})])
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {start}"]

    def start(self) -> None:
        """Starts both nodes; call wait() for them (other services can start in between)."""
        self.head.start()
        wait_until(self.head.started, 60, "the Ray head")
        self.node2.start()

    def wait(self) -> None:
        wait_until(self.node2.started, 60, "the second Ray node")

    def restart_node2(self) -> None:
        self.node2.stop()
        self.node2 = RayNode(NODE2, self.folder, self._node2_argv(), self.node2.env)
        self.node2.start()
        self.wait()

    def kill_node2_raylet(self) -> None:
        os.kill(self.node2.raylet_pid(), signal.SIGKILL)

    def stop(self) -> None:
        for node in (self.node2, self.head):
            node.stop()


def wait_for_nodes(ray, n: int, timeout: float = 60) -> None:
    """Until the connected driver sees n live nodes."""
    wait_until(lambda: sum(1 for x in ray.nodes() if x["Alive"]) == n, timeout, f"{n} live Ray nodes", every=0.5)
