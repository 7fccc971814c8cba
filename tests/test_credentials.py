"""Credentials travel to Ray workers by value, never in a runtime_env or a recorded command line; a model too large
for one GPU is planned across several; ray.actors=auto is read and bounded. No cluster here (tests/test_cluster.py
runs them on two nodes)."""

from __future__ import annotations

import pytest

from lensflow.tasks.core import credentials
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.registry import load_config


def test_secret_names_are_told_apart_from_plain_ones():
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "MY_API_KEY", "WANDB_KEY",
                 "AZURE_STORAGE_CONNECTION_STRING", "AWS_ENDPOINT_URL"):
        assert credentials.is_secret(name), name
    for name in ("HF_HOME", "LENSFLOW_CACHE", "TOKENIZERS_PARALLELISM", "KEYBOARD", "MONKEY", "HF_HUB_OFFLINE"):
        assert not credentials.is_secret(name), name
    plain, secret = credentials.split_env_vars(["HF_HOME", "MLFLOW_TRACKING_PASSWORD", "LENSFLOW_CACHE"])
    assert plain == ["HF_HOME", "LENSFLOW_CACHE"] and secret == ["MLFLOW_TRACKING_PASSWORD"]


def test_bundle_collects_the_drivers_values_and_never_shows_them(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-1")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "sekrit-2")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    bundle = credentials.collect(["MY_SERVICE_PASSWORD", "HF_HOME"])
    assert bundle.values["AWS_SECRET_ACCESS_KEY"] == "sekrit-1" and bundle.values["MY_SERVICE_PASSWORD"] == "sekrit-2"
    assert "HF_HOME" not in bundle.values and "MLFLOW_TRACKING_PASSWORD" not in bundle.values
    assert "sekrit" not in repr(bundle) and "AWS_SECRET_ACCESS_KEY" in repr(bundle)


def test_apply_fills_gaps_and_the_nodes_own_value_wins(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.in-cluster:9000")  # e.g. a KubeRay pod's own
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    credentials.apply(credentials.Bundle({"AWS_ENDPOINT_URL": "http://localhost:9000", "AWS_SECRET_ACCESS_KEY": "s"}))
    import os

    assert os.environ["AWS_ENDPOINT_URL"] == "http://minio.in-cluster:9000" and os.environ["AWS_SECRET_ACCESS_KEY"] == "s"
    credentials.apply(None)


def test_the_recorded_entrypoint_is_redacted(monkeypatch):
    import ray._private.utils as ray_utils

    monkeypatch.setattr(ray_utils, "get_entrypoint_name",
                        lambda: "lensflow run extract --set tracking.uri=https://admin:pw123@mlflow:5000")
    with credentials.redacted_entrypoint():
        assert ray_utils.get_entrypoint_name() == "lensflow run extract --set tracking.uri=https://admin:***@mlflow:5000"
    assert "pw123" in ray_utils.get_entrypoint_name()  # restored


def test_device_map_spreads_whole_blocks_over_two_devices():
    """ray.gpus_per_actor=2: the plan for two devices of equal room. Planned here with device ids and no GPU; the
    dispatch onto two real GPUs was not run (no GPU machine in CI)."""
    from transformers import AutoModelForCausalLM

    from lensflow.tasks.core.models import device_map, tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = device_map(model, {0: size, 1: size})
    blocks = {k: v for k, v in plan.items() if k.startswith("model.layers.")}
    assert len(blocks) == model.config.num_hidden_layers  # whole blocks, none split
    assert set(blocks.values()) == {0, 1} and plan["model.embed_tokens"] == 0 and plan["model.norm"] == 1


def test_auto_actors_are_read_and_bounded():
    conf = load_config(None, ["ray.actors=auto", "ray.min_actors=2", "ray.max_actors=8"])
    assert (conf.ray.actors, conf.ray.min_actors, conf.ray.max_actors) == ("auto", 2, 8)
    assert load_config(None, ["ray.actors=3"]).ray.actors == 3
    for sets, message in ((["ray.actors=0"], "config key 'ray.actors': expected a count of at least 1, or \"auto\""),
                          (["ray.actors=some"], "config key 'ray.actors': expected a count"),
                          (["ray.min_actors=4", "ray.max_actors=2"], "config key 'ray.max_actors': expected at least")):
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
            load_config(None, sets)


def test_shared_weights_identity_and_round_trip(tmp_path):
    """Where the cluster's copy goes (none on a private local Ray or for a tiny model), and a copy made through it
    loads to the same weights hash as the source folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from lensflow.tasks.core import weights
    from lensflow.tasks.core.models import load_model, tiny_config, tiny_tokenizer

    cluster = ["ray.address=127.0.0.1:6379", f"store.root={tmp_path / 'store'}", "store.shared=true"]
    assert weights.url_for(load_config(None, ["model.name=tiny-llama", *cluster])) is None
    hub = load_config(None, ["model.name=EleutherAI/gpt-j-6b", "model.revision=47e1693", *cluster])
    assert weights.url_for(hub) == f"{tmp_path / 'store'}/models/EleutherAI--gpt-j-6b-47e1693-float32"
    assert weights.url_for(load_config(None, ["model.name=EleutherAI/gpt-j-6b"])) is None  # a private local Ray
    assert weights.url_for(load_config(None, ["model.name=EleutherAI/gpt-j-6b", "ray.weights_cache=none",
                                              *cluster])) is None
    folder = tmp_path / "tiny-hf"
    tok = tiny_tokenizer()
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    conf = load_config(None, [f"model.name={folder}", *cluster])
    url = weights.publish(conf)
    assert url is not None and weights.complete(url) and weights.publish(conf) == url
    local = weights.fetch(url, tmp_path / "node-cache")
    assert local is not None and (local / "model.safetensors").is_file()
    assert load_model(conf.model, weights=url).weights_hash == load_model(conf.model).weights_hash


def test_gpu_slots_taken_from_the_prefect_limit_only_when_named():
    """ray.gpu_limit: a run holds its GPUs (ray.actors, or ray.max_actors with auto) in a Prefect global
    concurrency limit; without a limit, or without GPUs, nothing is asked of Prefect."""
    from contextlib import nullcontext

    from lensflow.tasks.core.session import gpu_slots, gpus_wanted

    def ray(*sets):
        return load_config(None, list(sets)).ray

    assert gpus_wanted(ray("ray.actors=8", "ray.gpus_per_actor=1")) == 8
    assert gpus_wanted(ray("ray.actors=auto", "ray.max_actors=3", "ray.gpus_per_actor=2")) == 6  # as far as it grows
    assert gpus_wanted(ray("ray.actors=4")) == 0  # gpus_per_actor auto: no GPU promised
    assert isinstance(gpu_slots(ray("ray.actors=8", "ray.gpus_per_actor=1")), nullcontext)
    assert isinstance(gpu_slots(ray("ray.gpu_limit=gpus", "ray.actors=2", "ray.gpus_per_actor=0")), nullcontext)
    assert not isinstance(gpu_slots(ray("ray.gpu_limit=gpus", "ray.actors=2", "ray.gpus_per_actor=1")), nullcontext)
