"""The report of a run: the stored cells -> results.json (aggregates, verdict, provenance) and
results.md (one function per section), plus the plots (plots.py).

Reads only what results.json holds, so a run made elsewhere renders the same way
(`hylorada benchmark --report-only`); the numbers of docs/benchmark-*/ come from here.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ...evaluate import jsonable
from ...utils.env import environment
from ...utils.io import atomic_write_text
from .cells import Cell, load_cell, num
from .config import ABLATIONS, PEFT_ROWS, BenchConfig, base_method

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CELL_ENV_KEYS = ("date", "device", "device_name", "git_commit", "git_dirty", "seconds", "command", "versions")


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than 2 values)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _base_entry(base: dict[str, Any]) -> dict[str, Any]:
    return {"row": "base", "kind": "base", "method": None, "rank": None, "trainable_params": 0,
            "n_seeds": 1, "seeds": [], "test_ppl_mean": base["test_ppl"], "test_ppl_std": None,
            "lim_ppl_mean": base["lim_ppl"], "lim_ppl_std": None,
            "train_time_s_mean": None, "tokens_per_s_mean": None, "peak_mem_mb_mean": None,
            "lim_bucket_ppl": base.get("lim_bucket_ppl")}


def _row_entry(row: str, cells: list[Cell], results: dict[str, dict], budget: dict[str, Any]) -> dict[str, Any]:
    """One adaptation row over its finished seeds: mean, std and values of each measure."""
    mine = [c for c in cells if c.kind == "adapt" and c.spec["row"] == row]
    done = [results[c.id] for c in mine if c.id in results]
    b = budget["rows"][row]
    entry: dict[str, Any] = {
        "row": row, "kind": "ablation" if row in ABLATIONS else "peft" if row in PEFT_ROWS else "method",
        "method": base_method(row), "rank": b["rank"], "alpha": b["alpha"],
        "trainable_params": done[0]["trainable_params"] if done else b["trainable_params"],
        "n_seeds": len(done), "n_planned": len(mine), "seeds": [d["seed"] for d in done],
        "description": ABLATIONS.get(row, {}).get("desc")}
    for key in ("test_ppl", "lim_ppl", "train_time_s", "tokens_per_s", "peak_mem_mb", "last_loss"):
        m, s = mean_std([num(d.get(key)) for d in done])
        entry[f"{key}_mean"], entry[f"{key}_std"] = m, s
        entry[f"{key}_values"] = [num(d.get(key)) for d in done]
    if done:
        buckets = [d["lim_bucket_ppl"] for d in done if d.get("lim_bucket_ppl")]
        entry["lim_bucket_ppl"] = [mean_std([num(b[i]) for b in buckets])[0]
                                   for i in range(len(buckets[0]))] if buckets else None
    return entry


def _frontier(cells: list[Cell], results: dict[str, dict]) -> list[dict[str, Any]]:
    """The dense point (when done), then every finished frontier cell, in plan order."""
    base = results.get("base")
    out = []
    if base is not None:
        out.append({"cell": "base", "compress_method": None, "ratio": 0.0, "recovery": False,
                    "size_mb": base["size_mb"], "n_params": base["n_params"], "test_ppl": base["test_ppl"],
                    "lim_ppl": base["lim_ppl"], "target_ratio": 0.0, "model_ratio": 0.0})
    for c in cells:
        if c.kind != "frontier" or c.id not in results:
            continue
        r = results[c.id]
        out.append({"cell": c.id, "compress_method": r["compress_method"], "ratio": r["ratio"],
                    "recovery": r["recovery"], "size_mb": r["size_mb"], "n_params": r["n_params"],
                    "test_ppl": r["test_ppl"], "lim_ppl": r["lim_ppl"], "target_ratio": r["target_ratio"],
                    "model_ratio": r["model_ratio"], "recovery_method": r.get("recovery_method"),
                    "seconds": r.get("seconds")})
    return out


def aggregate(cfg: BenchConfig, cells: list[Cell], results: dict[str, dict], rows: list[str],
              budget: dict[str, Any]) -> dict[str, Any]:
    """{adaptation: base + one entry per row, frontier, verdict, samples}."""
    adaptation = [_base_entry(results["base"])] if "base" in results else []
    adaptation += [_row_entry(row, cells, results, budget) for row in rows]
    return {"adaptation": adaptation, "frontier": _frontier(cells, results), "verdict": verdict(adaptation),
            "samples": samples(cfg, cells, results)}


def _cell_label(cell: Cell) -> str:
    spec = cell.spec
    if cell.kind == "base":
        return "dense"
    if cell.kind == "adapt":
        return f"dense + {spec['row']}" + (f" (seed {spec['seed']})" if spec["seed"] else "")
    name = f"{'whitened' if spec['compress_method'] == 'whiten' else 'plain'} SVD {100 * spec['ratio']:g}%"
    return name + (f" + recovery ({spec['recovery_method']})" if spec["recovery"] else "")


def samples(cfg: BenchConfig, cells: list[Cell], results: dict[str, dict]) -> dict[str, Any] | None:
    """The sample generations of the finished cells, in cell order (None without a sample prompt)."""
    if not cfg.sample_prompt:
        return None
    rows = [{"cell": c.id, "label": _cell_label(c), "text": results[c.id]["sample_text"],
             "seconds": results[c.id].get("sample_seconds")}
            for c in cells if c.id in results and results[c.id].get("sample_text") is not None]
    return {"prompt": cfg.sample_prompt, "max_new_tokens": cfg.sample_tokens, "chat": cfg.sample_chat,
            "rows": rows}


def verdict(adaptation: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which method row (not ablation) has the lowest mean test PPL, by how much, and whether the
    gap to the runner-up exceeds the seed spread (the larger of the two standard deviations)."""
    cand = [r for r in adaptation if r["kind"] in ("method", "peft") and r.get("test_ppl_mean") is not None]
    if len(cand) < 2:
        return None
    cand.sort(key=lambda r: r["test_ppl_mean"])
    best, second = cand[0], cand[1]
    gap = second["test_ppl_mean"] - best["test_ppl_mean"]
    stds = [s for s in (best.get("test_ppl_std"), second.get("test_ppl_std")) if s is not None]
    spread = max(stds) if len(stds) == 2 else None
    return {"best": best["row"], "best_ppl": best["test_ppl_mean"], "runner_up": second["row"],
            "runner_up_ppl": second["test_ppl_mean"], "gap": gap,
            "gap_pct": 100 * gap / second["test_ppl_mean"], "seed_spread": spread,
            "exceeds_spread": None if spread is None else gap > spread,
            "n_seeds": min(best["n_seeds"], second["n_seeds"])}


