"""Markdown tables of a gpu_speed.py JSON; ratios only between rows of the same device and
versions (timings differ by machine: compare ratios within one machine only)."""
from __future__ import annotations

VERSION_KEYS = ("device", "host_cpu", "torch", "cuda", "transformers", "peft")


def _f(v, spec: str) -> str:
    if v is None:
        return ""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


class Index:
    """Rows by id, and whether two rows were measured on the same machine and versions."""

    def __init__(self, data: dict) -> None:
        self.runs = data["runs"]
        self.rows = [r for r in data["rows"] if "error" not in r]
        self.by_id = {r["id"]: r for r in self.rows}

    def same_machine(self, a: dict, b: dict) -> bool:
        ra, rb = self.runs[a["run"]], self.runs[b["run"]]
        return all(ra.get(k) == rb.get(k) for k in VERSION_KEYS)

    def ratio(self, row: dict, ref_id: str, key: str = "ms", factor: float = 1.0) -> float | None:
        ref = self.by_id.get(ref_id)
        if ref is None or ref.get(key) is None or row.get(key) is None or not self.same_machine(row, ref):
            return None
        return row[key] / (factor * ref[key])


def train_table(ix: Index) -> list[str]:
    lines = ["| row | step ms | host ms | first step s | graph breaks | recompiles | peak GiB | vs our LoRA "
             "| vs peft LoRA | vs 2x frozen fwd | dropout layers | check rel. err. (logits / grads) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ix.rows:
        if r.get("part") == "frozen":
            lines.append(f"| {r['id']} | {_f(r['ms'], '.1f')} (forward) | {_f(r.get('host_ms'), '.1f')} "
                         f"| {_f(r.get('first_step_s'), '.1f')} | | | {_f(r.get('peak_gib'), '.2f')} | | | | | |")
        if r.get("part") != "train":
            continue
        mode, d = r["mode"], f"{r['dropout']:g}"
        lines.append(" | ".join([
            f"| {r['id']}", _f(r["ms"], ".1f"), _f(r.get("host_ms"), ".1f"), _f(r.get("first_step_s"), ".1f"),
            _f(r.get("graph_breaks"), "d"), _f(r.get("recompiles"), "d"), _f(r.get("peak_gib"), ".2f"),
            _f(ix.ratio(r, f"train/{mode}/{d}/lora"), ".2f"), _f(ix.ratio(r, f"train/{mode}/{d}/peft-lora"), ".2f"),
            _f(ix.ratio(r, "frozen/eager", factor=2.0), ".2f"), _f(r.get("dropout_active_layers"), "d"),
            f"{_f(r.get('rel_err'), '.1e')} / {_f(r.get('grad_rel_err'), '.1e')} ({r.get('check', '')}) |"]))
    return lines


def decode_table(ix: Index) -> list[str]:
    lines = ["| row | prefill ms | decode ms/token | tokens/s | vs dense (tokens/s) | first call s | peak GiB "
             "| tokens = eager | check rel. err. |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ix.rows:
        if r.get("part") != "decode":
            continue
        dense = f"decode/{r['mode']}/dense/b{r['batch']}"
        speed = ix.ratio(r, dense, key="tokens_per_s")
        lines.append(" | ".join([
            f"| {r['id']}", _f(r["prefill_ms"], ".1f"), _f(r["decode_ms_per_token"], ".2f"),
            _f(r["tokens_per_s"], ".0f"), _f(speed, ".2f"), _f(r.get("first_call_s"), ".1f"),
            _f(r.get("peak_gib"), ".2f"), _f(r.get("tokens_agree"), ".3f"), f"{_f(r.get('rel_err'), '.1e')} |"]))
    return lines


def other_table(ix: Index) -> list[str]:
    lines = ["| row | what | ms | tokens/s | merge: time / base; compressed: speed-up | seconds | energy gap | peak GiB | check (rel. err.) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in ix.rows:
        if r.get("part") not in ("merge", "compress", "compressed"):
            continue
        ratio = r.get("ratio_vs_base")
        if r["part"] == "compressed" and "compressed/dense" in ix.by_id:  # speed-up: dense ms / ms
            ratio = ix.ratio(ix.by_id["compressed/dense"], r["id"])
        lines.append(" | ".join([
            f"| {r['id']}", r.get("method", ""), _f(r.get("ms"), ".1f"), _f(r.get("tokens_per_s"), ".0f"),
            _f(ratio, ".3f"), _f(r.get("seconds"), ".1f"), _f(r.get("energy_gap"), ".1e"),
            _f(r.get("peak_gib"), ".2f"), " ".join(filter(None, [r.get("check"), _f(r.get("rel_err"), ".1e")])) + " |"]))
    return lines


def markdown_table(data: dict) -> str:
    ix = Index(data)
    runs = [f"run {i}: " + ", ".join(f"{k} {run.get(k)}" for k in VERSION_KEYS + ("commit", "date"))
            for i, run in enumerate(data["runs"])]
    errors = [f"- {r['id']}: {r['error']}" for r in data["rows"] if "error" in r]
    blocks = [runs, train_table(ix), decode_table(ix), other_table(ix), errors]
    return "\n\n".join("\n".join(b) for b in blocks if len(b) > 2 or (b is runs or b is errors) and b)
