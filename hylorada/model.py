"""HyLoRADAModel: inject adapters into a transformers causal LM, train them, merge, save, export.

The base model is frozen and wrapped in place: every matching `nn.Linear`, GPT-2 `Conv1D` or
`FactorizedLinear` becomes an adapter layer that holds the original layer as `base_layer`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import ADAPTER_CLASSES, AdapterLayer
from .adapters.dora import direct_weight_norm
from .adapters.lorada import QueryNormTemperature, find_query_norm
from .nn.factorized import FactorizedLinear
from .errors import HyloradaError
from .config import ALL_LINEAR, ATTENTION_TARGETS, HyLoRADAConfig
from .errors import UsageError
from .layers import in_out_features, is_linear
from .utils.io import atomic_output_dir

# Our own file names: peft's names (adapter_config.json, ...) would invite
# `peft.PeftModel.from_pretrained`, which cannot read this format; `export_peft` writes those.
CONFIG_NAME = "hylorada_adapter.json"
WEIGHTS_NAME = "hylorada_adapter.safetensors"
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors")  # before 2026-11-23
FORMAT_VERSION = 1
QUERY_NAMES = ("q_proj", "query", "q", "qkv_proj")
# the attention projections by naming convention (default targets of a model type that
# config.ATTENTION_TARGETS does not list): Llama-style, Phi-3 (fused qkv_proj), OPT, GPT-2, GPT-NeoX
ATTENTION_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "self_attn.out_proj",
                      "attn.c_attn", "attn.c_proj", "attention.query_key_value", "attention.dense")
log = logging.getLogger(__name__)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers adapters can wrap (inside a FactorizedLinear only the whole layer counts)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) or not is_linear(module):
            continue
        parent = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent), (FactorizedLinear, AdapterLayer)):
            continue
        names.append(name)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """ATTENTION_TARGETS of the model type, else those of ATTENTION_SUFFIXES that name a layer."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ATTENTION_TARGETS:
        return list(ATTENTION_TARGETS[model_type])
    names = linear_layer_names(model)
    found = [t for t in ATTENTION_SUFFIXES if any(n == t or n.endswith("." + t) for n in names)]
    return found or list(ATTENTION_TARGETS["default"])


def match_targets(model: nn.Module, targets: list[str] | str | None) -> list[str]:
    """Module names selected by `target_modules`: exact name or '.'-suffix for a list, a full regex
    match for a string, every linear but the output embedding for 'all-linear'."""
    candidates = linear_layer_names(model)
    if targets is None:
        targets = default_targets(model)
    if targets == ALL_LINEAR:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n in candidates if model.get_submodule(n) is not out_emb]
    elif isinstance(targets, str):
        chosen = [n for n in candidates if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        suffixes = sorted({_strip_layer_index(n) for n in candidates})
        raise ValueError(
            f"HyLoRADAConfig.target_modules={targets!r} matches no layer; allowed: names or "
            f"'.'-suffixes of the layers that exist, e.g. {suffixes[:40]}, or '{ALL_LINEAR}'")
    return chosen


def _strip_layer_index(name: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj (for readable error messages)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1:])
    return name


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _num_heads(model: nn.Module) -> int:
    cfg = _text_config(model)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise UsageError("LoRaDA needs the number of attention heads; the model config has none of "
                     "num_attention_heads / n_head / num_heads")


def _num_kv_heads(model: nn.Module) -> int:
    cfg = _text_config(model)
    return int(getattr(cfg, "num_key_value_heads", None) or _num_heads(model))


