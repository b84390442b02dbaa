"""The cross-architecture matrix: every adapter method and the compress round trip on tiny models
of nine families, built from configs in code (hidden 32, 2 layers; fast on CPU).

Each family brings a different way of writing a decoder: Llama (grouped-query attention),
Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), Gemma-3 text (q/k norm, scaled and
tied embeddings, sliding-window layers), Phi-3 (fused qkv_proj and gate_up_proj), GPT-2 (Conv1D,
fused c_attn), OPT (out_proj/fc1/fc2 naming, biases) and GPT-NeoX (query_key_value interleaved
per head). References are independent of hylorada: the base model itself (identity), peft
(LoRA, DoRA), transformers' own loading (round trips) and the unmerged model (merge).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_adapters_into_peft, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig,
                          MistralConfig, OPTConfig, Phi3Config, Qwen3Config)

from hylorada import HyLoRADAConfig, HyLoRADAModel
from hylorada.compress import CompressConfig, compress_model, load_compressed, save_compressed
from hylorada.compress.factorized import FactorizedLinear
from hylorada.errors import UsageError

peft = pytest.importorskip("peft")

VOCAB = 128
METHODS = ["lora", "dora", "hylorada", "lorada"]
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _randomize_biases_and_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero biases and norm weights, so that their handling is actually tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _build(config, cls=AutoModelForCausalLM) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config) if cls is not AutoModelForCausalLM else cls.from_config(config)
    return _randomize_biases_and_norms(model)


def tiny_mistral():
    return _build(MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False))


def tiny_qwen3():
    return _build(Qwen3Config(**COMMON, head_dim=8, tie_word_embeddings=True))


def tiny_gemma3():
    """Gemma-3 text: head_dim 16 (q_proj 64 x 32), q/k norm, embeddings scaled by sqrt(32) and
    tied, one sliding-window (8 tokens) and one full-attention layer, BOS id 2."""
    return _build(Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"],
                                   tie_word_embeddings=True, bos_token_id=2, query_pre_attn_scalar=16),
                  Gemma3ForCausalLM)


def tiny_phi3():
    """Phi-3: qkv_proj = [q (4 heads x 8); k (2 x 8); v (2 x 8)] is 64 x 32; gate_up_proj fused."""
    return _build(Phi3Config(**COMMON, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2))


def tiny_opt():
    return _build(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=32,
                            dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                            eos_token_id=2))


def tiny_neox():
    return _build(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.5))


FAMILIES = {
    "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3, "phi3": tiny_phi3, "gpt2": tiny_gpt2, "opt": tiny_opt, "neox": tiny_neox,
}
# feature a family does not support -> what the construction error must say
UNSUPPORTED = {("neox", "lorada"): "interleaves q, k and v per head"}

CELLS = [pytest.param(f, m, id=f"{f}-{m}") for f in FAMILIES for m in METHODS]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread."""


