"""The `lensflow` command: run a flow, render a lens grid, or show a resolved config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

import psutil

from lensflow.tasks.core.config import Config, ConfigError, public_overrides
from lensflow.tasks.core.redact import redact_tree
from lensflow.tasks.registry import EXPERIMENTS, experiment, load_config

T = TypeVar("T")
STOP_WAIT_S = 2.0  # on the way out: for Prefect's queued logs to drain, and for leaving a joined Ray cluster
LENS_GRIDS = {kind: e for e in EXPERIMENTS.values() for kind in e.lens_grids}  # `lensflow lens --lens KIND`


def _sweep(args: argparse.Namespace) -> dict:
    """Validate every point (configs and input files) before Prefect, Ray or MLflow start; then the sweep flow."""
    from lensflow.flows import prefect_server
    from lensflow.flows.sweep import sweep_flow
    from lensflow.tasks.core.preflight import preflight
    from lensflow.tasks.sweep import grid as sweeps

    if args.file:
        spec = sweeps.load_sweep(args.file)
    elif args.flow and args.grid:
        spec = sweeps.from_command_line(args.flow, args.config, public_overrides(args.overrides), args.grid,
                                        args.max_parallel, args.deployment)
    else:
        raise ConfigError("lensflow sweep: give a FLOW with at least one --grid KEY=a,b,... or --file SWEEP.yaml")
    sweeps.validate_points(spec)
    preflight(experiment(spec.flow).resolved(load_config(spec.config, spec.set)), lambda c: None)
    _one_line_errors()
    prefect_server.start()
    with prefect_server.heartbeats_off():
        return sweep_flow(sweep=spec.model_dump())


class _NoConfigErrors(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback; a config error is the user's and a tracking outage
    is the server's, and the CLI prints each as one line, so Prefect's copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        from lensflow.tasks.core.tracking import outage

        return not (isinstance(exc, ConfigError) or outage(exc) is not None or "ConfigError" in message
                    or "TrackingUnavailable" in message)


class _RayStartLines(logging.Filter):
    """Ray starts while a run's checks run (see _start_services): its lines from before they pass (start-up notices)
    are dropped, so a bad input's error is the only line. Its warning that SIGTERM is left to the main thread, as it
    should be here, never shows."""

    holding = threading.Event()  # set while a run's checks run

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.holding.is_set() and "SIGTERM handler is not set" not in record.getMessage()


def _one_line_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoConfigErrors())
    for name in ("ray._private.worker", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).addFilter(_RayStartLines())
    # one warning per MLflow retry (and per heartbeat) while a tracking server is down; the outcome is one line
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def _stop(signum: int, frame: object) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):  # a second signal while stopping: out at once
        signal.signal(s, signal.SIG_DFL)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def _stoppable(fn: Callable[[], T]) -> T:
    """fn() in a daemon thread while this, the main thread, waits and takes SIGINT and SIGTERM itself. A flow blocked
    in Ray or Prefect (whose own SIGTERM handler is swapped in during a flow, and whose retries would run a stage
    again) cannot delay the stop: main() closes the MLflow runs KILLED and leaves (_leave_now), stopping what it
    started. Published stages are whole files, so nothing is lost."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    for s in (signal.SIGINT, signal.SIGTERM):  # also where the shell left SIGINT ignored (a background job)
        signal.signal(s, _stop)
    worker = threading.Thread(target=target, name="lensflow-flow", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # handlers run in the main thread between joins
    if "error" in box:
        raise box["error"]
    return box["result"]


def _start_services(conf: Config) -> Callable[[], None]:
    """Start what the flow will use while the checks run and its modules import, each mostly waiting on processes of
    its own: Prefect's temporary server (prefect_server.py) and, in a thread, the local Ray (or the cluster
    connection). The returned call waits for Ray, then starts the flow's first model actor (actors.start_early), whose
    model loads while the flow's modules import and the server comes up. One after the other, these were most of a
    2-prompt run's 20 s. A start that fails here is left to the flow, which starts it again and reports the error in
    its own words. Imports stay in the main thread, apart from Ray's own: two threads importing one package at once
    can meet a module the other has half imported.

    The Ray thread stays parked until the process exits: Ray's local processes die with the thread that started them
    (PR_SET_PDEATHSIG), not with the process."""
    from lensflow.flows import prefect_server
    from lensflow.tasks.core.ray_cluster import connect

    prefect_server.launch()
    ray_up = threading.Event()

    def start_ray() -> None:
        try:
            connect(conf.ray)
        except Exception:  # noqa: BLE001 - the flow's own start reports it
            pass
        ray_up.set()
        threading.Event().wait()

    threading.Thread(target=start_ray, name="lensflow-ray", daemon=True).start()

    def first_actor() -> None:
        from lensflow.tasks.core.actors import start_early

        while not ray_up.wait(0.2):  # Ctrl-C still reaches the main thread
            pass
        try:
            start_early(conf)
        except Exception:  # noqa: BLE001 - the flow's own pool reports it
            pass

    return first_actor


def _leave_now(code: int, drain_logs: bool = False) -> NoReturn:
    """Exit without waiting for the stopped flow's thread. What this process started (a local Ray, its model actors,
    Prefect's temporary server) is killed on the way out: flows publish whole files and close their MLflow runs
    first, so nothing is lost, and Ray's own graceful shutdown stops its processes one after another (1.2-1.5 s).
    A joined cluster is only left, as any driver leaves it. drain_logs: send Prefect's queued logs first, once no
    flow thread is left (a stopped flow's thread, given those seconds, would report its crash to a server about to
    stop, or start a new one)."""
    if drain_logs and "prefect.logging.handlers" in sys.modules:
        _within(STOP_WAIT_S, sys.modules["prefect.logging.handlers"].APILogWorker.drain_all)
    children = psutil.Process().children(recursive=True)
    if "ray" in sys.modules and not any(_name(child) == "raylet" for child in children):
        _within(STOP_WAIT_S, sys.modules["ray"].shutdown)  # a cluster (or none): disconnect
    for child in children:  # a stop while Ray starts kills what it started so far, the raylet's agents included
        try:
            child.kill()
        except psutil.Error:  # gone meanwhile
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:  # gone meanwhile
        return ""


def _within(seconds: float, fn: Callable[[], object]) -> None:
    done = threading.Thread(target=fn, daemon=True)
    done.start()
    done.join(seconds)


def _feature(conf, flow: str, ref: str, run_id: str | None) -> str:
    """`lensflow feature LAYER:ID`: the feature's page from a finished run (the newest of the flow and model unless
    --run-id), downloaded with the rest of its pages so the links work; its path, then the page as text."""
    import re

    import mlflow

    from lensflow.tasks.core import tracking
    from lensflow.tasks.core.dictionaries.pages import find_page, from_dict, page_path, terminal_text

    m = re.fullmatch(r"[Ll]?(\d+):(\d+)", ref.strip())
    if not m:
        raise ConfigError(f"lensflow feature: '{ref}' is not LAYER:ID (e.g. 3:42)")
    layer, feature = int(m.group(1)), int(m.group(2))
    tc = conf.tracking
    root = experiment(flow).feature_pages
    data = f"{root}/pages.json"
    run_id = run_id or tracking.latest_run(tc.uri, tc.experiment, flow, conf.model.name)
    if run_id is None:
        raise ConfigError(f"lensflow feature: no finished '{flow}' run of {conf.model.name} in experiment "
                          f"'{tc.experiment}' (tracking.uri); give --run-id")
    try:
        layers = [from_dict(d) for d in tracking.load_json(tc.uri, run_id, data)]
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing artifact or run
        raise ConfigError(f"lensflow feature: run {run_id} has no {data} (a run with feature pages?)") from None
    page = find_page(layers, layer, feature)
    if page is None:
        have = ", ".join(f"{lp.layer}:{lp.pages[0].feature}.." for lp in layers if lp.pages)
        raise ConfigError(f"lensflow feature: {layer}:{feature} has no page in run {run_id} (pages per layer: {have}; "
                          f"see {root}/index.html)")
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=root,
                                                 tracking_uri=tracking.local_uri(tc.uri))
    return f"{os.path.join(os.path.dirname(folder.rstrip('/')), page_path(layer, feature, root))}\n{terminal_text(page)}"


