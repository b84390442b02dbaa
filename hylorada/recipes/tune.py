"""`hylorada tune`: Optuna search over an adapter's hyper-parameters; objective = validation loss.

Search space (`suggest`):

    lora_rank        categorical {4, 8, 16, 32} (those <= the largest rank the target layers allow)
    alpha_ratio      categorical {0.5, 1, 2, 4};   lora_alpha = alpha_ratio x lora_rank
    lora_plus_ratio  log-uniform [1, 32]           (LoRA+: B's lr = ratio x A's; 1 = plain)
    lr               log-uniform [1e-5, 3e-3]
    lora_dropout     uniform [0, 0.2]
    gate_init        uniform [-3, 3]               (hylorada only; sigmoid input)
    residual_init    uniform [-3, 3]               (hylorada only; sigmoid input)

Each trial fine-tunes a fresh copy of the model on the train split for `steps` steps (cosine
schedule, fixed `seed`: the same data order and init seed for every trial, so trials differ only
by their hyper-parameters), evaluates the validation loss every `eval_every` steps and reports
it (`trial.report`); a MedianPruner stops trials whose loss is worse than the median of earlier
trials at the same step. The trial's value is the validation loss at the end of training.

Sampler: TPE (seeded). Several workers (processes, machines) share one study through the storage
URL (default `sqlite:///<out>/tune.db`; any URL Optuna accepts, e.g. postgresql://...) with
`load_if_exists=True`. A worker that joins a study which already has trials (or runs beside
another) draws its sampler seed from `seed`, the trial count and its process id, so two workers
do not propose the same points; pass `sampler_seed` to fix it.

At the end the best trial is printed and written to `<out>/best_config.json`:
`adapter_config` (a HyLoRADAConfig dict), `train` (TrainConfig fields) and `finetune_args`, the
`hylorada finetune` flags that reproduce it (see docs/BENCHMARK.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import METHODS, HyLoRADAConfig, field_flag, option
from ..errors import HyloradaError, UsageError
from ..train import TrainConfig
from ..utils.io import atomic_write_text
from .finetune import ADAPTER_FIELDS, TRAIN_FIELDS

log = logging.getLogger(__name__)

# the TuneSettings fields `hylorada tune` sets by a flag (hylorada/commands/tune.py)
TUNE_FIELDS = ("method", "model", "data", "steps", "batch_size", "seq_len", "eval_every", "valid_blocks", "targets",
               "seed", "device")
RANK_CHOICES = (4, 8, 16, 32)
ALPHA_RATIO_CHOICES = (0.5, 1.0, 2.0, 4.0)
SEARCH_SPACE_DOC = __doc__


@dataclass
class TuneSettings:
    """What every trial shares. The fields with a help text are `hylorada tune` flags (TUNE_FIELDS)."""

    method: str = option("hylorada", "the adapter", choices=METHODS)
    model: str = option("smollm2-135m", "model alias, folder, .gguf file or hub id")
    data: str = option("shakespeare", "kjv, shakespeare or a .txt/.jsonl file or folder")
    steps: int = option(40, "training steps per trial")
    batch_size: int = option(4, "blocks per step")
    seq_len: int = option(128, "block length")
    warmup_steps: int = 2
    eval_every: int = option(10, "valid loss (reported to the pruner) every N steps")
    valid_blocks: int = option(16, "valid blocks per evaluation")
    seed: int = option(0, "training seed (data order, init; the same for every trial) and TPE seed")
    targets: list[str] | str = option("all-linear", "module names/suffixes or 'all-linear'", flag="--target-modules")
    dtype: str = "float32"
    device: str = option("cpu", "cpu | cuda")
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise UsageError(f"TuneSettings.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        if self.method not in METHODS:
            bad("method", f"one of {list(METHODS)}")
        for name, lo in (("seq_len", 2), ("valid_blocks", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < lo:
                bad(name, f"an integer >= {lo}")
        self.train_config(lr=1e-4)  # steps, batch_size, warmup_steps, seed, mixed_precision: TrainConfig's checks
        if not _is_int(self.eval_every) or not 1 <= self.eval_every <= self.steps:
            bad("eval_every", f"an integer in [1, steps={self.steps}]")
        for name in ("model", "data", "dtype", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "a non-empty string")
        t = self.targets
        if not (isinstance(t, str) and t) and not (isinstance(t, (list, tuple)) and t
                                                    and all(isinstance(x, str) and x for x in t)):
            bad("targets", "'all-linear', a regex string or a non-empty list of module names")

    def train_config(self, lr: float) -> TrainConfig:
        """The TrainConfig of every trial: these settings, a cosine schedule and the trial's lr."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=lr, warmup_steps=self.warmup_steps,
                           schedule="cosine", seed=self.seed, eval_every=self.eval_every,
                           mixed_precision=self.mixed_precision, log_every=0, progress=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    n_trials_total: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config_path: str | None = None
    trial_numbers: list[int] = field(default_factory=list)  # the trials this call ran