def ids(n_tokens: int = 12, batch: int = 2, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def wrap(family: str, method: str, **kw) -> HyLoRADAModel | None:
    """The family's tiny model with `method` on every linear; None (after checking the error)
    where the family does not support the method."""
    cfg = HyLoRADAConfig(method=method, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                         target_modules="all-linear", **kw)
    if (family, method) in UNSUPPORTED:
        with pytest.raises(UsageError, match=UNSUPPORTED[(family, method)]):
            HyLoRADAModel(FAMILIES[family](), cfg)
        return None
    return HyLoRADAModel(FAMILIES[family](), cfg)


@torch.no_grad()
def randomize(model: HyLoRADAModel, seed: int = 7) -> HyLoRADAModel:
    """Every trainable parameter to random non-zero values (B included; scalars perturbed)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.2
        p.copy_(noise) if name.endswith(("lora_A", "lora_B")) else p.add_(noise)
    return model


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_attention_projections(family):
    model = HyLoRADAModel(FAMILIES[family](), HyLoRADAConfig(method="lora", lora_rank=2))
    leaves = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in model.target_names}
    expected = {
        "gpt2": {"attn.c_attn", "attn.c_proj"},
        "phi3": {"self_attn.qkv_proj", "self_attn.o_proj"},
        "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
        "neox": {"attention.query_key_value", "attention.dense"},
    }.get(family, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
    assert leaves == expected
    assert len(model.target_names) == 2 * len(expected)  # both layers


@pytest.mark.parametrize("family, query, heads, q_rows, d_out", [
    ("llama", "model.layers.0.self_attn.q_proj", 4, 32, 32),
    ("gemma3", "model.layers.0.self_attn.q_proj", 4, 64, 64),
    ("phi3", "model.layers.0.self_attn.qkv_proj", 4, 32, 64),  # q 4x8, k 2x8, v 2x8
    ("gpt2", "transformer.h.0.attn.c_attn", 4, 32, 96),
    ("opt", "model.decoder.layers.0.self_attn.q_proj", 4, 32, 32),
])
def test_lorada_query_slice_by_hand(family, query, heads, q_rows, d_out):
    model = wrap(family, "lorada")
    layer = model.model.get_submodule(query)
    assert layer.temperature.shape == (heads,)
    with torch.no_grad():
        layer.temperature.copy_(torch.arange(2.0, 2.0 + heads))
    t = layer.row_scale()
    if family == "gemma3":  # q-norm family: τ acts after the norm, q_proj's rows are not scaled
        assert layer.after_norm and t is None
        return
    expected = torch.ones(d_out)
    expected[:q_rows] = torch.arange(2.0, 2.0 + heads).repeat_interleave(q_rows // heads)
    assert torch.equal(t, expected)
    others = [n for n, l in model.adapter_layers() if getattr(l, "temperature", None) is not None]
    assert len(others) == 2  # one query projection per layer, nothing else


# ---------------------------------------------------------------------------- adapter matrix
@pytest.mark.parametrize("family, method", CELLS)
def test_identity_at_init(family, method):
    x = ids()
    ref = logits(FAMILIES[family](), x)
    model = wrap(family, method)
    if model is None:
        return
    assert close(logits(model, x), ref, 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_output_equals_peft(family, method):
    ours = randomize(wrap(family, method))
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=list(ours.target_names),
                          use_dora=method == "dora", fan_in_fan_out=family == "gpt2")
    theirs = peft.get_peft_model(FAMILIES[family](), cfg).eval()
    copy_adapters_into_peft(ours, theirs)
    x = ids()
    a, b = logits(ours, x), logits(theirs, x)
    assert not close(a, logits(FAMILIES[family](), x), 1e-3)  # the adapters do something
    assert close(a, b, 1e-5)


@pytest.mark.parametrize("family, method", CELLS)
def test_merge_is_exact(family, method):
    model = wrap(family, method)
    if model is None:
        return
    randomize(model)
    x = ids()
    adapted = logits(model, x)
    model.merge()
    assert close(logits(model, x), adapted, 1e-5)
    model.unmerge()
    assert close(logits(model, x), adapted, 1e-5)
    plain = model.merge_and_unload()
    left = {type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("hylorada")}
    # LoRaDA on q-norm families keeps its temperature after the norm (it cannot fold into the
    # norm's weight, shared by all heads); everything else merges into plain transformers modules
    assert left == ({"QueryNormTemperature"} if (method == "lorada" and family in ("qwen3", "gemma3")) else set())
    assert close(logits(plain, x), adapted, 1e-5)


@pytest.mark.parametrize("family, method", CELLS)
def test_save_load_bit_exact_at_256_tokens(family, method, tmp_path):
    model = wrap(family, method)
    if model is None:
        return
    randomize(model)
    x = ids(256, batch=1)
    expected = logits(model, x)
    model.save_adapter(tmp_path / "a")
    loaded = HyLoRADAModel.from_pretrained(FAMILIES[family](), tmp_path / "a")
    assert torch.equal(logits(loaded, x), expected)


@pytest.mark.parametrize("family, method", CELLS)
def test_export_peft_round_trip(family, method, tmp_path):
    model = wrap(family, method)
    if model is None:
        return
    randomize(model)
    if method == "lorada":
        with pytest.raises(ValueError, match="lorada"):
            model.export_peft(tmp_path / "p")
        return
    x = ids()
    expected = logits(model, x)
    model.export_peft(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_dora"] == (method != "lora")
    loaded = peft.PeftModel.from_pretrained(FAMILIES[family](), str(tmp_path / "p")).eval()
    assert close(logits(loaded, x), expected, 1e-5)


LORADA_EFFECT = [pytest.param(f, id=f)
                 for f in FAMILIES if (f, "lorada") not in UNSUPPORTED]


def temperature_reference(family: str, tau: float) -> torch.nn.Module:
    """The base model with every attention's softmax scale (`scaling`, the 1/sqrt(d) of
    q·k/sqrt(d)) multiplied by tau: attention logits tau·q·k/sqrt(d), the temperature LoRaDA
    is meant to apply, computed by transformers itself."""
    model = FAMILIES[family]()
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "scaling", None), float):
            module.scaling *= tau
            n += 1
    assert n == 2, n
    return model


@pytest.mark.parametrize("family", LORADA_EFFECT)
def test_lorada_temperature_scales_the_attention_logits(family):
    """temperature_init = 3 on every head (B = 0) equals the base model with softmax scale x3,
    and differs from the base model; a temperature that a later q-norm cancels fails here."""
    x = ids(16)
    base = logits(FAMILIES[family](), x)
    ref = logits(temperature_reference(family, 3.0), x)
    assert not close(ref, base, 1e-4)
    model = wrap(family, "lorada", temperature_init=3.0)
    assert all(l.temperature is None or torch.all(l.temperature == 3.0) for _, l in model.adapter_layers())
    assert close(logits(model, x), ref, 1e-5)
    model.merge()  # the merged temperature too
    assert close(logits(model, x), ref, 1e-5)


# ------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_compress_save_load_bit_exact(family, method, tmp_path):
    model = FAMILIES[family]()
    x = ids(256, batch=1)
    dense = logits(model, x)
    report = compress_model(model, CompressConfig(method=method, ratio=0.3),
                            calibration=ids(64, batch=4, seed=5) if method == "whiten" else None)
    n_linear = sum(1 for _, m in model.named_modules() if isinstance(m, FactorizedLinear))
    assert report.n_factorized == n_linear > 0 and report.target_params_after < report.target_params_before
    out = logits(model, x)
    assert not torch.equal(out, dense)
    save_compressed(model, tmp_path / "c", report=report)
    loaded = load_compressed(tmp_path / "c")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, x), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_in_bf16_save_load_keeps_rope_fp32(family, tmp_path):
    """bf16 weights (RoPE inv_freq kept fp32, as transformers' from_pretrained(dtype=bf16))
    -> compress -> save -> load, as saved and with dtype=bf16: bit-exact at 256 tokens."""
    from hylorada.loading import cast_weights
    model = cast_weights(FAMILIES[family](), torch.bfloat16)
    compress_model(model, CompressConfig(method="svd", ratio=0.3))
    x = ids(256, batch=1)
    out = logits(model, x)
    save_compressed(model, tmp_path / "c")
    for dtype in (None, "bfloat16"):
        loaded = load_compressed(tmp_path / "c", dtype=dtype)
        assert all(b.dtype == torch.float32 for n, b in loaded.named_buffers() if "inv_freq" in n)
        assert next(loaded.parameters()).dtype == torch.bfloat16
        assert torch.equal(logits(loaded, x), out)
