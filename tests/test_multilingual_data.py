"""The shipped five-language corpus and antonym set, the flow's own default model, the language check, and
dictionaries through the SAELens layout: checked against the files themselves, HF generate and plain torch."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.dictionaries.saelens import export_sae, import_sae
from lensflow.tasks.multilingual import antonyms as ant
from lensflow.tasks.multilingual.config import LANGUAGES, MultilingualConf
from lensflow.tasks.multilingual.parallel import load_parallel
from lensflow.tasks.multilingual.plan import resolve_model
from lensflow.tasks.multilingual.sae import SparseAutoencoder
from lensflow.tasks.registry import load_config

HAN = re.compile(r"[\u4e00-\u9fff]")


def test_shipped_corpus_has_every_language_aligned_and_chinese_is_chinese():
    corpus = load_parallel(list(LANGUAGES))
    assert MultilingualConf().languages == list(LANGUAGES) == ["en", "fr", "es", "de", "zh"]
    assert {len(v) for v in corpus.values()} == {120}
    zh = corpus["zh"]
    assert all(len(HAN.findall(p)) > 0.6 * len(p) for p in zh)  # Han characters, not left-over English
    assert len(set(zh)) == 120  # no line duplicated (a shifted copy would misalign every later line)
    # alignment spot checks: numbers and names that survive translation
    for i, en_key, zh_key in ((8, "Great Wall", "长城"), (46, "Marie Curie", "居里"), (55, "1989", "一九八九"),
                              (77, "1876", "一八七六"), (102, "thunderstorm", "雷雨"), (119, "trumpet", "小号")):
        assert en_key in corpus["en"][i] and zh_key in zh[i], i


def test_unknown_language_and_a_user_file_subset(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'multilingual\.languages': unknown language code\(s\) \['xx'\]"):
        load_config(None, ["multilingual.languages=[en, xx]"])
    (tmp_path / "de.txt").write_text("Ein Hund.\nZwei Katzen.\n", encoding="utf-8")
    (tmp_path / "zh.txt").write_text("一只狗。\n两只猫。\n", encoding="utf-8")
    files = {"de": str(tmp_path / "de.txt"), "zh": str(tmp_path / "zh.txt")}
    assert load_parallel(["zh", "de"], files) == {"zh": ["一只狗。", "两只猫。"], "de": ["Ein Hund.", "Zwei Katzen."]}
    with pytest.raises(ConfigError, match=r"^multilingual\.files: no file for language 'en'"):
        load_parallel(["en", "zh"], files)


def test_the_flow_runs_gemma_unless_the_run_names_a_model():
    assert resolve_model(load_config(None, [])).model.name == "gemma3-270m"
    assert load_config(None, []).model.name == "smollm2-135m"  # the shared section keeps its default
    assert resolve_model(load_config(None, ["model.name=smollm2-135m"])).model.name == "smollm2-135m"
    assert resolve_model(load_config(None, ["multilingual.model=null"])).model.name == "smollm2-135m"
    assert resolve_model(load_config(None, ["multilingual.model=tiny-llama"])).model.name == "tiny-llama"


def test_antonym_set_covers_every_language(tmp_path):
    pairs = ant.load_antonyms(list(LANGUAGES))
    assert len(pairs) >= 30 and len({p.id for p in pairs}) == len(pairs)
    for p in pairs:
        for lang, e in p.entries.items():
            assert e.word and e.synonym and e.antonyms and e.word not in e.antonyms and e.synonym not in e.antonyms
            assert (lang == "zh") == bool(HAN.search(e.word + e.antonyms[0] + e.synonym)), (p.id, lang)
    line = json.loads(ant.ANTONYMS_FILE.read_text(encoding="utf-8").splitlines()[0])
    del line["zh"]
    bad = tmp_path / "a.jsonl"
    bad.write_text(json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a\.jsonl line 1: not an antonym record"):
        ant.load_antonyms(["en", "zh"], bad)
    assert ant.answer_of(' large" and') == "large" == ant.answer_of('large." he') and ant.answer_of("大。”") == "大"
    assert ant.is_right("Groß", pairs[0].entries["de"]) and not ant.is_right("klein", pairs[0].entries["de"])


def test_greedy_answers_equal_hf_generate(tiny_lms):
    lm = tiny_lms["gemma3"]
    text = ant.prompt("en", "small")
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = ant.greedy(lm.model, lm.tokenizer, text, max_new_tokens=4)
    want = lm.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert want.startswith(got) and got  # greedy stops early only at a quote or newline


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_saelens_round_trip_keeps_codes_and_reconstructions(tmp_path, activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 48, activation, k=5, seed=3)
    x = torch.randn(200, 16) * 7 + 2
    sae.fit_input(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    folder = export_sae(sae, tmp_path / "layer_03", hook_name="blocks.3.hook_resid_pre", hook_layer=3)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 48 and cfg["hook_layer"] == 3
    back = import_sae(folder)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back(x)[0], sae(x)[0], atol=1e-4, rtol=1e-4)
        # SAELens's own formula on the stored tensors, by hand
        from safetensors.torch import load_file
        w = load_file(folder / "sae_weights.safetensors")
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if activation == "topk":
            v, i = pre.topk(5, -1)
            z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        else:
            z = torch.relu(pre)
        torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], sae(x)[0], atol=1e-3, rtol=1e-4)


def test_import_rejects_other_layouts_with_one_line(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"encoder.weight": torch.zeros(4, 2)}, other / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^dictionary\.import: .*other is not a SAELens folder"):
        import_sae(other)
    sae = export_sae(SparseAutoencoder(4, 8, "topk", k=2), tmp_path / "ok")
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps({**cfg, "activation_fn_kwargs": {"k": 9}}))
    with pytest.raises(ConfigError, match=r"cfg\.json: k=9 does not fit d_sae=8"):
        import_sae(sae)
    (sae / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 6}))
    with pytest.raises(ConfigError, match=r"W_enc missing or not of shape \(4, 6\)"):
        import_sae(sae)


def test_transcoder_learns_the_mlp_and_its_spliced_loss_matches_a_plain_hook(tiny_lms):
    from lensflow.tasks.core.dictionaries.transcoder import (
        Transcoder,
        evaluate_transcoder,
        mlp_pairs,
        spliced_loss,
        train_transcoder,
    )

    lm = tiny_lms["gemma3"]  # post-MLP norm: the target is what enters the residual stream, not the raw MLP
    texts = [f"Text number {i} says {'abc' * (i % 5)} and more words {i * 7}" for i in range(24)]
    x, y = mlp_pairs(lm, texts, 1, 24)
    with torch.no_grad():  # the pairs are the block's own: post-norm(MLP(mlp_in)) = mlp_out
        torch.testing.assert_close(lm.mlp_resid(1)(lm.mlp(1)(x)), y, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    tc = Transcoder(lm.d_model, lm.d_model, 4 * lm.d_model, k=8)
    before = evaluate_transcoder(tc, x, y)
    train_transcoder(tc, x, y, steps=300, batch_tokens=128, lr=3e-3)
    m = evaluate_transcoder(tc, x, y)
    assert m.fve > max(0.5, before.fve + 0.3) and m.l0 <= 8 and 0 <= m.dead < 1
    y_hat = tc(x)[0].detach().double()
    ref_fve = 1 - ((y_hat - y.double()) ** 2).sum() / ((y.double() - y.double().mean(0)) ** 2).sum()
    assert abs(m.fve - float(ref_fve)) < 1e-6

    got = spliced_loss(lm, tc, 1, texts[:6], 24)
    enc = lm.encode(texts[:6], max_tokens=24)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    seen = {}
    h1 = lm.mlp(1).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = lm.mlp_resid(1).register_forward_hook(lambda m, a, o: tc(seen["x"])[0].to(o.dtype))
    try:
        with torch.no_grad():
            loss = lm.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    finally:
        h1.remove()
        h2.remove()
    with torch.no_grad():
        clean = lm.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert abs(got.clean - float(clean)) < 1e-4 and abs(got.spliced - float(loss)) < 1e-4
    assert got.delta != 0


def test_a_k_wider_than_the_sae_is_one_line(make_conf):
    from lensflow.tasks.core.models import ModelId, ModelInfo
    from lensflow.tasks.multilingual.plan import sae_jobs

    conf = make_conf("multilingual.sae.expansion=1", "multilingual.sae.k=65")
    info = ModelInfo(ModelId("tiny", None, "float32", "w", "t"), 4, 64, 4, 16, 257)
    with pytest.raises(ConfigError, match=r"^config key 'multilingual\.sae\.k': 65 exceeds the SAE width 64"):
        sae_jobs(conf, info, None, {}, {}, [1], None)
