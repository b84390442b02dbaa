"""Singular-value spectra of a model's linear layers, plain and whitened, and what they imply.

For each target layer (m = d_out, n = d_in): σ of W, and with calibration data σ of W·L
(L Lᵀ = the inputs' Gram matrix, see whiten.py; then σ² is output energy on the calibration
tokens). `ranks for e` = the smallest k keeping the share e of Σσ²; the break-even rank
m·n/(m+n) is where factorising stops saving parameters. A layer whose k_95 is above its
break-even cannot keep 95% of its energy and shrink.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import dense_weight, in_out_features
from .ranks import break_even_rank, rank_for_energy, rank_for_ratio
from .targets import layer_index
from .whiten import collect_grams, whitening_factor

ENERGIES = (0.9, 0.95, 0.99)


@dataclass
class LayerSpectrum:
    name: str
    d_in: int
    d_out: int
    plain: torch.Tensor                    # σ of W, descending (float64)
    whitened: torch.Tensor | None = None   # σ of W·L, descending (float64)

    @property
    def break_even(self) -> float:
        return break_even_rank(self.d_out, self.d_in)

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer_index(self) -> int | None:
        return layer_index(self.name)

    def ranks(self, whitened: bool = False, energies=ENERGIES) -> dict[float, int]:
        s = self.whitened if whitened else self.plain
        return {e: rank_for_energy(s, e) for e in energies} if s is not None else {}

    def energy_at(self, k: int, whitened: bool = False) -> float | None:
        s = self.whitened if whitened else self.plain
        if s is None:
            return None
        e = s.square()
        return float(e[:k].sum() / e.sum()) if float(e.sum()) > 0 else 1.0


@dataclass
class Analysis:
    layers: list[LayerSpectrum]
    calib_tokens: int = 0
    model_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_whitened(self) -> bool:
        return any(l.whitened is not None for l in self.layers)

    def to_dict(self) -> dict:
        rows = []
        for l in self.layers:
            row = {"name": l.name, "d_in": l.d_in, "d_out": l.d_out, "break_even": l.break_even,
                   "plain_ranks": {str(e): k for e, k in l.ranks().items()},
                   "energy_at_ratio_0.2": {"plain": l.energy_at(rank_for_ratio(l.d_out, l.d_in, 0.2))}}
            if l.whitened is not None:
                row["whitened_ranks"] = {str(e): k for e, k in l.ranks(True).items()}
                row["energy_at_ratio_0.2"]["whitened"] = l.energy_at(rank_for_ratio(l.d_out, l.d_in, 0.2), True)
            rows.append(row)
        return {"model": self.model_name, "calib_tokens": self.calib_tokens, "energies": list(ENERGIES),
                "layers": rows, "notes": self.notes}

    def spectra(self) -> dict[str, torch.Tensor]:
        """name.plain / name.whitened -> σ (for a safetensors file)."""
        out = {f"{l.name}.plain": l.plain.float().contiguous() for l in self.layers}
        out.update({f"{l.name}.whitened": l.whitened.float().contiguous()
                    for l in self.layers if l.whitened is not None})
        return out

    def to_markdown(self) -> str:
        w = self.has_whitened
        es = "/".join(f"{int(100 * e)}" for e in ENERGIES)
        head = f"| layer | d_out x d_in | break-even | plain k{es} | plain energy @20% |"
        sep = "|---|---|---:|---:|---:|"
        if w:
            head += f" whitened k{es} | whitened energy @20% |"
            sep += "---:|---:|"
        warnings = [n for n in self.notes if n.startswith("WARNING")]  # shown above the long table
        lines = [*warnings, ""] if warnings else []
        lines += [head, sep]

        def fmt(ranks: dict, be: float) -> str:
            return " / ".join(f"{k}{'*' if k >= be else ''}" for k in ranks.values())

        for l in self.layers:
            k20 = rank_for_ratio(l.d_out, l.d_in, 0.2)
            row = (f"| {l.name} | {l.d_out} x {l.d_in} | {l.break_even:.1f} | {fmt(l.ranks(), l.break_even)} | "
                   f"{100 * l.energy_at(k20):.1f}% |")
            if w and l.whitened is not None:
                row += f" {fmt(l.ranks(True), l.break_even)} | {100 * l.energy_at(k20, True):.1f}% |"
            elif w:
                row += " - | - |"
            lines.append(row)
        lines += ["", "`*`: at or above the break-even rank m·n/(m+n): keeping that much energy saves "
                  "nothing. `energy @20%`: share of Σσ² kept at the rank of 20% compression "
                  "(k = floor(0.8·m·n/(m+n)))."]
        # per kind summary
        kinds: dict[str, list[LayerSpectrum]] = {}
        for l in self.layers:
            kinds.setdefault(l.kind, []).append(l)
        lines += ["", "| kind | layers | break-even | mean plain k95 / break-even |"
                  + (" mean whitened k95 / break-even |" if w else ""),
                  "|---|---:|---:|---:|" + ("---:|" if w else "")]
        for kind, ls in kinds.items():
            p = sum(l.ranks()[0.95] / l.break_even for l in ls) / len(ls)
            row = f"| {kind} | {len(ls)} | {ls[0].break_even:.1f} | {p:.2f} |"
            if w:
                wl = [l for l in ls if l.whitened is not None]
                row += f" {sum(l.ranks(True)[0.95] / l.break_even for l in wl) / max(len(wl), 1):.2f} |"
            lines.append(row)
        if self.calib_tokens:
            lines += ["", f"Whitened with {self.calib_tokens:,} calibration tokens."]
        lines += [f"- {n}" for n in self.notes if n not in warnings]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> None:
        """A PNG: normalised spectra (plain, whitened) and k95 / break-even per layer."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = sorted({l.kind for l in self.layers})
        colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
        n_panels = 3 if self.has_whitened else 2
        fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4.2))
        panels = [("plain", False)] + ([("whitened", True)] if self.has_whitened else [])
        for ax, (title, wh) in zip(axes, panels):
            for l in self.layers:
                s = l.whitened if wh else l.plain
                if s is None or float(s[0]) <= 0:
                    continue
                x = torch.arange(1, s.numel() + 1) / s.numel()
                ax.plot(x.numpy(), (s / s[0]).clamp(min=1e-12).numpy(), color=colors[l.kind], lw=0.6, alpha=0.5)
            ax.set_yscale("log")
            ax.set_xlabel("k / min(m, n)")
            ax.set_ylabel("σ_k / σ_1")
            ax.set_title(f"{title} singular values")
        for k in kinds:
            axes[0].plot([], [], color=colors[k], label=k)
        axes[0].legend(fontsize=7, loc="lower left")
        ax = axes[-1]
        for k in kinds:
            ls = [l for l in self.layers if l.kind == k]
            idx = [l.layer_index if l.layer_index is not None else i for i, l in enumerate(ls)]
            ax.plot(idx, [l.ranks()[0.95] / l.break_even for l in ls], "--", color=colors[k], lw=1)
            if self.has_whitened:
                ax.plot(idx, [l.ranks(True)[0.95] / l.break_even if l.whitened is not None else math.nan
                              for l in ls], "-", color=colors[k], lw=1.2, label=k)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel("k95 / break-even rank")
        ax.set_title("rank for 95% energy (dashed plain, solid whitened)" if self.has_whitened
                     else "rank for 95% energy")
        fig.suptitle(self.model_name or "spectra", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@torch.no_grad()
def analyze_model(model: nn.Module, calibration=None, target_modules: list[str] | None = None,
                  whiten_method: str = "cholesky", batch_size: int = 4, progress: bool = False,
                  model_name: str = "") -> Analysis:
    """Plain (and, with calibration, whitened) spectra of the target layers; the model is not
    modified."""
    from .api import find_target_layers

    targets = find_target_layers(model, target_modules)
    grams = collect_grams(model, targets, calibration, batch_size=batch_size, progress=progress) \
        if calibration is not None else {}
    factors: dict[int, object] = {}
    layers = []
    notes = []
    for name, layer in targets.items():
        d_in, d_out = in_out_features(layer)
        W = dense_weight(layer).detach().double()
        plain = torch.linalg.svdvals(W)
        whitened = None
        g = grams.get(name)
        if g is not None and g.n_tokens:
            if id(g) not in factors:
                factors[id(g)] = whitening_factor(g.G, whiten_method)
            whitened = torch.linalg.svdvals(factors[id(g)].whiten(W))
        elif calibration is not None:
            notes.append(f"{name}: no calibration tokens reached it")
        layers.append(LayerSpectrum(name, d_in, d_out, plain.cpu(), None if whitened is None else whitened.cpu()))
    tokens = max((g.n_tokens for g in grams.values()), default=0)
    short = [(name, grams[name].n_tokens, l.d_in) for name, l in zip(targets, layers)
             if l.whitened is not None and grams[name].n_tokens < l.d_in]
    if short:
        notes.append(few_tokens_note(short, len(layers)))
    return Analysis(layers, tokens, model_name, notes)


def few_tokens_note(short: list[tuple[str, int, int]], n_layers: int) -> str:
    """One warning for the layers whose calibration saw fewer tokens than input features
    (`short`: (layer, tokens, d_in)): their G = XᵀX/N has rank <= tokens, so W·L has at most
    `tokens` non-zero singular values and every energy share at a rank >= tokens reads 100%."""
    t = min(n for _, n, _ in short)
    d = max(d for _, _, d in short)
    return (f"WARNING: {len(short)} of {n_layers} layers saw fewer calibration tokens ({t:,}) than input "
            f"features (up to {d:,}), e.g. {short[0][0]}: their whitened spectra have at most that many "
            "non-zero values, so their whitened ranks and energies (up to 100%) describe the calibration "
            f"tokens, not the layer. Use at least several times {d:,} tokens (--calib-blocks x --calib-seq-len).")
