"""Shared fixtures: one local Ray, one MLflow sqlite store and one Prefect test server per session (each costs
seconds to start), tiny random models for unit tests, the embedded SmolLM2 and Gemma 3 for integration tests."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from lensflow.tasks.core.config import Config, ModelConf  # noqa: E402
from lensflow.tasks.core.models import LM, load_model  # noqa: E402
from lensflow.tasks.registry import load_config  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2", "gptj", "gpt_neox", "gemma3"]

# modules that run flows in subprocesses, kill and rerun them (1-3 min each): `make test` runs two pytest-xdist
# workers, one module per worker at a time, and these go first so neither worker ends alone on a long one
LONG_MODULES = ["test_lens_stages", "test_hardening", "test_deployments", "test_cluster", "test_multilingual_flow",
                "test_integration_extract", "test_stages", "test_sweep", "test_future_lens_flow"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from lensflow.tasks.core.ray_cluster import METRICS_SWITCH

    if not ray.is_initialized():
        # held all session: as the CLI's local Ray, it exports no metrics (ray_cluster.no_metrics_export); set for
        # its own processes only, so the clusters tests start later keep Ray's default
        with pytest.MonkeyPatch.context() as env:
            env.setenv(METRICS_SWITCH, os.environ.get(METRICS_SWITCH, "0"))
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    from lensflow.flows.prefect_server import without_heartbeats

    with prefect_test_harness(server_startup_timeout=180), without_heartbeats():  # as on `lensflow run`'s own server
        yield


@pytest.fixture
def make_conf(tmp_path, tracking_uri):
    """A validated Config for a tiny model with a private store and the session's MLflow database."""

    def make(*overrides: str, model: str = "tiny-llama") -> Config:
        base = [f"model.name={model}", f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}",
                "ray.actors=1", "data.max_prompts=24", "data.max_tokens=16", "store.chunk_size=8"]
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_lms() -> dict[str, LM]:
    return {f: load_model(ModelConf(name=f"tiny-{f}")) for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2() -> LM:
    return load_model(ModelConf(name="smollm2-135m"))


@pytest.fixture(scope="session")
def gemma3() -> LM:
    return load_model(ModelConf(name="gemma3-270m"))
