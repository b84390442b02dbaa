"""What `compress_model` did: one LayerReport per target layer and the CompressReport totals."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
