"""Perplexity, LiM perplexity, size and speed, checked against hand computations."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import FACTORIES, VOCAB, tiny_llama, tiny_qwen2
from hylorada import evaluate
from hylorada.evaluate import lim_perplexity, model_size, perplexity, throughput, windows


# ----------------------------------------------------------------------------- a toy LM
class ToyLM(nn.Module):
    """logits[b, p, v] = table[x_{b,p}, v] + pos[v] * p, p = position within the input.

    A bigram model when `pos` is zero; with `pos` non-zero the loss depends on where a token
    sits in its window, so a wrong window cut changes the result.
    """

    def __init__(self, table, pos=None):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))
        v = self.table.shape[1]
        self.pos = nn.Parameter(torch.tensor(pos if pos is not None else [0.0] * v, dtype=torch.float32))
        self.calls = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(tuple(input_ids.shape))
        p = torch.arange(input_ids.shape[1], dtype=torch.float32)
        return SimpleNamespace(logits=self.table[input_ids] + self.pos * p[:, None])


TABLE = [[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [-2.0, 1.0, 1.5]]
POS = [0.3, -0.2, 0.1]


def hand_nll(table, pos, window):
    """Summed NLL of positions 1..len-1 of one window, in plain Python."""
    total = 0.0
    for p in range(1, len(window)):
        prev = window[p - 1]
        logits = [table[prev][v] + pos[v] * (p - 1) for v in range(len(table[prev]))]
        lse = math.log(sum(math.exp(x) for x in logits))
        total += lse - logits[window[p]]
    return total


SEQ = [0, 0, 0, 0, 2, 0, 2]  # 7 tokens: an easy window, then a hard one


def test_uniform_model_has_perplexity_vocab_size():
    model = ToyLM([[0.0] * 5] * 5)
    ids = torch.tensor([[0, 3, 1, 4, 2, 2, 1, 0, 3]])
    r = perplexity(model, ids, seq_len=4)
    assert r.ppl == pytest.approx(5.0, rel=1e-6)
    assert r.n_tokens == 3 + 3 + 0  # windows of 4, 4, 1 tokens: the last has nothing to score


def test_perplexity_matches_hand_computation_uneven_windows():
    model = ToyLM(TABLE, POS)
    ids = torch.tensor([SEQ])
    r = perplexity(model, ids, seq_len=4)  # windows [0:4] (3 scored) and [4:7] (2 scored)
    w1, w2 = hand_nll(TABLE, POS, SEQ[0:4]), hand_nll(TABLE, POS, SEQ[4:7])
    assert r.n_windows == 2 and r.window_tokens == [3, 2] and r.n_tokens == 5
    assert r.window_nll == pytest.approx([w1, w2], rel=1e-6)
    assert r.total_nll == pytest.approx(w1 + w2, rel=1e-6)
    assert r.nll == pytest.approx((w1 + w2) / 5, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp((w1 + w2) / 5), rel=1e-6)
    # the wrong formulas give different numbers on these uneven windows
    mean_of_ppls = (math.exp(w1 / 3) + math.exp(w2 / 2)) / 2
    exp_mean_of_means = math.exp((w1 / 3 + w2 / 2) / 2)
    assert abs(mean_of_ppls - r.ppl) / r.ppl > 0.01
    assert abs(exp_mean_of_means - r.ppl) / r.ppl > 0.01
    # windows are scored separately: position restarts at 0 in every window
    whole = hand_nll(TABLE, POS, SEQ)
    assert abs(whole - (w1 + w2)) > 1e-3


def test_perplexity_batching_and_2d_or_1d_input():
    model = ToyLM(TABLE, POS)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (1, 53), generator=g)
    ref = perplexity(model, ids, seq_len=8, batch_size=1)
    for bs in (2, 3, 16):
        r = perplexity(model, ids, seq_len=8, batch_size=bs)
        assert r.total_nll == pytest.approx(ref.total_nll, rel=1e-6)
        assert r.n_tokens == ref.n_tokens == 6 * 7 + 4  # 6 full windows of 8 and one of 5
    assert perplexity(model, ids[0], seq_len=8).ppl == pytest.approx(ref.ppl, rel=1e-6)
    model.calls.clear()
    perplexity(model, ids, seq_len=8, batch_size=4)
    assert sorted(model.calls) == [(1, 5), (2, 8), (4, 8)]  # equal lengths batched, no padding
    expected = sum(hand_nll(TABLE, POS, ids[0, s:s + 8].tolist()) for s in range(0, 53, 8))
    assert ref.total_nll == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_perplexity_of_tiny_models_matches_reference(name):
    model = FACTORIES[name]()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 70), generator=g)
    L = 16
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 70, L):
            w = ids[:, s:s + L]
            logp = torch.log_softmax(model(input_ids=w).logits.double(), dim=-1)
            tgt = w[0, 1:]
            total -= logp[0, :-1].gather(1, tgt[:, None]).sum().item()
            n += tgt.numel()
    r = perplexity(model, ids, seq_len=L, batch_size=3)
    assert r.n_tokens == n == 4 * 15 + 5
    assert r.ppl == pytest.approx(math.exp(total / n), rel=1e-5)


# ----------------------------------------------------------------------------- stride
@pytest.mark.parametrize("n,L,S", [(50, 8, 3), (50, 8, 7), (64, 16, 4), (17, 16, 15), (5, 8, 2), (100, 10, 1)])
def test_stride_windows_score_every_token_exactly_once(n, L, S):
    """With S < L every token but the first is scored once, with >= L - S tokens of context."""
    scored = []
    for k, (start, end, first) in enumerate(windows(n, L, S)):
        assert end - start <= L and first >= 1
        assert start == k * S and (k == 0 or first == L - S or end == n)
        scored.extend(range(start + first, end))
    assert scored == list(range(1, n))


def test_stride_equal_to_seq_len_is_the_non_overlapping_protocol():
    assert windows(50, 8, 8) == windows(50, 8) == [(s, min(s + 8, 50), 1) for s in range(0, 50, 8)]


def test_stride_mode_on_bigram_model_equals_whole_sequence_loss():
    model = ToyLM(TABLE)  # no position term: each token's loss depends only on its predecessor
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 3, (1, 41), generator=g)
    r = perplexity(model, ids, seq_len=10, stride=4)
    assert r.n_tokens == 40
    assert r.total_nll == pytest.approx(hand_nll(TABLE, [0.0] * 3, ids[0].tolist()), rel=1e-6)
    # stride == seq_len is the non-overlapping protocol
    a, b = perplexity(model, ids, seq_len=10, stride=10), perplexity(model, ids, seq_len=10)
    assert (a.n_tokens, a.total_nll) == (b.n_tokens, pytest.approx(b.total_nll))


def test_stride_mode_matches_hf_guide_loop():
    """The loop of the Hugging Face perplexity guide, with summed (not averaged) losses."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 90), generator=g)
    L, S = 24, 10
    total, n, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], S):
            end = min(begin + L, ids.shape[1])
            trg_len = end - prev_end
            x = ids[:, begin:end]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            out = model(input_ids=x, labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            total += out.loss.item() * k
            n += k
            prev_end = end
            if end == ids.shape[1]:
                break
    r = perplexity(model, ids, seq_len=L, stride=S, batch_size=4)
    assert r.n_tokens == n == 89
    assert r.total_nll == pytest.approx(total, rel=1e-5)


def test_bad_arguments():
    model = ToyLM(TABLE)
    with pytest.raises(ValueError):
        perplexity(model, torch.tensor([[1, 2, 0]]), seq_len=4, stride=5)
    with pytest.raises(ValueError):
        perplexity(model, torch.tensor([[1]]), seq_len=4)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 5, dtype=torch.long), seq_len=4)