# ----------------------------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------------------------
def _provenance(cfg: BenchConfig, out: Path, cells: list[Cell]) -> tuple[dict, dict, dict]:
    """(environment, results.json's provenance keys, {cell id: its environment}): where, when and by what each stored cell was
    made; the environment names the devices the cells ran on (this machine's when none did)."""
    env = environment(cfg.device)
    cell_env = {c.id: {k: stored.get(k) for k in CELL_ENV_KEYS}
                for c in cells if (stored := load_cell(out, c)) is not None}
    devices = sorted({v["device_name"] for v in cell_env.values() if v.get("device_name")})
    if devices:
        env["device_name"] = " + ".join(devices)
        env["device"] = ", ".join(sorted({v["device"] for v in cell_env.values() if v.get("device")}))
    dates = sorted(v["date"] for v in cell_env.values() if v.get("date"))
    prov = {
        "commands": list(dict.fromkeys(v["command"] for v in cell_env.values() if v.get("command"))),
        "cell_dates": [dates[0], dates[-1]] if dates else None,
        "cell_git_commits": list(dict.fromkeys(v["git_commit"] for v in cell_env.values() if v.get("git_commit"))),
        "cell_git_dirty": any(v.get("git_dirty") for v in cell_env.values()),
        "cell_versions": list({json.dumps(v["versions"], sort_keys=True): v["versions"]
                               for v in cell_env.values() if v.get("versions")}.values()),
    }
    return env, prov, cell_env


