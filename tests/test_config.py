"""Bad input stops before any work with one line naming the key or file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.models import check_mappable
from lensflow.tasks.core.prompts import load_prompts
from lensflow.tasks.registry import load_config


def test_defaults_and_override_types():
    conf = load_config("conf/default.yaml", ["data.max_prompts=7", "store.layers=[0, 3]", "ray.address=auto"])
    assert conf.data.max_prompts == 7 and conf.store.layers == [0, 3] and conf.ray.address == "auto"
    assert conf.model.name == "smollm2-135m" and conf.tracking.uri.startswith("sqlite:///")


def test_paper_config_is_valid():
    conf = load_config("conf/gptj-6b.yaml")
    assert conf.model.name == "EleutherAI/gpt-j-6b" and conf.model.dtype == "float16"
    assert conf.data.max_prompts == 100_000


@pytest.mark.parametrize("override, needle", [
    ("data.promts_file=x.txt", "unknown config key 'data.promts_file'"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("store.chunk_size=abc", "config key 'store.chunk_size'"),
    ("store.chunk_size=0", "config key 'store.chunk_size'"),
    ("model.dtype=float8", "config key 'model.dtype'"),
    ("data.prompts_file=/no/such/file.txt", "config key 'data.prompts_file': file not found"),
    ("store", "--set expects KEY=VALUE"),
])
def test_bad_override_is_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config("conf/default.yaml", [override])
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_file_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  chunksize: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'store.chunksize'"):
        load_config(bad)


def test_empty_and_malformed_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    conf = load_config(None, [f"data.prompts_file={empty}"])
    with pytest.raises(ConfigError, match="data.prompts_file .*no prompts"):
        load_prompts(conf.data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_prompts(load_config(None, [f"data.prompts_file={bad}"]).data)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)))
    assert load_prompts(load_config(None, [f"data.prompts_file={good}"]).data) == [f"row {i}" for i in range(5)]


def test_unmappable_model_is_named(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    conf = load_config(None, [f"model.name={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model.name '.*': cannot map architecture 'bert'"):
        check_mappable(conf.model)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    store = tmp_path / "store"
    for args, needle in [
        (["--set", "data.promts_file=x"], "unknown config key 'data.promts_file'"),
        (["--set", f"data.prompts_file={empty}", "--set", f"store.root={store}", "--set", "model.name=tiny-llama",
          "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"], "no prompts"),
    ]:
        r = subprocess.run([sys.executable, "-m", "lensflow.flows.cli", "run", "extract", *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        err_lines = [l for l in r.stderr.splitlines() if l.startswith("lensflow: error:")]
        assert len(err_lines) == 1 and needle in err_lines[0]
    assert not store.exists()
