"""The README's first command: `hylorada benchmark` with the default `quick` preset (compress
20% whitened, recover, LoRA and HyLoRADA, sizes and perplexities, a sample generation, plots),
and the frontier plot's clipped relative-perplexity axis. Tiny models; the timing on SmolLM2 is
in docs/BENCHMARK.md."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hylorada.recipes import benchmark as bm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_preset_is_quick_and_the_longer_ones_stay_one_flag_away(tiny_assets, capsys):
    from hylorada.cli import main

    cfg = bm.make_config()
    assert cfg.preset == "quick" and cfg.model == "smollm2-135m" and cfg.compress_methods == ["whiten"]
    assert cfg.ratios == [0.2] and cfg.recovery == [False, True] and cfg.methods == ["lora", "hylorada"]
    assert cfg.sample_prompt and not cfg.peft and not cfg.ablations
    assert bm.make_config("cpu-quick").methods == list(bm.METHODS)
    model, data = tiny_assets
    assert main(["benchmark", "--model", model, "--data", data, "--out", "unused", "--list"]) == 0
    assert capsys.readouterr().out.split()[::1] == [
        "base", "adapt-lora-s0", "adapt-hylorada-s0", "frontier-whiten-0.2", "frontier-whiten-0.2-rec"]


def test_quick_run_reports_sizes_perplexities_and_sample_generations(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = tiny_assets
    prompt = "w1 w2 w3 w4"
    cfg = bm.make_config("quick", model=model_dir, data=data, steps=2, batch_size=2, seq_len=16, eval_seq_len=32,
                         eval_max_tokens=128, calib_blocks=4, calib_seq_len=16, recovery_rank=2,
                         sample_prompt=prompt, sample_tokens=6)
    out = tmp_path / "quick"
    res = bm.run_benchmark(cfg, out, progress=False)
    assert res["pending"] == [] and sorted(res["cells"]) == sorted(
        ["base", "adapt-lora-s0", "adapt-hylorada-s0", "frontier-whiten-0.2", "frontier-whiten-0.2-rec"])
    # the dense sample is what model.generate gives, greedy, on the model loaded directly
    tok = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = dense.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    smp = res["samples"]
    assert smp["prompt"] == prompt and smp["max_new_tokens"] == 6
    assert [r["cell"] for r in smp["rows"]] == ["base", "adapt-lora-s0", "adapt-hylorada-s0",
                                                "frontier-whiten-0.2", "frontier-whiten-0.2-rec"]
    assert smp["rows"][0]["text"] == expected and smp["rows"][0]["label"] == "dense"
    assert smp["rows"][4]["label"] == "whitened SVD 20% + recovery (lora)"
    md = (out / "results.md").read_text()
    assert "## At a glance" in md and "## Sample generation" in md and "`quick` preset" in md
    base, comp = res["cells"]["base"]["result"], res["cells"]["frontier-whiten-0.2"]["result"]
    rel = comp["test_ppl"] / base["test_ppl"]
    assert f"| whitened SVD 20% | {comp['size_mb']:.1f} | {comp['test_ppl']:,.2f} | {rel:.2f}x |" in md
    assert comp["size_mb"] < base["size_mb"]
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "methods.png").stat().st_size > 1000


def _res(ppls: dict[str, float]) -> dict:
    """A results dict whose frontier has a dense point and the given compressed cells."""
    fr = [{"cell": "base", "compress_method": None, "ratio": 0.0, "recovery": False, "size_mb": 100.0,
           "test_ppl": 20.0}]
    for cid, ppl in ppls.items():
        method, ratio, *rec = cid.split("-")[1:]
        fr.append({"cell": cid, "compress_method": method, "ratio": float(ratio), "recovery": bool(rec),
                   "size_mb": 100 * (1 - float(ratio) / 2), "test_ppl": ppl})
    return {"frontier": fr, "adaptation": [], "config": {"preset": "test"}}


def test_frontier_points_are_relative_to_dense_and_clipped():
    res = _res({"frontier-svd-0.2": "inf", "frontier-svd-0.2-rec": 400.0, "frontier-whiten-0.2": 50.0,
                "frontier-whiten-0.2-rec": 30.0})
    pts = {p["cell"]: p for p in bm.frontier_points(res, clip=10.0)}
    assert pts["base"]["rel"] == 1.0 and not pts["base"]["clipped"]
    assert pts["frontier-whiten-0.2"]["rel"] == pytest.approx(2.5) and pts["frontier-whiten-0.2"]["y"] == 2.5
    assert pts["frontier-whiten-0.2-rec"]["y"] == pytest.approx(1.5)
    assert pts["frontier-svd-0.2-rec"]["rel"] == pytest.approx(20.0)
    assert pts["frontier-svd-0.2-rec"]["y"] == 10.0 and pts["frontier-svd-0.2-rec"]["clipped"]
    assert pts["frontier-svd-0.2"]["y"] == 10.0 and pts["frontier-svd-0.2"]["clipped"]
    assert bm.frontier_points({"frontier": res["frontier"][1:]}) == []  # nothing to be relative to


def test_frontier_plot_axis_is_cut_and_linear(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        if Path(path).name == "frontier.png":
            ax = fig.axes[0]
            seen.update(ylim=ax.get_ylim(), yscale=ax.get_yscale(), texts=[t.get_text() for t in ax.texts])
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    res = _res({"frontier-svd-0.2": 2e7, "frontier-whiten-0.2": 50.0, "frontier-whiten-0.2-rec": 30.0})
    bm.render_plots(res, tmp_path)
    assert seen["yscale"] == "linear" and seen["ylim"][1] == pytest.approx(bm.FRONTIER_CLIP * 1.06)
    assert any("1e+06x" in t for t in seen["texts"])  # the clipped point names its real ratio
    assert any("2.50x" in t for t in seen["texts"]) and any("1.50x" in t for t in seen["texts"])