# ----------------------------------------------------------------------------- LiM
def test_lim_buckets_by_hand():
    model = ToyLM(TABLE, POS)
    seq = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
    r = lim_perplexity(model, torch.tensor([seq]), seq_len=6, n_buckets=2)
    # window [0:6]: 5 scored tokens, j = 0..4 -> buckets 0,0,0,1,1
    # window [6:10]: 3 scored tokens, j = 0..2 -> buckets 0,0,1
    per_token = []
    for w in (seq[0:6], seq[6:10]):
        per_token.append([hand_nll(TABLE, POS, w[:p + 1]) - hand_nll(TABLE, POS, w[:p]) for p in range(1, len(w))])
    b0 = per_token[0][0:3] + per_token[1][0:2]
    b1 = per_token[0][3:5] + per_token[1][2:3]
    assert r.bucket_tokens == [5, 3]
    assert r.bucket_nll == pytest.approx([sum(b0) / 5, sum(b1) / 3], rel=1e-6)
    assert r.bucket_ppl == pytest.approx([math.exp(sum(b0) / 5), math.exp(sum(b1) / 3)], rel=1e-6)
    assert r.lim_ppl == pytest.approx((math.exp(sum(b0) / 5) + math.exp(sum(b1) / 3)) / 2, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp((sum(b0) + sum(b1)) / 8), rel=1e-6)