def write_report(cfg: BenchConfig, out: Path, cells: list[Cell], results: dict[str, dict], rows: list[str],
                 budget: dict[str, Any], command: str | None = None, plots: bool = True,
                 write: bool = True) -> dict[str, Any]:
    """results.json, results.md (and with `plots` methods.png and frontier.png) from the stored
    cells; returns results.json's dict, written only when `write`."""
    agg = aggregate(cfg, cells, results, rows, budget)
    env, prov, cell_env = _provenance(cfg, out, cells)
    res = {
        "schema_version": SCHEMA_VERSION, "preset": cfg.preset, "command": command, **prov,
        "config": cfg.to_dict(),
        # resolved per cell; a cell stored before the option existed used none
        "window_prefixes": sorted({str(results[c.id].get("window_prefix", "none")) for c in cells
                                   if c.id in results}),
        "environment": env, "budget": budget, "n_cells": len(cells),
        "cells": {c.id: {"kind": c.kind, "key": c.key, "spec": c.spec, "result": results[c.id],
                         **cell_env.get(c.id, {})} for c in cells if c.id in results},
        "pending": [c.id for c in cells if c.id not in results],
        **agg,
    }
    res = jsonable(res)
    if not write:
        return res
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / "results.md", render_markdown(res))
    try:
        if plots:
            from .plots import render_plots

            render_plots(res, out)
    except Exception as e:  # noqa: BLE001 - a plot must not lose the numbers
        log.warning("could not draw the plots: %s", e)
    return res


# ----------------------------------------------------------------------------------------------
# results.md: one function per section
# ----------------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table: "–" for None, 3 significant digits from 1e5 up, else `digits` decimals."""
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e5:
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _pm(m: float | None, s: float | None, digits: int = 2) -> str:
    if m is None:
        return "–"
    return fmt(m, digits) + (f" ± {fmt(s, digits)}" if s is not None else "")


def _tokens(cfg: dict[str, Any]) -> int:
    return cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]


def render_markdown(res: dict[str, Any]) -> str:
    """results.md from results.json's dict."""
    lines = _header_lines(res) + _caveat_lines(res) + _pending_lines(res) + _summary_lines(res)
    lines += _budget_lines(res) + _adaptation_lines(res) + _ablation_lines(res) + _verdict_lines(res)
    lines += _frontier_lines(res) + _sample_lines(res.get("samples"))
    lines += ["", f"Plots: `methods.png`, `frontier.png`. Every number: `results.json`. "
              f"{res['n_cells'] - len(res['pending'])} of {res['n_cells']} cells done; "
              f"cell files in `cells/`.", ""]
    return "\n".join(lines)


def _command_line(res: dict[str, Any]) -> str:
    this = res.get("command") or "hylorada benchmark --preset " + res["config"]["preset"]
    made_by = res.get("commands") or []
    if made_by:
        return ("Command: " if len(made_by) == 1 else "Commands: ") + ", ".join(f"`{c}`" for c in made_by) + "  "
    if res.get("cells"):
        return f"Command: not recorded by the cells (this report: `{this}`)  "
    return f"Command: `{this}`  "


def _date_line(res: dict[str, Any]) -> str:
    env = res["environment"]
    when = res.get("cell_dates") or [env["date"]] * 2
    when_s = when[0] if when[0][:16] == when[1][:16] else f"{when[0]} to {when[1]}"
    commits = res.get("cell_git_commits") or (["? (not recorded by the cells)"] if res.get("cells") else
                                              [env.get("git_commit") or "?"])
    dirty = res.get("cell_git_dirty") if res.get("cells") else env.get("git_dirty")
    return (f"Date: {when_s} · device: {env['device_name']} (`{env['device']}`) · git "
            f"{', '.join(c if c.startswith('?') else c[:12] for c in commits)}"
            f"{' (working tree had local changes)' if dirty else ''}  ")


def _versions_line(res: dict[str, Any]) -> str:
    cell_versions = res.get("cell_versions") or []
    if len(cell_versions) == 1 or not res.get("cells"):
        v = cell_versions[0] if cell_versions else res["environment"]["versions"]
        return "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "  "
    if cell_versions:
        return f"Versions: {len(cell_versions)} different sets among the cells (see `cells` in results.json)  "
    return "Versions: not recorded by the cells  "


def _header_lines(res: dict[str, Any]) -> list[str]:
    cfg = res["config"]
    evaluated = ("the whole test split" if not cfg["eval_max_tokens"] else
                 "first " + format(cfg["eval_max_tokens"], ",") + " test tokens")
    return [f"# hylorada benchmark — preset `{cfg['preset']}`", "", _command_line(res), _date_line(res),
            _versions_line(res),
            f"Model `{cfg['model']}` ({cfg['dtype']}), data `{cfg['data']}` (train split for fine-tuning, "
            f"test split for perplexity; windows of {cfg['eval_seq_len']} tokens, {evaluated}).", ""]


