"""Extraction throughput on the two-node loopback cluster (S3 store) against a local run, same model and prompts.

Local: a private Ray on this machine, 2 actors of 1 CPU, a local store. Cluster: the head and a second node in
its own mount namespace (tests/twonode.py), 1 CPU each, one actor on each, the store on a `moto_server` S3
endpoint. Both pools are warm (every actor has loaded the model) before the timed extraction, so the ratio is the
cost of the object store and the second node, not of loading. Rounds alternate local and cluster.

    python benchmarks/bench_cluster.py [--model smollm2-135m] [--prompts 256] [--chunk 16] [--tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cluster helpers the tests use

from results import emit
from twonode import S3Server, TwoNodeCluster, wait_for_nodes  # noqa: E402

from lensflow.tasks.core import extraction  # noqa: E402
from lensflow.tasks.core.actors import ModelPool  # noqa: E402
from lensflow.tasks.core.config import CONF_DIR  # noqa: E402
from lensflow.tasks.core.models import describe  # noqa: E402
from lensflow.tasks.core.prompts import builtin_texts  # noqa: E402
from lensflow.tasks.registry import load_config  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


def warm(pool: ModelPool, timeout: float = 600) -> None:
    """Until every actor has answered (loaded its model)."""
    deadline = time.monotonic() + timeout
    while len(pool.nodes) < pool.size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pool.nodes)} of {pool.size} actors up after {timeout:g} s")
        pool.map(describe, [None] * pool.size, desc="warm up")


def tokens_per_s(args: argparse.Namespace, sets: list[str]) -> dict:
    conf = load_config(str(CONF_DIR / "default.yaml"), [
        f"model.name={args.model}", "ray.actors=2", "ray.cpus_per_actor=1", f"data.max_tokens={args.tokens}",
        f"store.chunk_size={args.chunk}", f"data.max_prompts={args.prompts}", *sets])
    with ModelPool(conf) as pool:
        warm(pool)
        ex = extraction.extract(conf, builtin_texts(args.prompts), pool, label="bench")
        nodes = len(set(pool.nodes.values()))
    ray.shutdown()
    assert ex.chunks_computed == ex.chunks_total, "the store was found, not computed"
    return {"tokens_per_s": ex.tokens_per_s, "tokens": ex.tokens_computed, "wall_s": ex.wall_s, "nodes": nodes}


def main() -> None:
    args = parse()
    folder = Path(tempfile.mkdtemp(prefix="lensflow-bench-"))
    driver = folder / "driver"  # the driver's working folder: hidden from the second node, like HOME
    driver.mkdir()
    os.chdir(driver)
    s3 = S3Server(folder)
    nodes = TwoNodeCluster(folder, hidden=[driver, Path.home()], env=s3.env)
    runs: dict[str, list[dict]] = {"local": [], "cluster": []}
    try:
        s3.start()
        nodes.start()
        s3.wait()
        nodes.wait()
        for r in range(args.rounds):
            runs["local"].append(tokens_per_s(args, [f"store.root={driver / f'store-{r}'}"]))
            os.environ.update({**s3.env, **nodes.env})
            ray.init(address=nodes.address, log_to_driver=False)
            wait_for_nodes(ray, 2)
            ray.shutdown()
            runs["cluster"].append(tokens_per_s(args, [f"ray.address={nodes.address}",
                                                        f"store.root=s3://{s3.bucket}/round-{r}"]))
            for k in s3.env:
                os.environ.pop(k)
    finally:
        ray.shutdown()
        nodes.stop()
        s3.stop()
        os.chdir(ROOT)
        shutil.rmtree(folder, ignore_errors=True)
    median = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    print(json.dumps({"args": vars(args), "runs": runs, "median_tokens_per_s": median,
                      "cluster_vs_local": median["cluster"] / median["local"]}, indent=1))
    emit("cluster", "extraction tokens/s", "two-node loopback cluster, S3 store", "one machine, local store",
         median["cluster"] / median["local"])


if __name__ == "__main__":
    main()