def default_storage(out_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'tune.db'}"


def max_rank_allowed(model: nn.Module, targets) -> int:
    from ..layers import in_out_features
    from ..model import match_targets

    return min(min(in_out_features(model.get_submodule(n))) for n in match_targets(model, targets))


def suggest(trial, method: str, max_rank: int) -> dict[str, Any]:
    """The hyper-parameters of one trial (the search space in the module docstring)."""
    ranks = [r for r in RANK_CHOICES if r <= max_rank] or [max_rank]
    p: dict[str, Any] = {
        "lora_rank": trial.suggest_categorical("lora_rank", ranks),
        "alpha_ratio": trial.suggest_categorical("alpha_ratio", list(ALPHA_RATIO_CHOICES)),
        "lora_plus_ratio": trial.suggest_float("lora_plus_ratio", 1.0, 32.0, log=True),
        "lr": trial.suggest_float("lr", 1e-5, 3e-3, log=True),
        "lora_dropout": trial.suggest_float("lora_dropout", 0.0, 0.2),
    }
    if method == "hylorada":
        p["gate_init"] = trial.suggest_float("gate_init", -3.0, 3.0)
        p["residual_init"] = trial.suggest_float("residual_init", -3.0, 3.0)
    return p


def adapter_config_from_params(method: str, params: dict[str, Any], targets) -> dict[str, Any]:
    """HyLoRADAConfig fields of a trial's parameters."""
    cfg = {"method": method, "lora_rank": int(params["lora_rank"]),
           "lora_alpha": float(params["alpha_ratio"]) * int(params["lora_rank"]),
           "lora_dropout": float(params["lora_dropout"]),
           "lora_plus_enabled": float(params["lora_plus_ratio"]) > 1.0,
           "lora_plus_ratio": float(params["lora_plus_ratio"]), "target_modules": targets}
    for key in ("gate_init", "residual_init"):
        if key in params:
            cfg[key] = float(params[key])
    return cfg