def main(argv: list[str] | None = None, owns_process: bool = False) -> int:
    """owns_process: called by `entry`, which exits the process after it; a run then starts Ray and Prefect's server
    before its checks (a failed check stops them on the way out), where a caller in a longer-lived process starts
    nothing for a run that fails them."""
    p = argparse.ArgumentParser(prog="lensflow", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default="conf/default.yaml", help="YAML config (path, or a name in conf/)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set data.max_prompts=64 (repeatable)")

    run = sub.add_parser("run", help="run a Prefect flow")
    run.add_argument("flow", choices=sorted(EXPERIMENTS))
    common(run)
    lens = sub.add_parser("lens", help="render a layer x token lens grid for a prompt (HTML + PNG, logged to MLflow)")
    lens.add_argument("prompt")
    lens.add_argument("--lens", choices=sorted(LENS_GRIDS), default="future")
    lens.add_argument("--run-id", default=None, help="MLflow run holding the trained soft prompts / tuned lens "
                                                     "(default: the latest finished run of the matching flow)")
    common(lens)
    feature = sub.add_parser("feature", help="a dictionary feature's page (path, then its top contexts as text)")
    feature.add_argument("ref", metavar="LAYER:ID", help="a layer (resid layer; block for transcoders) and a feature id, "
                                                        "e.g. 3:42")
    feature.add_argument("--flow", choices=sorted(EXPERIMENTS), default="multilingual")
    feature.add_argument("--run-id", default=None, help="MLflow run with feature pages (default: the latest finished "
                                                        "run of the flow and model)")
    common(feature)
    attribute = sub.add_parser("attribute", help="a prompt's attribution graph from per-layer transcoders (JSON, HTML, "
                                                 "PNG; replacement and completeness scores), logged to MLflow")
    attribute.add_argument("prompt")
    attribute.add_argument("--model", default=None, help="model.name (default: circuits.model, gemma3-270m)")
    common(attribute)
    sweep = sub.add_parser("sweep", help="run a flow over a grid of config values, one nested MLflow run per point")
    sweep.add_argument("flow", nargs="?", choices=sorted(EXPERIMENTS))
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=a,b,c",
                       help="a config key and its values; the points are the product of every --grid (repeatable)")
    sweep.add_argument("--file", help="a sweep file (flow, config, set, grid), e.g. conf/sweeps/fv_layer.yaml")
    sweep.add_argument("--max-parallel", type=int, default=1, help="points running at once")
    sweep.add_argument("--deployment", help="run points as runs of this Prefect deployment ('flow/deployment')")
    common(sweep)
    show = sub.add_parser("config", help="print the resolved config")
    common(show)
    args = p.parse_args(argv)

    try:
        if owns_process:  # from here, not only once the flow runs: starting takes seconds (see _stoppable)
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, _stop)
        if args.cmd == "sweep":
            print(json.dumps(redact_tree(_stoppable(lambda: _sweep(args))), indent=2, default=str))
            return 0
        if args.cmd == "attribute" and args.model:
            args.overrides.append(f"model.name={args.model}")
        conf = load_config(args.config, args.overrides)  # validate before anything starts
        if args.cmd == "config":
            print(json.dumps(redact_tree(conf.model_dump(mode="json")), indent=2))
            return 0
        if args.cmd == "run":
            from lensflow.flows import prefect_server

            exp = experiment(args.flow)
            resolved = exp.resolved(conf)
            _one_line_errors()
            started = None
            if owns_process:
                _RayStartLines.holding.set()
                started = _start_services(resolved)
            from lensflow.tasks.core.preflight import preflight  # torch, for the GPU count: after Ray's start

            preflight(resolved, exp.check_inputs)  # layer keys against the model the flow runs
            _RayStartLines.holding.clear()
            (started or _start_services(resolved))()
            flow = exp.flow_function()
            prefect_server.start()

            def run_flow() -> dict:
                with prefect_server.heartbeats_off():
                    return flow(config=args.config, overrides=public_overrides(args.overrides))

            result = _stoppable(run_flow)
            print(json.dumps(redact_tree(result), indent=2, default=str))
            return 0
        if args.cmd == "attribute":
            from lensflow.flows.circuits import attribute_command

            _one_line_errors()
            for kind, value in _stoppable(lambda: attribute_command(conf, args.prompt)).items():
                print(f"{kind}: {value}")
            return 0
        if args.cmd == "feature":
            print(_feature(experiment(args.flow).resolved(conf), args.flow, args.ref, args.run_id))
            return 0
        out = LENS_GRIDS[args.lens].grid_renderer(args.lens)(conf, args.prompt, args.lens, run_id=args.run_id)
        for kind, path in out.items():
            print(f"{kind}: {path}")
        return 0
    except ConfigError as err:
        print(f"lensflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        tracking = sys.modules.get("lensflow.tasks.core.tracking")  # not imported yet: no run to close
        closed = tracking.close_open_runs("KILLED") if tracking else []
        print(f"\nlensflow: stopped by {signum.name}; MLflow run(s) {', '.join(closed) or '(none open)'} closed as "
              "KILLED; every published stage is kept, and the same command resumes", file=sys.stderr)
        _leave_now(128 + signum)
    except Exception as err:
        from lensflow.tasks.core.tracking import outage

        if (down := outage(err)) is None:
            raise
        print(f"lensflow: error: {down}", file=sys.stderr)  # already one redacted line
        return 2


def entry() -> NoReturn:
    """The `lensflow` command: main(), then out at once. A normal interpreter exit waited about 5 s on Prefect's and
    Ray's exit handlers after a 2-prompt run; the run is over, its results printed and its MLflow runs closed."""
    _leave_now(main(owns_process=True), drain_logs=True)


if __name__ == "__main__":
    entry()
