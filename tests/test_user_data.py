"""A user's own data: one .txt, datasets files (.csv/.parquet/.jsonl), chat rows with
assistant-only loss, split files, dropped empty documents, and the README section "Use your own
data" (its commands run here on a tiny model). All offline; tiny models built in code."""
from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path

import pytest
import torch

from hylorada import data
from hylorada.cli import main
from hylorada.data import DataSpec, assign_contiguous, load_corpus, split_user_documents
from hylorada.errors import UsageError

from conftest import WORDS, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
VOCAB = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)},
         "user": 103, "assistant": 104, "system": 105, ":": 106}
EOS = 2


def make_chat_model(root: Path) -> tuple[str, object, torch.nn.Module]:
    """A tiny Llama + WordLevel tokenizer (words, roles, ':' and </s>) with a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    folder = root / "tiny-chat-model"
    model = tiny_llama()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder), fast, model


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[10:40]) for _ in range(n))  # all of 3 characters


def write_notes(path: Path, n_paragraphs: int = 40, seed: int = 0) -> list[str]:
    """A .txt of paragraphs (three lines of words each) separated by blank lines."""
    rng = random.Random(seed)
    paras = ["\n".join(words(rng, 8) for _ in range(3)) for _ in range(n_paragraphs)]
    path.write_text("\n\n".join(paras) + "\n")
    return paras


def usage_error(argv: list[str], capsys) -> str:
    """The one-line usage error of a command (raised, or printed with exit code 2 by cli.main)."""
    try:
        rc = main(argv)
    except UsageError as e:
        return str(e)
    assert rc == 2
    return capsys.readouterr().err


@pytest.fixture
def chat_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data.user._USER_CACHE.clear()
    return make_chat_model(tmp_path)


# ----------------------------------------------------------------------------- the split rule
def test_assign_contiguous_by_hand():
    t, v, s = "train", "valid", "test"
    # 5% of 200 characters = 10: test is the last unit, valid the one before, train the rest
    assert assign_contiguous([10] * 20) == [t] * 18 + [v, s]
    # test takes final units until it holds >= 5% (5.3 of 106 characters): six units of 1
    assert assign_contiguous([100] + [1] * 6) == [v] + [s] * 6
    assert assign_contiguous([50, 30, 10, 5, 5]) == [t, t, t, v, s]
    assert assign_contiguous([1, 1, 1, 1, 96]) == [v, v, v, v, s]  # valid needs 5 characters: all four


def test_one_txt_is_split_by_paragraphs_then_lines(tmp_path):
    paras = [f"p{i} " + "x" * 6 for i in range(20)]  # 20 paragraphs of 9 characters
    f = tmp_path / "a.txt"
    f.write_text("\n\n\n".join(paras) + "\n")  # two blank lines between paragraphs
    assert load_corpus(f, "train") == ["\n\n".join(paras[:18])]
    assert load_corpus(f, "valid") == [paras[18]] and load_corpus(f, "test") == [paras[19]]
    assert load_corpus(f, "all") == [f.read_text()]
    lines = tmp_path / "b.txt"  # no blank line: lines are the units
    lines.write_text("\n".join(paras))
    assert load_corpus(lines, "train") == ["\n".join(paras[:18])]
    assert load_corpus(lines, "test") == [paras[19]]
    # documents when the documents rule gives every split one (three equal ones: all train)
    docs = [data.Document(f"d{i}", "\n\n".join(paras[:2])) for i in range(3)]
    split, level = split_user_documents(docs)
    assert level == "paragraphs" and [d.text for d in split["test"]] == [paras[1]]
    assert [d.text for d in split["valid"]] == [paras[0]]
    assert [d.text for d in split["train"]] == ["\n\n".join(paras[:2])] * 2
    many = [data.Document(f"d{i}", "y" * 10) for i in range(20)]
    split, level = split_user_documents(many)
    assert level == "documents" and [d.name for d in split["test"]] == ["d6", "d16"]  # as before this rule


def test_split_files_and_errors(tmp_path, capsys):
    for name in ("tr", "va", "te"):
        (tmp_path / f"{name}.txt").write_text(f"{name} text\n")
    spec = DataSpec(train=str(tmp_path / "tr.txt"), valid=str(tmp_path / "va.txt"), test=str(tmp_path / "te.txt"))
    assert [load_corpus(spec, s) for s in data.SPLITS] == [["tr text\n"], ["va text\n"], ["te text\n"]]
    with pytest.raises(UsageError, match=r"no valid data: give --valid FILE"):
        load_corpus(DataSpec(train=str(tmp_path / "tr.txt")), "valid")
    with pytest.raises(UsageError, match=r"--split 'dev' is invalid: allowed train, valid, test, all"):
        load_corpus("kjv", "dev")
    with pytest.raises(UsageError, match="too few to split into train/valid/test"):
        load_corpus(tmp_path / "tr.txt", "test")
    with pytest.raises(UsageError, match="no such file"):
        load_corpus(tmp_path / "missing.csv", "test")


def test_hub_name_offline_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pytest.importorskip("datasets")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as e:
        load_corpus("nobody-here/no-such-dataset", "test")
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert "\n" not in msg and "Hugging Face dataset" in msg and "offline" in msg


# ----------------------------------------------------------------------------- datasets files
def _rows(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [words(rng, 12) for _ in range(n)]


def test_csv_parquet_jsonl_through_datasets(tmp_path, monkeypatch, capsys):
    pd = pytest.importorskip("pandas")
    monkeypatch.setenv("HYLORADA_CACHE", str(tmp_path / "cache"))
    rows = _rows(20)
    csv, parquet, jsonl = tmp_path / "r.csv", tmp_path / "r.parquet", tmp_path / "r.jsonl"
    pd.DataFrame({"id": range(20), "body": rows}).to_csv(csv, index=False)
    pd.DataFrame({"text": rows, "n": range(20)}).to_parquet(parquet)
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    for path, field in ((csv, "body"), (parquet, None), (jsonl, None)):
        spec = DataSpec(source=str(path), text_field=field)
        assert load_corpus(spec, "all") == rows
        # enough rows: the named corpora's rule by documents, which for equal sizes repeats every
        # 10 (tests/test_data.py, by hand): valid 3, 13; test 6, 16
        assert load_corpus(spec, "train") == [r for i, r in enumerate(rows) if i not in (3, 6, 13, 16)]
        assert (load_corpus(spec, "valid"), load_corpus(spec, "test")) == ([rows[3], rows[13]], [rows[6], rows[16]])
    with pytest.raises(UsageError, match=r"--text-field 'text': r.csv has no such column; its columns: id, body"):
        load_corpus(csv, "test")
    with pytest.raises(UsageError, match=r"--text-field 'n': row 1 of r.parquet is a int"):
        load_corpus(DataSpec(source=str(parquet), text_field="n"), "test")


def test_eval_cli_on_a_csv_column_scores_the_test_rows(tiny_assets, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hylorada.evaluate import perplexity

    model_dir, _ = tiny_assets
    rows = _rows(20, seed=2)
    csv = tmp_path / "reviews.csv"
    pd.DataFrame({"stars": [5] * 20, "body": rows}).to_csv(csv, index=False)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", model_dir, "--data", str(csv), "--text-field", "body", "--seq-len", "8",
                 "--json", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())["perplexity"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref_ids = torch.tensor([tok(rows[6] + "\n\n" + rows[16])["input_ids"]])  # the test rows: 24 words
    ref = perplexity(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ref_ids, 8)
    assert got["n_tokens"] == ref.n_tokens == 24 - 3 and got["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
    err = usage_error(["eval", "--model", model_dir, "--data", str(csv), "--text-field", "review"], capsys)
    assert "--text-field 'review'" in err and "its columns: stars, body" in err


def test_empty_documents_are_dropped_and_counted(tiny_assets, tmp_path, caplog):
    rows = _rows(20, seed=3)
    with_empty = rows[:5] + ["", "   \n\t"] + rows[5:] + ["\n"]
    f = tmp_path / "e.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in with_empty))
    data.user._USER_CACHE.clear()
    with caplog.at_level(logging.WARNING, logger="hylorada.data"):
        assert load_corpus(f, "all") == rows
    assert "dropped 3 empty or whitespace-only document(s) of 23" in caplog.text
    assert load_corpus(f, "test") == [rows[6], rows[16]]  # the rule runs on the 20 kept rows
    # too few tokens for one window: refused with the count and the minimum
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets[0])
    one = tmp_path / "one.txt"
    one.write_text("w1\n" * 19 + "w4\n")  # split by lines: the test split is "w4" alone
    with pytest.raises(UsageError, match=r"\(test\): 1 token\(s\), too few for one window \(at least 2 needed\)"):
        data.eval_split(tok, str(one), "test")


# ----------------------------------------------------------------------------- chat
CONVERSATIONS = [
    [("user", "w1 w2"), ("assistant", "w3 w4 w5")],
    [("system", "w9"), ("user", "w6"), ("assistant", "w7"), ("user", "w8 w8"), ("assistant", "w10 w11")],
    [("user", "w12 w13 w14"), ("assistant", "w15")],
]


def expected_chat(conv, loss_on="assistant"):
    """By hand: each message is `role : content </s>`; targets are an assistant message's
    content words and its </s> (the role and ':' are the header, never a target)."""
    ids, labels = [], []
    for role, content in conv:
        body = [VOCAB[w] for w in content.split()] + [EOS]
        ids += [VOCAB[role], VOCAB[":"]] + body
        target = loss_on == "all" or role == "assistant"
        labels += ([VOCAB[role], VOCAB[":"]] if loss_on == "all" else [-100, -100]) + \
            (body if target else [-100] * len(body))
    return ids, labels


def _msgs(conv):
    return [{"role": r, "content": c} for r, c in conv]


def test_chat_tokens_mask_exactly_the_non_assistant_positions(chat_assets):
    _, tok, _ = chat_assets
    for conv in CONVERSATIONS:
        for loss_on in ("assistant", "all"):
            assert data.chat_tokens(tok, _msgs(conv), loss_on) == expected_chat(conv, loss_on)
    ids, labels = data.chat_tokens(tok, _msgs(CONVERSATIONS[1]))
    # positions by hand: system : w9 </s> user : w6 </s> assistant : w7 </s> user : w8 w8 </s> assistant : w10 w11 </s>
    assert [i for i, x in enumerate(labels) if x != -100] == [10, 11, 19, 20, 21]
    # a template that rewrites earlier turns cannot be split into turns: refused, not guessed
    tok2 = type(tok).from_pretrained(chat_assets[0])
    tok2.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ messages|length }} {% endfor %}"
    with pytest.raises(UsageError, match="use --loss-on all"):
        data.chat_tokens(tok2, _msgs(CONVERSATIONS[0]))


def test_chat_blocks_keep_conversations_whole_with_their_labels(chat_assets):
    _, tok, _ = chat_assets
    seqs = [expected_chat(c) for c in CONVERSATIONS]
    assert [len(i) for i, _ in seqs] == [11, 22, 10]
    blocks = data.pack_conversations(seqs, 12, pad_id=1)
    # span 12: [c0 (11)] | c1 does not fit next to c0, is cut: [c1[:12]] [c1[12:] (10)] | c2 (10) does not fit: [c2]
    rows = [seqs[0], (seqs[1][0][:12], seqs[1][1][:12]), (seqs[1][0][12:], seqs[1][1][12:]), seqs[2]]
    assert blocks["input_ids"].shape == (4, 12)
    for r, (ids, labels) in enumerate(rows):
        n = len(ids)
        assert blocks["input_ids"][r].tolist() == ids + [1] * (12 - n)
        assert blocks["labels"][r].tolist() == labels + [-100] * (12 - n)
        assert blocks["attention_mask"][r].tolist() == [1] * n + [0] * (12 - n)
    with_bos = data.pack_conversations(seqs[:1], 14, pad_id=1, bos_id=105)
    assert with_bos["input_ids"][0].tolist() == [105] + seqs[0][0] + [1] * 2
    assert with_bos["labels"][0].tolist() == [-100] + seqs[0][1] + [-100] * 2


def write_chats(path: Path, n: int = 24) -> list[list[tuple[str, str]]]:
    convs = [CONVERSATIONS[i % 3] for i in range(n)]
    path.write_text("".join(json.dumps({"messages": _msgs(c)}) + "\n" for c in convs))
    return convs


def test_chat_jsonl_training_blocks_and_finetune_cli(chat_assets, tmp_path):
    model_dir, tok, _ = chat_assets
    convs = write_chats(tmp_path / "chats.jsonl")
    spec = DataSpec(source=str(tmp_path / "chats.jsonl"))
    blocks, info = data.training_blocks(tok, spec, "train", 64, tok.pad_token_id)
    # conversations by the documents rule (assign_splits, tested by hand in tests/test_data.py)
    which = data.assign_splits([len("\n".join(c for _, c in conv)) for conv in convs])
    train = [expected_chat(c) for c, w in zip(convs, which) if w == "train"]
    assert info["chat"] and info["loss_on"] == "assistant" and info["documents"] == len(train) == 18
    got = [(b[m == 1].tolist(), l[m == 1].tolist())
           for b, l, m in zip(blocks["input_ids"], blocks["labels"], blocks["attention_mask"])]
    assert sum((g[0] for g in got), []) == sum((t[0] for t in train), [])
    assert sum((g[1] for g in got), []) == sum((t[1] for t in train), [])
    assert info["targets"] == sum(x != -100 for t in train for x in t[1])
    write_notes(tmp_path / "n.txt")
    with pytest.raises(UsageError, match="--loss-on assistant needs chat data"):
        data.training_blocks(tok, DataSpec(source=str(tmp_path / "n.txt"), loss_on="assistant"), "train", 8, 1)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", model_dir, "--data", str(tmp_path / "chats.jsonl"), "--loss-on", "assistant",
                 "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-seq-len", "16",
                 "--method", "lora", "--out", str(out), "--no-progress"]) == 0
    log = json.loads((out / "finetune.json").read_text())
    assert log["data"]["chat"] and log["data"]["loss_on"] == "assistant"
    assert log["data"]["train_targets"] == info["targets"]


# ----------------------------------------------------------------------------- one .txt everywhere
def test_one_txt_through_finetune_eval_compress_benchmark(tiny_assets, tmp_path, one_thread):
    model_dir, _ = tiny_assets
    notes = tmp_path / "notes.txt"
    write_notes(notes)
    common = ["--model", model_dir, "--no-progress"]
    assert main(["finetune", *common, "--data", str(notes), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--eval-seq-len", "16", "--method", "lora", "--out", str(tmp_path / "ft")]) == 0
    ft = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert ft["ppl_after"]["test"]["n_tokens"] > 0 and ft["data"]["train_tokens"] > 0
    ev = tmp_path / "ev.json"
    assert main(["eval", *common, "--data", str(notes), "--seq-len", "16", "--json", str(ev)]) == 0
    assert json.loads(ev.read_text())["data"]["split"] == "test"
    assert main(["compress", *common, "--method", "whiten", "--ratio", "0.2", "--calib", str(notes),
                 "--calib-blocks", "4", "--calib-seq-len", "16", "--eval", str(notes), "--eval-seq-len", "16",
                 "--recover-steps", "1", "--recover-data", str(notes), "--recover-seq-len", "16",
                 "--recover-batch-size", "2", "--out", str(tmp_path / "c")]) == 0
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    assert str(notes) in res["perplexity"]["compressed"]
    # the presets evaluate 512-token windows: the benchmark's model needs that many positions
    from transformers import AutoTokenizer

    from conftest import tiny_llama

    long_dir = tmp_path / "tiny-1k"
    tiny_llama(max_position_embeddings=1024).save_pretrained(long_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(long_dir)
    common = ["--model", str(long_dir), "--no-progress"]
    assert main(["benchmark", *common, "--data", str(notes), "--only", "base", "adapt-lora-s0", "--steps", "1",
                 "--eval-tokens", "64", "--no-peft", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "results.json").is_file()


# ----------------------------------------------------------------------------- README
def readme_commands() -> list[list[str]]:
    """The `hylorada ...` command lines of README's "Use your own data" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use your own data", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("hylorada ")]
    return [ln.split("#")[0].split()[1:] for ln in lines]


