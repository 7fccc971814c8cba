"""Prefect's temporary server for one `lensflow` command: `prefect server start` as a child process on loopback,
found by the flow through PREFECT_API_URL, stopped when the command exits.

Prefect starts the same server by itself (its ephemeral mode) on a flow's first API call, but only after the driver
has imported Prefect's whole server package: about 3 s of CPU on the main thread, then the server's own 4 s start,
one after the other, in a 2-prompt run of about 20 s. Launched here before anything heavy imports, the server comes
up beside the driver's imports and Ray. Prefect's settings then decide (`start`): where it has an API to use
(PREFECT_API_URL in the active profile) or ephemeral mode is off, the launched server is stopped unused."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

LAUNCHES = 3  # a port taken between choosing it and the server binding it: another port, up to this many times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    def __init__(self) -> None:
        self.launches = 0
        self.in_use = False
        self._launch()

    def _launch(self) -> None:
        self.launches += 1
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-services", "--no-ui", "--log-level", "ERROR"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # stdout: a welcome banner; errors go to stderr
        if self.in_use:
            self.use()

    def use(self) -> None:
        """This process's Prefect clients (in every thread, and its child processes) use this server."""
        from prefect.context import refresh_global_settings_context

        self.in_use = True
        os.environ["PREFECT_API_URL"] = self.api_url
        refresh_global_settings_context()  # Prefect read the environment when it was imported

    def wait(self, timeout_s: float) -> None:
        """Until the server answers; fails in one line when it exits (its own message is on stderr) or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                if self.launches < LAUNCHES:
                    self._launch()
                    continue
                raise RuntimeError(f"Prefect's temporary server (`prefect server start --port {self.port}`) exited "
                                   f"with code {self.process.returncode} before answering")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prefect's temporary server on port {self.port} did not answer within "
                                   f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={timeout_s:g} s")
            time.sleep(0.1)

    def stop(self, wait_s: float) -> None:
        self.process.terminate()
        try:
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server: TemporaryServer | None = None  # this process's


def _new() -> None:
    global _server
    _server = TemporaryServer()
    atexit.register(stop, 2.0)  # `lensflow` kills it on its way out (os._exit); this for other callers


def launch() -> None:
    """Start the server now, unless the environment names an API; `start` decides whether the flow uses it."""
    if _server is None and not os.environ.get("PREFECT_API_URL"):
        _new()


def start() -> None:
    """Where Prefect has no API to use, the flow's clients use this process's server (launched now if `launch` was
    not called), once it answers; where it has one, a launched server is stopped."""
    global _server
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    ours = _server is not None and _server.in_use  # Prefect's API URL is then this server's
    if not ours and (settings.api.url or not settings.server.ephemeral.enabled):
        stop(2.0)
        _server = None
        return
    if _server is None:
        _new()
    _server.use()
    _server.wait(settings.server.ephemeral.startup_timeout_seconds)


def stop(wait_s: float) -> None:
    if _server is not None:
        _server.stop(wait_s)


@contextmanager
def without_heartbeats() -> Iterator[None]:
    """Flows run within this (in this thread) send no flow-run heartbeats. Heartbeats feed a server's zombie-run
    automations; a server that stops with its caller has no reader for them, and the flow engine waits up to 1 s at
    the end of every flow for its heartbeat thread, which sleeps in 1 s steps. Prefect's own test suite turns them off
    for the same cost."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def heartbeats_off() -> AbstractContextManager[None]:
    """without_heartbeats() while the flows use this process's server; a server named by PREFECT_API_URL keeps them."""
    return without_heartbeats() if _server is not None and _server.in_use else nullcontext()
