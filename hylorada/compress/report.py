"""What `compress_model` did: one LayerReport per target layer and the CompressReport totals."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

from ..utils.io import atomic_write_bytes
from .targets import split_layer_name


@dataclass
class LayerReport:
    name: str
    kind: str                 # Linear | Conv1D
    d_in: int
    d_out: int
    bias: bool
    rank: int | None          # None: kept dense
    break_even: float         # d_in·d_out / (d_in + d_out)
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    energy_kept: float        # share of Σσ² kept (of W·L when whitened); 1.0 when dense
    dropped_energy: float     # Σ dropped σ² (whitened: mean squared output error per token)
    dense: bool
    reason: str               # why it stayed dense ("" when factorised)
    policy: str               # where the rank came from
    whitening: str = ""       # cholesky | cholesky+jitter(..) | eigh(rank r/n) | ""
    # update="lstsq": share of the calibration output error E||W x_ref - W' x||² that the
    # least-squares re-solve of `up` removed (hylorada/compress/update.py); None: no update
    update_gain: float | None = None


@dataclass
class CompressReport:
    method: str
    config: dict
    layers: list[LayerReport]
    target_params_before: int
    target_params_after: int
    target_bytes_before: int
    target_bytes_after: int
    model_params_before: int
    model_params_after: int
    model_bytes_before: int
    model_bytes_after: int
    calib_tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def target_ratio(self) -> float:
        """Fraction of the target layers' parameters removed (SVD-LLM's compression ratio)."""
        return 1 - self.target_params_after / max(self.target_params_before, 1)

    @property
    def model_ratio(self) -> float:
        """Fraction of the whole model's parameters removed."""
        return 1 - self.model_params_after / max(self.model_params_before, 1)

    @property
    def n_factorized(self) -> int:
        return sum(not r.dense for r in self.layers)

    @property
    def n_dense(self) -> int:
        return sum(r.dense for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(target_ratio=self.target_ratio, model_ratio=self.model_ratio,
                 n_factorized=self.n_factorized, n_dense=self.n_dense)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompressReport":
        keys = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in keys}
        d["layers"] = [LayerReport(**r) for r in d["layers"]]
        return cls(**d)

    def summary(self) -> str:
        mb = 1024 ** 2
        return (f"{self.method}: {self.n_factorized} layers factorised, {self.n_dense} kept dense; "
                f"target linears {self.target_params_before:,} -> {self.target_params_after:,} params "
                f"({100 * self.target_ratio:.2f}% removed, {self.target_bytes_before / mb:.1f} -> "
                f"{self.target_bytes_after / mb:.1f} MiB); whole model {self.model_params_before:,} -> "
                f"{self.model_params_after:,} params ({100 * self.model_ratio:.2f}% removed, "
                f"{self.model_bytes_before / mb:.1f} -> {self.model_bytes_after / mb:.1f} MiB)")

    def to_markdown(self) -> str:
        mb = 1024 ** 2
        lines = [
            "| layer | d_out x d_in | rank | break-even | params before | params after | "
            "energy kept | note |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.layers:
            rank = "dense" if r.dense else str(r.rank)
            note = r.reason if r.dense else r.policy
            if r.whitening:
                note = f"{note}; {r.whitening}" if note else r.whitening
            if r.update_gain is not None:
                note = f"{note}; lstsq update -{100 * r.update_gain:.1f}% output error"
            lines.append(f"| {r.name} | {r.d_out} x {r.d_in} | {rank} | {r.break_even:.1f} | "
                         f"{r.params_before:,} | {r.params_after:,} | {100 * r.energy_kept:.2f}% | "
                         f"{note} |")
        lines += self._rank_map_lines()
        lines += [
            "",
            "| total | params before | params after | removed | MiB before | MiB after |",
            "|---|---:|---:|---:|---:|---:|",
            f"| target linears | {self.target_params_before:,} | {self.target_params_after:,} | "
            f"{100 * self.target_ratio:.2f}% | {self.target_bytes_before / mb:.2f} | "
            f"{self.target_bytes_after / mb:.2f} |",
            f"| whole model | {self.model_params_before:,} | {self.model_params_after:,} | "
            f"{100 * self.model_ratio:.2f}% | {self.model_bytes_before / mb:.2f} | "
            f"{self.model_bytes_after / mb:.2f} |",
            "",
            f"method {self.method}, {self.n_factorized} factorised, {self.n_dense} dense, "
            f"{self.calib_tokens:,} calibration tokens, {self.seconds:.1f} s"
            + (" (" + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in self.timings.items())
               + ")." if self.timings else "."),
        ]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _rank_map_lines(self) -> list[str]:
        """The rank map: one row per layer kind, one column per decoder-layer index, cells the
        rank ("dense": kept dense); [] when no layer name carries an index."""
        rows = rank_rows(self.layers)
        if not rows:
            return []
        idx = sorted({i for row in rows.values() for i in row})
        lines = ["", "Rank per decoder layer (rows: layer kind, columns: decoder-layer index):", "",
                 "| kind | " + " | ".join(map(str, idx)) + " |", "|---|" + "---:|" * len(idx)]
        for label, row in rows.items():
            cells = ["" if i not in row else "dense" if row[i].dense else str(row[i].rank) for i in idx]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines

    def ranks_png(self) -> bytes | None:
        """The rank plot (plot_ranks) as PNG bytes; None when no layer name carries an index."""
        rows = rank_rows(self.layers)
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for n, (label, row) in enumerate(rows.items()):
            color = plt.cm.tab10(n % 10)
            idx = sorted(row)
            ax.plot(idx, [float("nan") if row[i].dense else row[i].rank / row[i].break_even for i in idx],
                    "o-", color=color, ms=3, lw=1.2, label=label)
            dense = [i for i in idx if row[i].dense]
            ax.plot(dense, [1.0] * len(dense), "x", color=color, ms=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1 - self.target_ratio, color="k", lw=0.8, ls=":")
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("rank / break-even rank (share of parameters kept)")
        ax.set_title(f"{self.method}: rank per layer (x: kept dense; dotted: all target layers, "
                     f"{100 * (1 - self.target_ratio):.1f}% kept)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return buf.getvalue()

    def plot_ranks(self, path) -> bool:
        """Write a PNG to `path` atomically (hylorada/utils/io.py atomic_write): x = decoder-layer
        index, y = rank / break-even rank, one line per layer kind (rank_rows), layers kept dense
        as x at 1. Returns False (nothing written) when no layer name carries an index.

        y = k / (m·n/(m+n)) = k·(m+n)/(m·n) is the share of the layer's weights the factors keep
        (ranks.py break_even_rank): it is comparable across shapes, 1 is where factorising stops
        saving anything, and the uniform ratio policy puts every layer near 1 - ratio (the dotted
        line is the share kept over all target layers). rank / min(m, n) would be the share of the
        spectrum kept instead, which already saves nothing at 0.5 for a square matrix."""
        png = self.ranks_png()
        if png is None:
            return False
        atomic_write_bytes(path, png)
        return True


def rank_rows(layers: list[LayerReport]) -> dict[str, dict[int, LayerReport]]:
    """kind label -> {decoder-layer index -> LayerReport}, rows in module order, for the layers
    whose name carries an index (targets.py split_layer_name). A row is a name with its index cut
    out; its label is the last name piece (q_proj), or where two rows share that (GPT-2's
    attn.c_proj and mlp.c_proj) the part after the index, or else the name with "*" for the index."""
    rows: dict[tuple[str, str], dict[int, LayerReport]] = {}
    for r in layers:
        split = split_layer_name(r.name)
        if split is not None:
            prefix, i, suffix = split
            rows.setdefault((prefix, suffix), {})[i] = r
    for pick in (lambda p, s: s.rsplit(".", 1)[-1], lambda p, s: s, lambda p, s: f"{p}.*.{s}"):
        labels = [pick(*key) or "(block)" for key in rows]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, rows.values()))
    raise AssertionError("unreachable: the names are unique")


def thin_calibration_note(thin: dict[str, tuple[int, int]], n_layers: int) -> str:
    """One note for every layer whose whitening saw fewer than 4·d_in calibration tokens
    (`thin`: layer -> (tokens, d_in)), with the layer count per (tokens, d_in)."""
    groups: dict[tuple[int, int], int] = {}
    for key in thin.values():
        groups[key] = groups.get(key, 0) + 1
    detail = "; ".join(f"{n} layer(s) with {t:,} tokens for {d} input features"
                       for (t, d), n in sorted(groups.items(), key=lambda kv: kv[0][1]))
    return (f"{len(thin)} of {n_layers} layers saw fewer calibration tokens than 4 x their input "
            f"features ({detail}, e.g. {next(iter(thin))}): the whitening sees too small a subspace; "
            "use more calibration tokens, at least several times d_in")