def _caveat_lines(res: dict[str, Any]) -> list[str]:
    cfg = res["config"]
    if not cfg.get("caveat"):
        return []
    sizes = {k: cfg[k] for k in ("steps", "batch_size", "seq_len", "seeds", "eval_seq_len")}
    return ["> " + cfg["caveat"].format(tokens=_tokens(cfg), eval_tokens=cfg["eval_max_tokens"] or "all",
                                        ratios=", ".join(map(str, cfg["ratios"])), **sizes), ""]


def _pending_lines(res: dict[str, Any]) -> list[str]:
    if not res["pending"]:
        return []
    return [f"**Incomplete:** {len(res['pending'])} of {res['n_cells']} cells pending: "
            + ", ".join(f"`{p}`" for p in res["pending"]) + ". Run the same command again (or with "
            "`--only`) to finish them.", ""]


def _summary_lines(res: dict[str, Any]) -> list[str]:
    """One table: size and test perplexity of dense, each adapted method and each compressed model."""
    fr, ad = res["frontier"], res["adaptation"]
    dense = next((e for e in fr if e["compress_method"] is None), None)
    if dense is None:
        return []
    d_ppl, d_size = num(dense["test_ppl"]), dense["size_mb"]
    lines = ["## At a glance", "", "| model | size (MiB) | test PPL | vs dense |", "|---|---:|---:|---:|"]

    def row(name: str, size: float | None, ppl: float | None) -> None:
        rel = f"{ppl / d_ppl:.2f}x" if ppl is not None and d_ppl else "–"
        lines.append(f"| {name} | {fmt(size, 1)} | {fmt(ppl)} | {rel} |")

    row("dense", d_size, d_ppl)
    for e in ad:
        if e["kind"] in ("method", "peft") and e.get("test_ppl_mean") is not None:
            row(f"dense + {e['row']} adapter ({e['trainable_params']:,} trainable)", d_size, e["test_ppl_mean"])
    for e in fr:
        if e["compress_method"] is not None:
            name = f"{'whitened' if e['compress_method'] == 'whiten' else 'plain'} SVD {100 * e['ratio']:g}%"
            row(name + (" + recovery" if e["recovery"] else ""), e["size_mb"], num(e["test_ppl"]))
    return lines + ["", "Adapted rows: the dense size plus the adapter (merged: exactly the dense size).", ""]


def _budget_lines(res: dict[str, Any]) -> list[str]:
    cfg, b = res["config"], res["budget"]
    lines = ["## Matched trainable-parameter budgets", "",
             f"Every row's rank gives the trainable count closest to LoRA's at rank {b['target_rank']} "
             f"({b['lora_params_at_target']:,} parameters on {b['n_layers']} layers, targets "
             f"`{b['targets']}`), within {b['tolerance']:.0%}; alpha = {cfg['alpha_ratio']:g} x rank "
             f"(the same scale for all). Training for every row: {cfg['steps']} steps of "
             f"{cfg['batch_size']} x {cfg['seq_len']} tokens ({_tokens(cfg):,} tokens), AdamW lr {cfg['lr']:g}, "
             f"{cfg['warmup_steps']} warm-up steps then {cfg['schedule']}, dropout {cfg['dropout']:g}, "
             f"mixed precision `{cfg['mixed_precision']}`, seeds {', '.join(map(str, range(cfg['seeds'])))} "
             "(seed = adapter init, data order and dropout; the same blocks for every row).", "",
             "| row | rank | alpha | trainable params | vs LoRA |", "|---|---:|---:|---:|---:|"]
    for row, e in b["rows"].items():
        lines.append(f"| {row} | {e['rank']} | {e['alpha']:g} | {e['trainable_params']:,} | "
                     f"{100 * e['vs_lora']:.1f}% |")
    return lines + [""]


