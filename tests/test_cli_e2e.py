"""End to end: `hylorada finetune`, `compress` and `analyze` on a tiny Llama folder (saved with its
tokenizer, tests/conftest.py) and a small jsonl corpus; every number they print is checked by
hand from the files they write: weights merged by W + (alpha/r)·B·A, perplexity by
exp(mean cross-entropy) over non-overlapping windows, parameters by summing numel, ranks by
floor((1 - ratio)·m·n/(m+n)) and by the cumulative σ² of torch.linalg.svdvals."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hylorada.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def ppl_by_hand(model, ids: torch.Tensor, seq_len: int) -> float:
    """exp(total NLL / scored tokens), windows [0, L), [L, 2L), ..., positions 1..len-1 scored."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[1], seq_len):
            w = ids[:, s:s + seq_len]
            if w.shape[1] < 2:
                continue
            logits = model(input_ids=w).logits.float()
            total += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return math.exp(total / n)


def split_ids(tiny_assets):
    """The test split's ids (hylorada.data), cut as the commands cut them."""
    from transformers import AutoTokenizer

    from hylorada import data

    model_dir, corpus = tiny_assets
    return data.eval_split(AutoTokenizer.from_pretrained(model_dir), corpus, "test")[1]


def test_finetune_saves_an_adapter_that_gives_the_printed_perplexity(tiny_assets, tmp_path, capsys):
    model_dir, corpus = tiny_assets
    out = tmp_path / "ft"
    assert main(["finetune", "--model", model_dir, "--data", corpus, "--method", "lora", "--rank", "4",
                 "--alpha", "8", "--lr", "5e-3", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                 "--eval-seq-len", "32", "--max-eval-tokens", "96", "--eval-every", "0", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    log = json.loads((out / "finetune.json").read_text())
    # the adapter merged by hand into a freshly loaded base: W + (alpha / r) B A
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    before = ppl_by_hand(base, split_ids(tiny_assets)[:, :96], 32)
    state = load_file(str(out / "adapter" / "hylorada_adapter.safetensors"))
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    assert len(names) == 8 and all(state[f"{n}.lora_A"].shape[0] == 4 for n in names)  # q,k,v,o x 2 layers
    with torch.no_grad():
        for n in names:
            base.get_submodule(n).weight += (8 / 4) * state[f"{n}.lora_B"] @ state[f"{n}.lora_A"]
    after = ppl_by_hand(base, split_ids(tiny_assets)[:, :96], 32)
    assert log["ppl_before"]["test"]["ppl"] == pytest.approx(before, rel=1e-5)
    assert log["ppl_after"]["test"]["ppl"] == pytest.approx(after, rel=1e-5)
    assert abs(after - before) > 1e-4  # training changed the model
    assert f"test perplexity: {before:.4f} -> {after:.4f}" in printed
    assert log["train"]["steps"] == 4 and log["adapter_config"]["lora_rank"] == 4


def test_compress_writes_a_model_with_the_reported_size_and_perplexity(tiny_assets, tmp_path, capsys):
    from hylorada.loading import load_model

    model_dir, corpus = tiny_assets
    out = tmp_path / "c"
    assert main(["compress", "--model", model_dir, "--ratio", "0.3", "--calib", corpus, "--calib-blocks", "4",
                 "--calib-seq-len", "16", "--eval", corpus, "--eval-seq-len", "32", "--max-eval-tokens", "96",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    before, after = map(lambda s: int(s.replace(",", "")),
                        re.search(r"whole model ([\d,]+) -> ([\d,]+) params", printed).groups())
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    assert before == sum(p.numel() for p in dense.parameters())
    model, _ = load_model(str(out))
    assert after == sum(p.numel() for p in model.parameters())
    factors = {n: m for n, m in model.named_modules() if hasattr(m, "up") and hasattr(m, "down")}
    assert len(factors) == 14  # every linear of the 2 decoder layers
    for name, m in factors.items():
        d_out, d_in = dense.get_submodule(name).weight.shape
        k = math.floor(0.7 * d_out * d_in / (d_out + d_in))
        assert m.down.weight.shape == (k, d_in) and m.up.weight.shape == (d_out, k), name
    ppl = re.search(r"perplexity compressed: \S+ ([\d.]+)", printed).group(1)
    assert ppl_by_hand(model.eval(), split_ids(tiny_assets)[:, :96], 32) == pytest.approx(float(ppl), abs=6e-4)
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "compress" and results["report"]["model_params_after"] == after
    # report.md's rank map: one row per kind, one column per decoder layer; ranks.png beside it
    md = (out / "report.md").read_text()
    for kind in ("q_proj", "down_proj"):
        ranks = [str(m.rank) for n, m in factors.items() if n.endswith(kind)]
        assert f"| {kind} | " + " | ".join(ranks) + " |" in md
    assert (out / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_prints_the_ranks_of_the_weights_spectra(tiny_assets, tmp_path, capsys):
    model_dir, _ = tiny_assets
    out = tmp_path / "an"
    assert main(["analyze", "--model", model_dir, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (model\.\S+) \| \d+ x \d+ \| [\d.]+ \| (\d+)\*? / (?:\d+)\*? / (?:\d+)\*? \|",
                           printed, re.M))
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    spectra = load_file(str(out / "spectra.safetensors"))
    assert len(rows) == 14
    for name, k90 in rows.items():
        w = dense.get_submodule(name).weight.detach().double()
        s2 = torch.linalg.svdvals(w) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        assert int(k90) == int((share < 0.9 - 1e-12).sum()) + 1, name  # the smallest k keeping 90%
        saved = next(v for k, v in spectra.items() if name in k)
        assert saved.numel() == min(w.shape)
        torch.testing.assert_close(saved.double(), torch.linalg.svdvals(w), rtol=1e-4, atol=1e-6)