@pytest.mark.parametrize("n_buckets", [1, 3, 10])
def test_lim_buckets_partition_scored_tokens(n_buckets):
    model = tiny_qwen2()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 77), generator=g)
    p = perplexity(model, ids, seq_len=20)
    r = lim_perplexity(model, ids, seq_len=20, n_buckets=n_buckets, batch_size=2)
    assert len(r.bucket_tokens) == n_buckets
    assert sum(r.bucket_tokens) == r.n_tokens == p.n_tokens == 3 * 19 + 16
    bucket_total = sum(nll * c for nll, c in zip(r.bucket_nll, r.bucket_tokens))
    assert bucket_total == pytest.approx(p.total_nll, rel=1e-5)
    assert r.ppl == pytest.approx(p.ppl, rel=1e-5)
    # 19 scored tokens per full window; bucket b takes j with floor(n_b * j / 19) == b
    full = [sum(1 for j in range(19) if n_buckets * j // 19 == b) for b in range(n_buckets)]
    last = [sum(1 for j in range(16) if n_buckets * j // 16 == b) for b in range(n_buckets)]
    assert r.bucket_tokens == [3 * f + s for f, s in zip(full, last)]


# ----------------------------------------------------------------------------- size
def _naive_param_count(model):
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_size_counts_tied_embeddings_once():
    model = tiny_qwen2()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    r = model_size(model)
    emb = model.get_input_embeddings().weight.numel()
    assert r.n_params == _naive_param_count(model) - emb
    assert r.n_shared == 1
    assert r.n_param_bytes == 4 * r.n_params

    untied = tiny_llama()
    r2 = model_size(untied)
    assert r2.n_params == _naive_param_count(untied) and r2.n_shared == 0


def test_size_counts_persistent_buffers_only():
    model = tiny_llama()
    base = model_size(model)
    model.register_buffer("calibration", torch.zeros(7, dtype=torch.float64))  # 56 bytes, saved
    model.register_buffer("scratch", torch.zeros(100), persistent=False)  # not saved
    r = model_size(model)
    assert r.n_buffers == base.n_buffers + 7
    assert r.n_buffers_bytes == base.n_buffers_bytes + 56
    assert r.n_bytes == base.n_bytes + 56
    assert r.n_params == base.n_params
    assert r.n_nonpersistent_bytes == base.n_nonpersistent_bytes + 400
    assert r.bytes_by_dtype["float64"] == 56


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_size_equals_what_save_pretrained_writes(name, tmp_path):
    from safetensors import safe_open

    model = FACTORIES[name]()
    model.save_pretrained(tmp_path)
    saved = 0
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            saved += t.numel() * t.element_size()
    assert model_size(model).n_bytes == saved


def test_size_mixed_dtypes():
    model = tiny_llama().to(torch.bfloat16)
    r = model_size(model)
    assert r.n_bytes == 2 * r.n_params and set(r.bytes_by_dtype) == {"bfloat16"}


# ----------------------------------------------------------------------------- speed, json
def test_throughput_and_json():
    model = tiny_llama()
    model.train()
    t = throughput(model, seq_len=16, batch_size=2, n_batches=2, warmup=1)
    assert t.n_tokens == 64 and t.tokens_per_s > 0 and t.seconds > 0
    assert model.training  # the mode is restored
    ids = torch.randint(0, VOCAB, (1, 40))
    results = [t, perplexity(model, ids, 16), lim_perplexity(model, ids, 16, n_buckets=20), model_size(model)]
    for res in results:
        d = res.to_dict()
        json.loads(json.dumps(d, allow_nan=False))
    # 20 buckets but only 15 scored tokens per window: empty buckets become null, not NaN
    lim = results[2].to_dict()
    assert None in lim["bucket_ppl"] and math.isfinite(lim["lim_ppl"])


def test_scoring_uses_eval_mode():
    model = tiny_llama(attention_dropout=0.5)
    model.train()
    ids = torch.randint(0, VOCAB, (1, 40))
    a, b = perplexity(model, ids, 16), perplexity(model, ids, 16)
    assert a.total_nll == b.total_nll and model.training


# ----------------------------------------------------------------------------- CLI
def _char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def test_cli_eval_on_local_model_and_text(tmp_path, monkeypatch, capsys):
    from hylorada import cli, data

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model = tiny_llama()
    model.save_pretrained(model_dir)
    tok = _char_tokenizer()
    tok.save_pretrained(model_dir)
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("In the beginning was the word.\nAnd the word was with God.\n")
    (text / "b.txt").write_text("To be, or not to be: that is the question.")
    out = tmp_path / "out.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                   "--lim", "--n-buckets", "4", "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "LiM perplexity" in printed
    res = json.loads(out.read_text())
    ids = data.eval_ids(tok, data.load_corpus(text, "all"))
    ref = perplexity(model, ids, 16)
    assert res["perplexity"]["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
    assert res["perplexity"]["n_tokens"] == ref.n_tokens
    assert sum(res["lim"]["bucket_tokens"]) == ref.n_tokens
    assert res["size"]["n_params"] == model_size(model).n_params
    assert res["data"]["tokens_total"] == ids.shape[1]

    rc = cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                   "--stride", "8", "--max-tokens", "50", "--json", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["perplexity"]["n_tokens"] == 49 and res["perplexity"]["stride"] == 8


def test_results_are_dataclasses_with_to_dict():
    import dataclasses

    for cls in (evaluate.PerplexityResult, evaluate.LimResult, evaluate.SizeResult, evaluate.ThroughputResult):
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "to_dict")


# ----------------------------------------------------------------------------- BOS window prefix
BOS_ID = 1


def _text_ids(n: int, seed: int) -> torch.Tensor:
    """n text token ids that are never the BOS (the corpus a BOS tokenizer gives: [BOS] + these)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


def hand_bos_loop(model, text: list[int], L: int, stride: int | None = None) -> tuple[float, int]:
    """Summed NLL and scored count, windows built here: [BOS] + text[b : b + L - 1] for b = 0,
    S, 2S, ... (S = L - 1 without stride); each window scores the tokens past the previous
    window's end, the first from the BOS alone; labels masked as in the HF perplexity guide."""
    S = stride or L - 1
    total, n, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(text), S):
            end = min(begin + L - 1, len(text))
            x = torch.tensor([[BOS_ID] + text[begin:end]])
            labels = x.clone()
            labels[0, :x.shape[1] - (end - prev_end)] = -100  # BOS and already-scored tokens
            logp = torch.log_softmax(model(input_ids=x).logits.double(), dim=-1)[0, :-1]
            tgt = labels[0, 1:]
            keep = tgt != -100
            total -= logp[keep].gather(1, tgt[keep][:, None]).sum().item()
            n += int(keep.sum())
            prev_end = end
            if end == len(text):
                break
    return total, n


@pytest.mark.parametrize("n,L,S", [(50, 8, 3), (50, 8, 7), (64, 16, 4), (17, 16, 15), (5, 8, 2), (100, 10, 1),
                                   (50, 8, None), (14, 8, None), (1, 2, None)])
def test_bos_windows_score_every_text_token_exactly_once(n, L, S):
    """With BOS: spans of <= L - 1 text tokens; every text token (the first included) scored once."""
    scored = []
    for k, (start, end, first) in enumerate(windows(n, L, S, bos=True)):
        assert 1 + end - start <= L and first >= 0
        assert start == k * (S or L - 1)
        if k == 0 or S is None:
            assert first == 0
        else:
            assert first == L - 1 - S or end == n
        scored.extend(range(start + first, end))
    assert scored == list(range(n))
    with pytest.raises(ValueError, match="stride"):
        windows(n, L, L, bos=True)  # the span is L - 1: a stride of L would skip tokens


@pytest.mark.parametrize("L,S", [(16, None), (16, 5), (16, 15), (9, 1)])
def test_bos_perplexity_matches_hand_loop(L, S):
    model = tiny_llama()
    text = _text_ids(70, seed=5)
    ids = torch.cat([torch.tensor([BOS_ID]), text])[None]  # as eval_ids gives it: [BOS] + text
    total, n = hand_bos_loop(model, text.tolist(), L, S)
    r = perplexity(model, ids, seq_len=L, stride=S, batch_size=3, bos_id=BOS_ID)
    assert r.n_tokens == n == 70 and r.window_prefix == "bos"
    if S is None:
        assert r.n_windows == -(-70 // (L - 1))
    assert r.total_nll == pytest.approx(total, rel=1e-5)
    # the same text without the tokenizer's leading BOS gives the same windows
    r2 = perplexity(model, text, seq_len=L, stride=S, batch_size=5, bos_id=BOS_ID)
    assert (r2.n_tokens, r2.total_nll) == (r.n_tokens, pytest.approx(r.total_nll, rel=1e-6))
    # and without a prefix it is the old protocol, a different number (Llama-style BOS matters)
    old = perplexity(model, ids, seq_len=L, stride=S)
    assert old.window_prefix == "none" and old.total_nll != pytest.approx(r.total_nll, rel=1e-6)


@pytest.mark.parametrize("n_buckets", [1, 3, 10])
def test_bos_lim_buckets_partition_the_text_tokens(n_buckets):
    model = tiny_qwen2()
    text = _text_ids(77, seed=6)
    ids = torch.cat([torch.tensor([BOS_ID]), text])[None]
    L = 20
    total, n = hand_bos_loop(model, text.tolist(), L)
    r = lim_perplexity(model, ids, seq_len=L, n_buckets=n_buckets, batch_size=2, bos_id=BOS_ID)
    assert sum(r.bucket_tokens) == r.n_tokens == n == 77 and r.window_prefix == "bos"
    bucket_total = sum(nll * c for nll, c in zip(r.bucket_nll, r.bucket_tokens))
    assert bucket_total == pytest.approx(total, rel=1e-5)
    # 19 scored (text) tokens per full window (4 of them), 1 in the last; j -> floor(n_b * j / m)
    full = [sum(1 for j in range(19) if n_buckets * j // 19 == b) for b in range(n_buckets)]
    assert r.bucket_tokens == [4 * f + (b == 0) for b, f in enumerate(full)]


def _save_tiny_with(tok, tmp_path):
    model_dir = tmp_path / "model"
    model = tiny_llama()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("In the beginning was the word.\nAnd the word was with God.\n")
    (text / "b.txt").write_text("To be, or not to be: that is the question.")
    return model, model_dir, text


def test_cli_eval_with_a_bos_tokenizer_starts_every_window_with_bos(tmp_path, monkeypatch):
    from hylorada import cli, data
    from test_data import char_tokenizer

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    tok = char_tokenizer(bos=True)
    model, model_dir, text = _save_tiny_with(tok, tmp_path)
    joined = "\n\n".join(data.load_corpus(text, "all"))
    plain_text = tok(joined, add_special_tokens=False).input_ids
    out = tmp_path / "out.json"
    for extra, hand in [([], hand_bos_loop(model, plain_text, 16)),
                        (["--stride", "6"], hand_bos_loop(model, plain_text, 16, 6))]:
        rc = cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                       "--lim", "--n-buckets", "4", "--json", str(out), "--no-progress", *extra])
        assert rc == 0
        res = json.loads(out.read_text())
        assert res["window_prefix"] == "bos" and res["perplexity"]["window_prefix"] == "bos"
        assert res["perplexity"]["n_tokens"] == hand[1] == len(plain_text)
        assert res["perplexity"]["total_nll"] == pytest.approx(hand[0], rel=1e-5)
        assert sum(res["lim"]["bucket_tokens"]) == len(plain_text) and res["lim"]["window_prefix"] == "bos"
    # --window-prefix none: the protocol without a prefix (the tokenizer's BOS only before window 0)
    rc = cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                   "--window-prefix", "none", "--json", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    ref = perplexity(model, data.eval_ids(tok, data.load_corpus(text, "all")), 16)
    assert rc == 0 and res["window_prefix"] == "none"
    assert res["perplexity"]["total_nll"] == pytest.approx(ref.total_nll, rel=1e-5)
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                     "--stride", "16", "--no-progress"]) == 2  # the span is 15 with a BOS


def test_cli_eval_without_bos_is_unchanged(tmp_path, monkeypatch):
    """A tokenizer that adds no BOS (SmolLM2's kind): auto resolves to none, the old numbers."""
    from hylorada import cli, data
    from test_data import char_tokenizer

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    tok = char_tokenizer(bos=False)
    model, model_dir, text = _save_tiny_with(tok, tmp_path)
    out = tmp_path / "out.json"
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(text), "--split", "all", "--seq-len", "16",
                     "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    ids = data.eval_ids(tok, data.load_corpus(text, "all"))
    n = ids.shape[1]
    total = 0.0
    with torch.no_grad():  # the old protocol, by hand: windows of 16, position 0 unscored
        for s in range(0, n, 16):
            w = ids[:, s:s + 16]
            logp = torch.log_softmax(model(input_ids=w).logits.double(), dim=-1)
            total -= logp[0, :-1].gather(1, w[0, 1:, None]).sum().item()
    assert res["window_prefix"] == "none"
    assert res["perplexity"]["n_tokens"] == n - -(-n // 16)
    assert res["perplexity"]["total_nll"] == pytest.approx(total, rel=1e-5)


def test_benchmark_cells_use_and_record_the_window_prefix(tmp_path, monkeypatch):
    from hylorada import data
    from hylorada.recipes.benchmark import CellRunner, make_config, plan_cells
    from test_data import char_tokenizer

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    tok = char_tokenizer(bos=True)
    model, model_dir, _ = _save_tiny_with(tok, tmp_path)
    text = tmp_path / "corpus.jsonl"  # enough documents for train/valid/test splits
    text.write_text("".join(json.dumps({"text": f"Verse {i}: and the word was with God."}) + "\n" for i in range(20)))
    cfg = make_config("cpu-quick", model=str(model_dir), data=str(text), eval_seq_len=16, eval_max_tokens=None)
    runner = CellRunner(cfg, progress=False)
    spec = {"data": str(text), "eval_max_tokens": None, "eval_seq_len": 16, "lim_buckets": 2}
    got = runner.evaluate(model, spec)
    ids = data.eval_ids(tok, data.load_corpus(text, "test"))
    total, n = hand_bos_loop(model, ids[0, 1:].tolist(), 16)
    assert got["window_prefix"] == "bos" and got["test_tokens"] == n == ids.shape[1] - 1
    assert got["test_ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert (runner.train_blocks(str(text), 8)["input_ids"][:, 0] == 1).all()
    # "auto" leaves the cell keys of earlier runs alone; an explicit choice is part of the key
    budget = {"rows": {}}
    base = [c for c in plan_cells(cfg, budget, []) if c.id == "base"][0]
    assert "window_prefix" not in base.spec
    forced = make_config("cpu-quick", model=str(model_dir), data=str(text), eval_seq_len=16, eval_max_tokens=None,
                         window_prefix="none")
    assert [c for c in plan_cells(forced, budget, []) if c.id == "base"][0].key != base.key
    assert CellRunner(forced, progress=False).evaluate(model, spec)["window_prefix"] == "none"
    with pytest.raises(ValueError, match="window_prefix"):
        make_config("cpu-quick", window_prefix="start")


def test_finetune_and_compress_use_and_record_the_window_prefix(tmp_path, monkeypatch, one_thread):
    import random

    from hylorada import cli
    from test_data import char_tokenizer

    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    tok = char_tokenizer(bos=True)
    _, model_dir, _ = _save_tiny_with(tok, tmp_path)
    rng = random.Random(0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(["abc", "de", "fgh"]) for _ in range(40))})
                              + "\n" for _ in range(30)))
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(corpus), "--steps", "1", "--seq-len", "16",
                     "--batch-size", "2", "--eval-seq-len", "16", "--max-eval-tokens", "100", "--out", str(ft),
                     "--no-progress"]) == 0
    log = json.loads((ft / "finetune.json").read_text())
    assert log["window_prefix"] == "bos"
    assert log["ppl_before"]["test"]["n_tokens"] == 99  # 100 ids = the corpus BOS + 99 text tokens, all scored
    cp = tmp_path / "cp"
    assert cli.main(["compress", "--model", str(model_dir), "--method", "whiten", "--calib", str(corpus),
                     "--calib-blocks", "4", "--calib-seq-len", "16", "--eval", str(corpus), "--eval-seq-len", "16",
                     "--max-eval-tokens", "100", "--out", str(cp), "--no-progress", "--window-prefix", "none"]) == 0
    res = json.loads((cp / "results.json").read_text())
    assert res["window_prefix"] == "none"
    assert all(v["window_prefix"] == "none" and v["n_tokens"] == 100 - -(-100 // 16)
               for stage in res["perplexity"].values() for v in stage.values())