def _adapt_table(entries: list[dict[str, Any]]) -> list[str]:
    out = ["| row | rank | trainable | test PPL | LiM PPL | train time (s) | train tokens/s | "
           "peak mem (MiB) | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        name = f"**{e['row']}** (ours)" if e["row"] == "hylorada" else e["row"]
        seeds = f"{e['n_seeds']}{'/' + str(e['n_planned']) if e.get('n_planned', e['n_seeds']) != e['n_seeds'] else ''}"
        out.append(f"| {name} | {e['rank'] or '–'} | {e['trainable_params']:,} | "
                   f"{_pm(e['test_ppl_mean'], e['test_ppl_std'])} | {_pm(e['lim_ppl_mean'], e['lim_ppl_std'])} | "
                   f"{_pm(e.get('train_time_s_mean'), e.get('train_time_s_std'), 1)} | "
                   f"{fmt(e.get('tokens_per_s_mean'), 0)} | {fmt(e.get('peak_mem_mb_mean'), 0)} | {seeds} |")
    return out


def _adaptation_lines(res: dict[str, Any]) -> list[str]:
    ad = res["adaptation"]
    return ["## Adaptation (test perplexity after fine-tuning)", "",
            "Mean ± sample standard deviation over seeds (no ± with one seed). LiM PPL: the mean of "
            f"the perplexities of {res['config']['lim_buckets']} buckets of relative position in the window. "
            "Peak memory: " + MEM_NOTE + ".", "",
            *_adapt_table([e for e in ad if e["kind"] != "ablation"]), ""]


def _ablation_lines(res: dict[str, Any]) -> list[str]:
    ad = res["adaptation"]
    abl = [e for e in ad if e["kind"] == "ablation"]
    if not abl:
        return []
    ref = next((e for e in ad if e["row"] == "hylorada"), None)
    lines = ["## Ablations of HyLoRADA", ""] + [f"- `{e['row']}`: {e['description']}" for e in abl]
    return lines + [""] + _adapt_table(([ref] if ref else []) + abl) + [""]


def _verdict_lines(res: dict[str, Any]) -> list[str]:
    vd = res.get("verdict")
    if not vd:
        return []
    msg = (f"Lowest mean test PPL among the method rows: **{vd['best']}** ({fmt(vd['best_ppl'])}), "
           f"ahead of {vd['runner_up']} ({fmt(vd['runner_up_ppl'])}) by {fmt(vd['gap'], 3)} "
           f"({vd['gap_pct']:.2f}%). ")
    if vd["exceeds_spread"] is None:
        msg += "With one seed there is no seed spread: this gap cannot be told apart from noise."
    elif vd["exceeds_spread"]:
        msg += f"The gap exceeds the seed spread (largest std {fmt(vd['seed_spread'], 3)})."
    else:
        msg += (f"The gap does NOT exceed the seed spread (largest std {fmt(vd['seed_spread'], 3)}): "
                "the two are not distinguishable at this budget.")
    return ["## Verdict", "", msg, ""]


def _frontier_lines(res: dict[str, Any]) -> list[str]:
    cfg = res["config"]
    lines = ["## Size / quality frontier", "",
             "Compression ratio = fraction of each target matrix's parameters removed (SVD-LLM's "
             "convention: 0.2 keeps 80%); targets: every linear layer inside the decoder blocks. "
             f"Whitening calibrated on the first {cfg['calib_blocks']} x {cfg['calib_seq_len']} tokens of the "
             f"`{cfg['data']}` train split. Recovery: {cfg['recovery_method']} adapters (rank "
             f"{cfg['recovery_rank']}) on the up then the down factors ({cfg['steps']} steps in all, the "
             "fine-tuning schedule above), merged back, so the rank and the size stay those of the "
             "compressed model. Size: every stored parameter and buffer (MiB = 2^20 bytes).", "",
             "| model | method | ratio | recovery | size (MiB) | params removed (linears / model) | test PPL | LiM PPL |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for e in res["frontier"]:
        lines.append(f"| {e['cell']} | {e['compress_method'] or 'dense'} | {e['ratio']:g} | "
                     f"{('yes (' + e['recovery_method'] + ')') if e['recovery'] else 'no'} | {fmt(e['size_mb'], 1)} | "
                     f"{100 * e['target_ratio']:.1f}% / {100 * e['model_ratio']:.1f}% | {fmt(num(e['test_ppl']))} | "
                     f"{fmt(num(e['lim_ppl']))} |")
    return lines


def _sample_lines(smp: dict[str, Any] | None) -> list[str]:
    if not smp or not smp["rows"]:
        return []
    lines = ["", "## Sample generation", "",
             f"Greedy, {smp['max_new_tokens']} new tokens, {'chat template' if smp['chat'] else 'no chat template'}"
             " (`hylorada.recipes.generate`); the prompt:", "", "```", smp["prompt"], "```", ""]
    for r in smp["rows"]:
        text = r["text"].strip("\n") or "(no text: end of text was the first token)"
        lines += [f"**{r['label']}** (`{r['cell']}`):", "", "```", text, "```", ""]
    return lines[:-1]


MEM_NOTE = ("CUDA max_memory_allocated during training on GPU; on CPU the peak resident memory of the "
            "process above its level at the start of training (model weights already loaded are not "
            "counted)")