def test_readme_use_your_own_data_commands_run(chat_assets, tmp_path, one_thread):
    pd = pytest.importorskip("pandas")
    model_dir, _, _ = chat_assets
    write_notes(tmp_path / "my_notes.txt")
    pd.DataFrame({"stars": [4] * 20, "review": _rows(20, seed=5)}).to_csv(tmp_path / "reviews.csv", index=False)
    write_chats(tmp_path / "chats.jsonl")
    cmds = readme_commands()
    assert [c[0] for c in cmds] == ["finetune", "eval", "finetune"], cmds
    small = {"finetune": ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-seq-len", "16",
                          "--max-eval-tokens", "64"],
             "eval": ["--seq-len", "16"]}
    for argv in cmds:  # the README's flags, then (argparse: last wins) a tiny model and tiny sizes
        assert main(argv + ["--model", model_dir, "--no-progress", *small[argv[0]]]) == 0, argv
    chat_log = json.loads((tmp_path / re.search(r"--out (\S+)", " ".join(cmds[2]))[1] / "finetune.json").read_text())
    assert chat_log["data"]["chat"] and chat_log["data"]["loss_on"] == "assistant"


# ----------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_smollm2_chat_template_targets_are_the_assistant_turns():
    """On SmolLM2's own template (which adds a default system turn): the target tokens decode to
    exactly each assistant content followed by its end of turn, one run per assistant turn."""
    from transformers import AutoTokenizer

    from hylorada import loading

    tok = AutoTokenizer.from_pretrained(loading.converted_folder("smollm2-135m"))
    answers = ["Fine, thanks. And you?", "Great to hear!"]
    msgs = [{"role": "user", "content": "Hello there, how are you?"}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "Good."}, {"role": "assistant", "content": answers[1]}]
    ids, labels = data.chat_tokens(tok, msgs)
    assert ids == tok(data.render_chat(tok, msgs), add_special_tokens=False)["input_ids"]
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    runs += [tok.decode(cur)] if cur else []
    assert runs == [a + "<|im_end|>\n" for a in answers]


@pytest.mark.slow
def test_smollm2_eval_on_one_txt(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i}. The quick brown fox jumps over the lazy dog, again and again."
                                 for i in range(40)))
    out = tmp_path / "e.json"
    assert main(["eval", "--data", str(notes), "--seq-len", "64", "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    # the test split: one document, the final paragraphs holding 5% of the characters (the last two)
    assert res["data"]["documents"] == 1 and res["perplexity"]["n_tokens"] > 10
    assert 1 < res["perplexity"]["ppl"] < 100