def lorada_query_slice(model: nn.Module, name: str, base: nn.Module) -> dict[str, int] | None:
    """LoRaDA's query rows in the output of layer `name` (n_heads, q_offset, q_size), or None
    when the layer is not a query projection. H query heads, H_kv key/value heads:

    - q_proj / query / q: every row, H heads;
    - c_attn (GPT-2: [q; k; v], each d_out/3): the first d_out/3 rows;
    - qkv_proj (Phi-3: [q; k; v] with grouped kv): the first H·hd rows, hd = d_out/(H + 2·H_kv);
    - query_key_value (GPT-NeoX, Bloom: q, k, v interleaved per head): refused, the temperature
      needs one contiguous query slice (UsageError, at construction).
    """
    leaf = name.rsplit(".", 1)[-1]
    _, d_out = in_out_features(base)
    if leaf == "query_key_value":
        raise UsageError(
            f"method='lorada' does not support '{name}': this architecture "
            f"({getattr(model.config, 'model_type', '?')}) interleaves q, k and v per head in one "
            "fused projection, and the LoRaDA temperature needs a contiguous query slice; allowed: "
            "method in ['lora', 'dora', 'hylorada'], or lorada on a model with q_proj / c_attn / qkv_proj")
    if leaf not in QUERY_NAMES and leaf != "c_attn":
        return None
    heads = _num_heads(model)
    if leaf == "c_attn":
        return dict(n_heads=heads, q_offset=0, q_size=d_out // 3)
    if leaf == "qkv_proj":
        per_head, rem = divmod(d_out, heads + 2 * _num_kv_heads(model))
        if rem:
            raise UsageError(f"LoRaDA: fused '{name}' has {d_out} outputs, not (n_heads + 2·n_kv_heads)"
                             f" = {heads + 2 * _num_kv_heads(model)} heads of equal size")
        return dict(n_heads=heads, q_offset=0, q_size=heads * per_head)
    return dict(n_heads=heads, q_offset=0, q_size=d_out)


class HyLoRADAModel(nn.Module):
    """A frozen causal LM with adapters (LoRA, DoRA, HyLoRADA or LoRaDA) on the target layers."""

    def __init__(self, model: nn.Module, config: HyLoRADAConfig | None = None,
                 *, target_names: list[str] | None = None) -> None:
        super().__init__()
        config = config if config is not None else HyLoRADAConfig()
        self.model = model
        self.adapter_config = config
        for p in model.parameters():
            p.requires_grad_(False)
        names = target_names if target_names is not None else match_targets(model, config.target_modules)
        self.target_names: list[str] = list(names)
        self.query_norm_names: list[str] = []  # LoRaDA: norms on q wrapped by QueryNormTemperature
        self._inject()
        self._unloaded = False

    # ---- construction -------------------------------------------------------------------
    def _inject(self) -> None:
        cfg, model = self.adapter_config, self.model
        cls = ADAPTER_CLASSES[cfg.method]
        q_layers = 0
        for name in self.target_names:
            base = model.get_submodule(name)
            if isinstance(base, AdapterLayer):
                raise ValueError(f"layer '{name}' already has an adapter")
            kwargs: dict[str, Any] = {}
            if cfg.method == "lorada":
                kwargs = lorada_query_slice(model, name, base) or {}
                q_layers += bool(kwargs)
            layer = cls(base, cfg, name, **kwargs)
            layer.train(base.training)  # an eval-mode model stays in eval mode (no adapter dropout)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
            if kwargs:
                self._temperature_after_query_norm(parent_name, parent, layer)
        if cfg.method == "lorada" and q_layers == 0:
            raise ValueError(
                "HyLoRADAConfig.method='lorada' needs the query projection among target_modules "
                f"(a layer named one of {list(QUERY_NAMES) + ['c_attn']}); got {cfg.target_modules!r}")

    def _temperature_after_query_norm(self, parent_name: str, attention: nn.Module, layer: nn.Module) -> None:
        """LoRaDA on an attention that normalises q after q_proj (adapters/lorada.py): τ moves
        behind the norm, which would otherwise cancel it."""
        norm_name = find_query_norm(attention)
        if norm_name is None:
            return
        layer.after_norm = True
        setattr(attention, norm_name, QueryNormTemperature(getattr(attention, norm_name), layer))
        self.query_norm_names.append(f"{parent_name}.{norm_name}" if parent_name else norm_name)

    # ---- pass-through ---------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- adapters and their parameters ----------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name in self.target_names:
            yield name, self.model.get_submodule(name)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """AdamW groups: lora_A at lr; lora_B at lr x lora_plus_ratio when LoRA+ is on (Hayou et
        al. 2024); magnitudes, gates, blends and temperatures ("scalars") at lr, no weight decay.

        Unlike peft (which puts every 1-D parameter into B's fast group) the 1-D parameters keep
        the base rate: they are scales near their init, not the zero-initialised B.
        """
        ratio = self.adapter_config.lora_plus_ratio if self.adapter_config.lora_plus_enabled else 1.0
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "scalars": []}
        for name, p in self.named_trainable_parameters():
            leaf = name.rsplit(".", 1)[-1]
            groups[leaf if leaf in ("lora_A", "lora_B") else "scalars"].append(p)
        spec = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay), "scalars": (lr, 0.0)}
        return [{"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]}
                for k, v in groups.items() if v]

    def print_trainable_params(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
        return trainable, total

    # ---- state ------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (A, B, magnitudes, m0, gates, blends, temperatures), by module name."""
        out = {}
        for name, layer in self.adapter_layers():
            for attr in ("lora_A", "lora_B") + layer.extra_state_names():
                out[f"{name}.{attr}"] = getattr(layer, attr).detach()
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter state does not fit this model: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        for key, target in own.items():
            if target.shape != state[key].shape:
                raise ValueError(f"adapter tensor '{key}' has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(state[key])

    def save_adapter(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """hylorada_adapter.json + hylorada_adapter.safetensors (the complete adapter state), written
        atomically; an existing previous adapter folder is replaced only with `overwrite=True`."""
        if self.merged:
            raise ValueError("save_adapter on a merged model: call unmerge() first")
        meta = {
            "format": "hylorada",
            "format_version": FORMAT_VERSION,
            "config": self.adapter_config.to_dict(),
            "target_names": self.target_names,
            "base_model_name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", None),
        }
        tensors = {k: v.contiguous().clone() for k, v in self.adapter_state_dict().items()}
        return _write_dir_atomic(Path(directory), {CONFIG_NAME: json.dumps(meta, indent=2).encode()},
                                 {WEIGHTS_NAME: tensors}, kind="adapter", overwrite=overwrite)

    save_pretrained = save_adapter

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike) -> "HyLoRADAModel":
        config_path, weights_path = adapter_files(Path(directory))
        meta = json.loads(config_path.read_text())
        if meta.get("format") != "hylorada":
            raise ValueError(f"{config_path} is not a hylorada adapter (format="
                             f"{meta.get('format')!r}); peft adapters load with peft.PeftModel")
        wrapped = cls(model, HyLoRADAConfig.from_dict(meta["config"]), target_names=meta["target_names"])
        try:
            wrapped.load_adapter_state_dict(load_file(str(weights_path)))
        except ValueError as e:  # missing / unexpected / misshapen tensors
            raise HyloradaError(f"{weights_path}: {e}") from e
        return wrapped

    # ---- merge --------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for _, layer in self.adapter_layers()) if not self._unloaded else True

    def merge(self) -> None:
        for _, layer in self.adapter_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge every adapter into its base layer and return the plain transformers model.

        Exception (LoRaDA on a model with a norm on q, adapters/lorada.py): the temperatures
        cannot fold into the weights, so each `QueryNormTemperature` stays in place with a frozen
        copy of τ; the outputs are exact, but the model is not a plain transformers model
        (a warning says so)."""
        self.merge()
        for name in self.query_norm_names:
            self.model.get_submodule(name).detach_temperature()
        if self.query_norm_names:
            log.warning(
                "merge_and_unload: the LoRaDA temperatures act after the query norm of %d attention "
                "layers (e.g. '%s') and cannot be folded into weights; they stay as "
                "QueryNormTemperature modules, so the merged model is exact but NOT a plain "
                "transformers model (its state dict has '<norm>.norm.weight' and '<norm>.temperature'; "
                "from_pretrained of the model class cannot load it). Keep the adapter instead "
                "(save_adapter) to share it.", len(self.query_norm_names), self.query_norm_names[0])
        self.query_norm_names = []
        return self._restore_base_layers()

    def unload(self) -> nn.Module:
        """Drop the adapters (unmerging first if merged) and return the original model."""
        self.unmerge()
        for name in self.query_norm_names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, getattr(parent, child).norm)
        self.query_norm_names = []
        return self._restore_base_layers()

    def _restore_base_layers(self) -> nn.Module:
        for name, layer in list(self.adapter_layers()):
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child,
                    layer.base_layer)
        self._unloaded = True
        self.target_names = []
        return self.model

    # ---- peft export ----------------------------------------------------------------------
    def export_peft(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a peft LoRA/DoRA adapter giving the same outputs (atomically; an existing
        previous export is replaced only with `overwrite=True`).

        LoRA -> peft LoRA; DoRA -> peft DoRA; HyLoRADA -> peft DoRA with m_dora = c·||W'||_row.
        """
        cfg = self.adapter_config
        if cfg.method == "lorada":
            where = ("; on this model they act after the query norm and do not even merge into "
                     "weights, so use save_adapter()" if self.query_norm_names else
                     ". Use merge_and_unload() and save_pretrained() to export the merged model.")
            raise ValueError("export_peft: method='lorada' has per-head attention temperatures "
                             "(LoRaDA's 'temperature') that peft cannot express; allowed methods: "
                             f"'lora', 'dora', 'hylorada'{where}")
        if self.merged:
            raise ValueError("export_peft on a merged model: call unmerge() first")
        tensors: dict[str, torch.Tensor] = {}
        fan_in_fan_out = None
        for name, layer in self.adapter_layers():
            if isinstance(layer.base_layer, FactorizedLinear):
                raise ValueError(f"export_peft: layer '{name}' is a FactorizedLinear, which peft "
                                 "does not know; merge_and_unload() and save_compressed() instead")
            is_conv1d = not isinstance(layer.base_layer, nn.Linear)
            if fan_in_fan_out is not None and fan_in_fan_out != is_conv1d:
                raise ValueError("export_peft: mixing Linear and Conv1D targets is not supported by one peft config")
            fan_in_fan_out = is_conv1d
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().float().contiguous().clone()
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach().float().contiguous().clone()
            if cfg.method in ("dora", "hylorada"):
                with torch.no_grad():
                    if cfg.method == "dora":
                        m = layer.magnitude.detach().float()
                    else:
                        n = direct_weight_norm(layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling)
                        m = (layer.row_scale().double() * n).float()
                tensors[f"{prefix}.lora_magnitude_vector"] = m.contiguous().clone()
        peft_cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.method in ("dora", "hylorada"),
            "target_modules": sorted(self.target_names),
            "fan_in_fan_out": bool(fan_in_fan_out),
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
        }
        return _write_dir_atomic(Path(directory),
                                 {"adapter_config.json": json.dumps(peft_cfg, indent=2).encode()},
                                 {"adapter_model.safetensors": tensors}, kind="peft-adapter",
                                 overwrite=overwrite)


def adapter_files(directory: Path) -> tuple[Path, Path]:
    """(config, weights) paths of the adapter saved in `directory` (current or legacy names)."""
    for names in ((CONFIG_NAME, WEIGHTS_NAME), LEGACY_NAMES):
        if (directory / names[0]).is_file():
            return directory / names[0], directory / names[1]
    raise FileNotFoundError(f"{directory} holds no hylorada adapter (no {CONFIG_NAME}); "
                            "save one with HyLoRADAModel.save_adapter or `hylorada finetune`")


def _write_dir_atomic(directory: Path, texts: dict[str, bytes],
                      tensor_files: dict[str, dict[str, torch.Tensor]], *, kind: str,
                      overwrite: bool) -> Path:
    """Write the files into `directory` through hylorada.utils.io.atomic_output_dir: a temporary
    sibling renamed into place; a foreign folder is refused, a previous output of ours is
    replaced only with `overwrite=True`."""
    with atomic_output_dir(directory, kind=kind, overwrite=overwrite, flag="output folder") as tmp:
        for fname, data in texts.items():
            (tmp / fname).write_bytes(data)
        for fname, tensors in tensor_files.items():
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
    return directory
