"""The README's sections "Use your own model" and "Load and serve": every code block marked
`<!-- tested: NAME ... -->` is read from README.md and run here, on tiny models.

Substitutions (the only ones): `path/to/hf-folder` -> a tiny Llama transformers folder,
`path/to/model.gguf` -> a tiny Llama GGUF written with gguf.GGUFWriter (tests/test_gguf_cache.py),
`shakespeare` -> a small local .jsonl corpus. Shell lines run through `hylorada.cli.main` in a
temporary working directory; Python blocks run with `exec`.
"""
from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_assets, tiny_llama
from test_gguf_cache import write_tiny_gguf

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = re.compile(r"<!-- tested: (\w+)[^>]*-->\s*```(\w+)\n(.*?)```", re.S)


def readme_blocks() -> dict[str, tuple[str, str]]:
    return {name: (lang, body) for name, lang, body in MARK.findall(README.read_text())}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """cwd = a fresh folder with the substitutes; the cache in it too."""
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    folder, _ = make_tiny_assets(tmp_path)
    tiny_llama(max_position_embeddings=1024).save_pretrained(folder)  # the README's 512-token windows
    write_tiny_gguf(tmp_path / "tiny.gguf", context=1024)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    words = [f"w{i}" for i in range(30)]
    with open(corpus, "w") as fh:  # ~200k byte-level tokens: enough for 32 x 512 calibration tokens
        for _ in range(600):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")
    return {"path/to/hf-folder": folder, "path/to/model.gguf": str(tmp_path / "tiny.gguf"),
            "shakespeare": str(corpus)}


def run_shell(body: str, subs: dict[str, str]) -> None:
    from hylorada.cli import main

    for line in body.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        argv = [subs.get(a, a) for a in shlex.split(line, comments=True)]
        assert argv[0] == "hylorada", line
        assert main(argv[1:]) == 0, line


def test_the_marked_blocks_exist():
    assert set(readme_blocks()) >= {"own_model", "load_and_serve", "adapt_and_export"}


def test_use_your_own_model_and_load_and_serve(workspace, capsys):
    blocks = readme_blocks()
    lang, body = blocks["own_model"]
    assert lang == "bash"
    run_shell(body, workspace)
    assert (Path("runs/mine-80") / "compress.json").is_file()
    cached = list((Path(workspace["path/to/model.gguf"]).parent / "cache" / "models").glob("gguf-*"))
    assert len(cached) == 1  # the GGUF was converted into the cache, once
    lang, body = blocks["load_and_serve"]
    assert lang == "python"
    capsys.readouterr()
    exec(compile(body, "README.md:load_and_serve", "exec"), {})
    printed = capsys.readouterr().out
    # the same text as model.generate on the compressed model loaded in bfloat16 (reference)
    from hylorada import load_model
    from hylorada.compress.factorized import FactorizedLinear

    model, tok = load_model("runs/mine-80", dtype="bfloat16")
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert next(model.parameters()).dtype == torch.bfloat16
    enc = tok.apply_chat_template([{"role": "user", "content": "Once upon a time"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True) if tok.chat_template else \
        tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=40,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert printed == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"


def test_adapt_and_export(workspace):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lang, body = readme_blocks()["adapt_and_export"]
    assert lang == "bash"
    run_shell(body, workspace)
    x = torch.tensor([[3, 4, 5, 6, 7]])
    merged = AutoModelForCausalLM.from_pretrained("runs/ft/merged").eval()
    base = AutoModelForCausalLM.from_pretrained(workspace["path/to/hf-folder"]).eval()
    peft_model = PeftModel.from_pretrained(base, "runs/ft/peft").eval()
    with torch.no_grad():
        a, b = merged(input_ids=x).logits, peft_model(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(workspace["path/to/hf-folder"])(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-4)
