"""`hylorada generate` and `hylorada export` (issue 13): each output is checked against what
transformers / peft produce when called directly."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hylorada import HyLoRADAConfig, HyLoRADAModel, load_model
from hylorada.cli import main
from hylorada.errors import UsageError
from hylorada.recipes.export import export_adapter
from hylorada.recipes.generate import GenerationSettings, encode_prompt, generate

PROMPT = "w1 w2 w3 w4"


def _saved_adapter(folder: str, out, method: str = "hylorada") -> HyLoRADAModel:
    model, _ = load_model(folder)
    wrapped = HyLoRADAModel(model, HyLoRADAConfig(method=method, lora_rank=4, target_modules="all-linear"))
    with torch.no_grad():  # a non-trivial adapter, so that "with adapter" differs from the base
        g = torch.Generator().manual_seed(0)
        for _, p in wrapped.named_trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    wrapped.save_adapter(out)
    return wrapped


def _direct(model, tokenizer, **kw) -> str:
    enc = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_equals_model_generate_with_and_without_adapter(tiny_assets, tmp_path, capsys):
    folder, _ = tiny_assets
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected_base = _direct(base, tok)
    wrapped = _saved_adapter(folder, tmp_path / "adapter")
    expected_adapted = _direct(wrapped.eval(), tok)
    assert expected_base != expected_adapted  # otherwise the adapter case proves nothing

    settings = GenerationSettings(max_new_tokens=8)
    fresh, _ = load_model(folder)
    assert generate(fresh, tok, PROMPT, settings) == expected_base
    assert main(["generate", "--model", folder, "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_base.strip()
    assert main(["generate", "--model", folder, "--adapter", str(tmp_path / "adapter"),
                 "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_adapted.strip()


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_assets):
    folder, _ = tiny_assets
    tok = AutoTokenizer.from_pretrained(folder)
    plain = encode_prompt(tok, PROMPT)["input_ids"]
    tok.chat_template = "{% for m in messages %}w9 {{ m['content'] }} w8{% endfor %}{% if add_generation_prompt %} w7{% endif %}"
    chat = encode_prompt(tok, PROMPT)["input_ids"]
    assert chat[0].tolist() == tok("w9 " + PROMPT + " w8 w7", add_special_tokens=False)["input_ids"]
    assert chat.shape[1] == plain.shape[1] + 3
    assert torch.equal(encode_prompt(tok, PROMPT, chat=False)["input_ids"], plain)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_generation_settings_refuse_bad_values(kw):
    with pytest.raises(UsageError, match=next(iter(kw))):
        GenerationSettings(**kw)


@pytest.mark.parametrize("method", ["lora", "dora", "hylorada"])
def test_export_peft_loads_with_peft_and_gives_the_same_logits(tiny_assets, tmp_path, method):
    peft = pytest.importorskip("peft")
    folder, _ = tiny_assets
    wrapped = _saved_adapter(folder, tmp_path / "adapter", method)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wrapped.eval()(input_ids=ids).logits
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--to", "peft", str(tmp_path / "peft")]) == 0
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_merged_loads_with_from_pretrained_and_gives_the_same_logits(tiny_assets, tmp_path):
    folder, _ = tiny_assets
    wrapped = _saved_adapter(folder, tmp_path / "adapter", "hylorada")
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wrapped.eval()(input_ids=ids).logits
    out = export_adapter(tmp_path / "adapter", "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"]


def test_export_refuses_an_existing_output_and_changes_nothing(tiny_assets, tmp_path):
    folder, _ = tiny_assets
    _saved_adapter(folder, tmp_path / "adapter", "lora")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        export_adapter(tmp_path / "adapter", "peft", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]


def test_adapter_folder_is_not_mistaken_for_a_peft_adapter(tiny_assets, tmp_path):
    folder, _ = tiny_assets
    _saved_adapter(folder, tmp_path / "adapter", "lora")
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" not in names  # peft would try (and fail: no peft_type)


def test_wrapping_keeps_the_models_train_or_eval_mode():
    from conftest import tiny_llama

    cfg = HyLoRADAConfig(method="lora", lora_rank=2, lora_dropout=0.5)
    for mode in (False, True):
        model = tiny_llama().train(mode)
        wrapped = HyLoRADAModel(model, cfg)
        assert {layer.training for _, layer in wrapped.adapter_layers()} == {mode}
    ids = torch.randint(0, 100, (1, 8))
    eval_wrapped = HyLoRADAModel(tiny_llama().eval(), cfg)
    with torch.no_grad():  # eval mode: no dropout, so two calls agree exactly
        assert torch.equal(eval_wrapped(input_ids=ids).logits, eval_wrapped(input_ids=ids).logits)