def check_storage(url: str) -> None:
    """A database URL Optuna can open (SQLAlchemy's form `dialect[+driver]://...`), checked before
    any work; raises UsageError naming the URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:///runs/tune/tune.db or postgresql://user@host/db"
    try:
        make_url(url).get_dialect()
    except (ArgumentError, ValueError):
        raise UsageError(f"storage {url!r} is not a database URL; {example}") from None
    except (NoSuchModuleError, ImportError) as e:
        raise UsageError(f"storage {url!r}: unknown or uninstalled database kind ({e}); {example}") from None


def _open_storage(url: str):
    """An Optuna storage for `url`; SQLite gets a long busy timeout (workers wait for the lock)."""
    import optuna

    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:///")
        if path and path != url:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return url


def open_study(storage: str, study_name: str, sampler_seed: int | None, seed: int, n_startup_trials: int,
               n_warmup_steps: int, retries: int = 8):
    """Create or load the study (several workers may race to create it: retried)."""
    import optuna

    last: Exception | None = None
    for attempt in range(retries):
        try:
            st = _open_storage(storage)
            probe = optuna.create_study(storage=st, study_name=study_name, direction="minimize",
                                        load_if_exists=True)
            existing = len(probe.trials)
            s_seed = sampler_seed
            if s_seed is None:
                s_seed = seed if existing == 0 else (seed * 1_000_003 + existing * 7919 + os.getpid()) % 2**31
            sampler = optuna.samplers.TPESampler(seed=s_seed, n_startup_trials=n_startup_trials)
            pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
            study = optuna.load_study(study_name=study_name, storage=st, sampler=sampler, pruner=pruner)
            return study, s_seed
        except Exception as e:  # noqa: BLE001 - table creation races between fresh workers
            last = e
            log.info("opening the study failed (%s), retrying", e)
            time.sleep(0.2 + 0.3 * attempt)
    raise HyloradaError(f"could not open Optuna study {study_name!r} at {storage} after {retries} tries: "
                        f"{type(last).__name__}: {' '.join(str(last).split())[:300]}; check the storage URL "
                        "and that the database is reachable") from last


def _prepare_data(tokenizer, settings: TuneSettings):
    from ..data import training_blocks, window_bos_id

    bos = window_bos_id(tokenizer, "auto")  # BOS-led blocks when the tokenizer adds a BOS (hylorada/data/blocks.py)
    train_blocks = training_blocks(tokenizer, settings.data, "train", settings.seq_len, bos_id=bos)[0]
    valid = training_blocks(tokenizer, settings.data, "valid", settings.seq_len, bos_id=bos)[0]
    valid = {k: v[:settings.valid_blocks] for k, v in valid.items()}
    return train_blocks, valid


def run_tune(settings: TuneSettings | None = None, *, n_trials: int = 20, storage: str | None = None,
             study_name: str | None = None, out_dir: str | os.PathLike = "runs/tune",
             sampler_seed: int | None = None, n_startup_trials: int = 4,
             model_factory: Callable[[], tuple[nn.Module, Any]] | None = None,
             progress: bool = True, write_best: bool = True, print_summary: bool = True) -> TuneResult:
    """Run `n_trials` trials of this worker against the (shared) study; returns a summary.

    model_factory() -> (model, tokenizer): a fresh base model per trial (default:
    hylorada.load_model(settings.model)). The tokenizer of the first call prepares the data.
    progress: a progress bar and one line per trial; print_summary: the best trial at the end.
    """
    import optuna

    settings = settings or TuneSettings()
    if storage is not None:
        check_storage(storage)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(out)
    study_name = study_name or f"{settings.method}-{Path(str(settings.model)).name}-{Path(str(settings.data)).name}"
    model_factory = model_factory or _loader(settings)
    first_model, tokenizer = model_factory()
    objective = _Objective(settings, max_rank_allowed(first_model, settings.targets), model_factory,
                           *_prepare_data(tokenizer, settings), spare=[first_model], progress=progress)
    study = _start_study(storage, study_name, sampler_seed, settings, n_startup_trials, n_trials, progress)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials, show_progress_bar=progress, gc_after_trial=True)
    return summarize(study, storage, out if write_best else None, settings, objective.mine, print_summary)


def _loader(settings: TuneSettings) -> Callable[[], tuple[nn.Module, Any]]:
    """The default model_factory: hylorada.load_model(settings.model) in settings.dtype on settings.device."""
    from ..loading import load_model

    return lambda: load_model(settings.model, dtype=settings.dtype, device=settings.device)


def _start_study(storage: str, study_name: str, sampler_seed: int | None, settings: TuneSettings,
                 n_startup_trials: int, n_trials: int, progress: bool):
    """open_study; a new study records the settings; with `progress` one line says where it is."""
    study, used_seed = open_study(storage, study_name, sampler_seed, settings.seed, n_startup_trials,
                                  n_warmup_steps=settings.eval_every)
    if not study.trials:
        study.set_user_attr("settings", settings.to_dict())
    if progress:
        print(f"study {study_name!r} at {storage}: {len(study.trials)} trial(s) so far; "
              f"sampler seed {used_seed}; running {n_trials} trial(s)")
    return study


@dataclass
class _Objective:
    """The Optuna objective. One trial: the trial's hyper-parameters (`suggest`), a fresh base
    model (the first trial takes the model loaded for the set-up, `spare`) with that adapter,
    `settings.steps` training steps with the validation loss reported for pruning; the value is
    the validation loss at the end. `mine`: the numbers of the trials this worker ran."""

    settings: TuneSettings
    max_rank: int
    model_factory: Callable[[], tuple[nn.Module, Any]]
    train_blocks: dict
    valid_blocks: dict
    spare: list
    progress: bool
    mine: list[int] = field(default_factory=list)

    def __call__(self, trial) -> float:
        import optuna

        from ..model import HyLoRADAModel
        from ..train import NonFiniteLossError, train

        s = self.settings
        self.mine.append(trial.number)
        params = suggest(trial, s.method, self.max_rank)
        acfg = adapter_config_from_params(s.method, params, s.targets)
        model = self.spare.pop() if self.spare else self.model_factory()[0]
        torch.manual_seed(s.seed)
        wrapped = HyLoRADAModel(model, HyLoRADAConfig(**acfg))
        tcfg = s.train_config(lr=params["lr"])
        trial.set_user_attr("adapter_config", acfg)
        trial.set_user_attr("train", {"steps": tcfg.steps, "batch_size": tcfg.batch_size, "lr": tcfg.lr,
                                      "warmup_steps": tcfg.warmup_steps, "schedule": tcfg.schedule,
                                      "seq_len": s.seq_len, "seed": tcfg.seed})
        try:
            result = train(wrapped, self.train_blocks, self.valid_blocks, tcfg, callback=_pruner(trial))
        except NonFiniteLossError as e:
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            del wrapped, model
        final = result.valid_losses[-1]["loss"]
        trial.set_user_attr("tokens_per_s", result.mean_tokens_per_s)
        trial.set_user_attr("train_time_s", result.train_time_s)
        if self.progress:
            print(f"trial {trial.number}: valid loss {final:.4f}  {params}")
        return final


def _pruner(trial) -> Callable[[int, dict[str, Any]], None]:
    """The trainer's callback: each validation loss (inf when not finite) is reported to the
    trial at its step, and the trial is pruned when the study's pruner says so."""
    import optuna

    def report(step: int, metrics: dict[str, Any]) -> None:
        if "valid_loss" in metrics:
            v = metrics["valid_loss"]
            trial.report(v if math.isfinite(v) else float("inf"), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (valid loss {v:.4f})")

    return report


def summarize(study, storage: str, out: Path | None, settings: TuneSettings, mine: list[int] | None = None,
              progress: bool = True) -> TuneResult:
    """Count the study's trials; print and (with `out`) write the best trial's config."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    res = TuneResult(study_name=study.study_name, storage=storage, n_trials_total=len(trials),
                     n_complete=len(complete), n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
                     n_failed=sum(t.state == TrialState.FAIL for t in trials), best_trial=None,
                     best_value=None, trial_numbers=list(mine or []))
    if not complete:
        if progress:
            print("no completed trial yet")
        return res
    best = min(complete, key=lambda t: t.value)
    res.best_trial, res.best_value, res.best_params = best.number, best.value, dict(best.params)
    doc = best_config(best, study.study_name, storage, settings)
    if out is not None:
        path = out / "best_config.json"
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        res.best_config_path = str(path)
    if progress:
        print(f"best trial {best.number}: valid loss {best.value:.4f} "
              f"({res.n_complete} complete, {res.n_pruned} pruned, {res.n_failed} failed of {res.n_trials_total})")
        for k, v in best.params.items():
            print(f"  {k:<16} {v:.6g}" if isinstance(v, float) else f"  {k:<16} {v}")
        print("reproduce with:\n  hylorada finetune " + " ".join(doc["finetune_args"]) + " --out DIR")
        if doc["not_in_finetune_args"]:
            print(f"  (hylorada finetune has no flag for {sorted(doc['not_in_finetune_args'])}: "
                  "see adapter_config in best_config.json)")
        if res.best_config_path:
            print(f"written: {res.best_config_path}")
    return res


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finetune_flag(cls, name: str) -> tuple[str, bool]:
    """(flag, whether `hylorada finetune` has it) of the config field `cls.name`, read the way
    hylorada/commands/finetune.py generates its flags (recipes/finetune.py ADAPTER_FIELDS,
    TRAIN_FIELDS); `cls=None`: `name` is a flag of the run itself (--model, --data, --seq-len)."""
    if cls is None:
        return name, True
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field_flag(f), name in {HyLoRADAConfig: ADAPTER_FIELDS, TrainConfig: TRAIN_FIELDS}[cls]


def best_config(trial, study_name: str, storage: str, settings: TuneSettings) -> dict[str, Any]:
    """The JSON written for the best trial, with the `hylorada finetune` flags that reproduce it.

    Settings that `hylorada finetune` has no flag for are listed under `not_in_finetune_args`."""
    acfg = trial.user_attrs.get("adapter_config") or adapter_config_from_params(
        settings.method, trial.params, settings.targets)
    tr = trial.user_attrs.get("train", {})
    targets = acfg.get("target_modules")
    H, T = HyLoRADAConfig, TrainConfig  # (config, field) or (None, flag) -> the values written
    wanted: list[tuple[Any, str, list[str]]] = [
        (None, "--model", [str(settings.model)]), (H, "method", [acfg["method"]]), (None, "--data", [str(settings.data)]),
        (H, "lora_rank", [str(acfg["lora_rank"])]), (H, "lora_alpha", [f"{acfg['lora_alpha']:g}"]),
        (H, "lora_dropout", [f"{acfg['lora_dropout']:.6g}"]),
        (H, "target_modules", [targets] if isinstance(targets, str) else list(targets or [])),
        (T, "lr", [f"{tr.get('lr', trial.params['lr']):.6g}"]), (T, "steps", [str(tr.get("steps", settings.steps))]),
        (None, "--seq-len", [str(settings.seq_len)]), (T, "batch_size", [str(settings.batch_size)]),
        (T, "warmup_steps", [str(settings.warmup_steps)]), (T, "seed", [str(settings.seed)])]
    if acfg.get("lora_plus_enabled"):
        wanted.append((H, "lora_plus_ratio", [f"{acfg['lora_plus_ratio']:.6g}"]))
    for key in ("gate_init", "residual_init"):
        if key in acfg:
            wanted.append((H, key, [f"{acfg[key]:.6g}"]))
    args: list[str] = []
    missing: dict[str, Any] = {}
    for cls, name, vals in wanted:
        if not vals:
            continue
        flag, known = finetune_flag(cls, name)
        if known:
            args += [flag, *vals]
        else:
            missing[flag] = vals if len(vals) > 1 else vals[0]
    return {"study": study_name, "storage": storage, "trial": trial.number, "valid_loss": trial.value,
            "params": dict(trial.params), "adapter_config": acfg, "train": tr, "settings": settings.to_dict(),
            "finetune_args": args, "not_in_finetune_args": missing}
