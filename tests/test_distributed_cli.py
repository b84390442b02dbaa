"""`hylorada finetune` under two processes (CPU, gloo), launched as a user launches it:

    accelerate launch --multi_gpu --num_processes 2 -m hylorada.cli finetune ...
    torchrun --standalone --nproc_per_node 2 -m hylorada.cli finetune ...

against the same command in one process (same global batch 3 x 2, same seed, dropout 0: each
process draws its own dropout masks, so only a dropout-free run can match exactly). Checked:
the per-step losses of finetune.json and train_log.jsonl agree within 1e-5 relative, the saved
adapters loaded onto a fresh base give the same perplexity, computed by hand as
exp(mean cross-entropy) over non-overlapping windows (tests/test_cli_e2e.py), and only the main
process writes (the same files as the one-process run, each log line once, one "adapter saved").
`accelerate launch --cpu --num_processes 2` is not tested: accelerate 1.x starts ONE process for
it (its simple launcher); --multi_gpu on a machine without CUDA gives two CPU processes (gloo).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_assets
from test_cli_e2e import ppl_by_hand

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent
STEPS = 4
ARGS = ["finetune", "--method", "hylorada", "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "5e-3",
        "--steps", str(STEPS), "--batch-size", "3", "--grad-accum", "2", "--seq-len", "16",
        "--eval-seq-len", "32", "--max-eval-tokens", "96", "--eval-every", "2", "--save-every", "2",
        "--log-every", "1", "--mixed-precision", "no", "--seed", "3", "--no-progress"]
LAUNCHERS = {
    "accelerate": [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                   "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "one": [sys.executable],
}


def run_cli(launcher: str, root: Path, out: Path) -> str:
    model_dir, corpus = root / "tiny-model", root / "tiny.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HYLORADA_CACHE=str(root / "cache"),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = LAUNCHERS[launcher] + ["-m", "hylorada.cli", *ARGS, "--model", str(model_dir), "--data", str(corpus),
                                 "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter_ppl(root: Path, adapter_dir: Path) -> float:
    """Perplexity of the test split's first 96 tokens with the saved adapter on a fresh base."""
    from hylorada import HyLoRADAModel
    from hylorada import data
    from transformers import AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(root / "tiny-model").eval()
    model = HyLoRADAModel.from_pretrained(base, adapter_dir).eval()
    ids = data.eval_split(AutoTokenizer.from_pretrained(root / "tiny-model"), str(root / "tiny.jsonl"), "test")[1]
    return ppl_by_hand(model, ids[:, :96], 32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model folder, the corpus, and the one-process run (its folder, finetune.json)."""
    root = tmp_path_factory.mktemp("dist_cli")
    make_tiny_assets(root)
    run_cli("one", root, root / "one")
    return root, json.loads((root / "one" / "finetune.json").read_text())


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_process_finetune_equals_one_process(reference, launcher):
    root, one = reference
    out = root / launcher
    shutil.rmtree(out, ignore_errors=True)
    before = set(os.listdir(root))
    printed = run_cli(launcher, root, out)
    two = json.loads((out / "finetune.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(two["train"]["losses"]) == STEPS
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-5)
    assert [v["loss"] for v in two["train"]["valid_losses"]] == pytest.approx(
        [v["loss"] for v in one["train"]["valid_losses"]], rel=1e-5)
    # train_log.jsonl: every step once (rank 1 writes nothing), the same losses
    rec_one, rec_two = log_records(root / "one"), log_records(out)
    assert [(r["step"], sorted(r)) for r in rec_two] == [(r["step"], sorted(r)) for r in rec_one]
    assert [r.get("loss", r.get("valid_loss")) for r in rec_two] == pytest.approx(
        [r.get("loss", r.get("valid_loss")) for r in rec_one], rel=1e-5)
    # only the main process writes: the same files, nothing beside --out, one message
    assert files_under(out) == files_under(root / "one")
    assert set(os.listdir(root)) - before == {launcher}
    assert printed.count("adapter saved to") == 1 and printed.count("log: ") == 1
    # the saved adapters: the same tensors, the same perplexity by hand, = the printed one
    a1 = load_file(str(root / "one" / "adapter" / "hylorada_adapter.safetensors"))
    a2 = load_file(str(out / "adapter" / "hylorada_adapter.safetensors"))
    assert a1.keys() == a2.keys()
    # Adam divides by sqrt(v): rounding in the two-way gradient sum moves near-zero-gradient
    # entries by up to ~1e-4 over 4 steps of lr 5e-3 (tests/test_train.py's bound too)
    assert max(float((a1[k] - a2[k]).abs().max()) for k in a1) < 1e-4
    ppl_one, ppl_two = adapter_ppl(root, root / "one" / "adapter"), adapter_ppl(root, out / "adapter")
    assert ppl_two == pytest.approx(ppl_one, rel=1e-5)
    assert ppl_two == pytest.approx(two["ppl_after"]["test"]["ppl"], rel=1e-5)
    assert abs(ppl_two - one["ppl_before"]["test"]["ppl"]) > 1e-4  # training changed the model
    assert torch.isfinite(torch.tensor(two["train"]["losses"])).all()


def test_dist_speed_smoke_one_and_two_processes(tmp_path):
    """benchmarks/dist_speed.py --smoke on CPU: its loss curve under 2 gloo processes equals the
    one-process curve (fp32, same global batch), and --compare reads both files."""
    script = HERE.parent / "benchmarks" / "dist_speed.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    flags = ["--shape", "tiny", "--device", "cpu", "--smoke", "--precision", "no"]
    for n in (1, 2):
        cmd = LAUNCHERS["torchrun"][:-1] + [str(n), str(script), *flags, "--out", str(tmp_path / f"{n}.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["curve"]["global_batch"] == two["curve"]["global_batch"] == 4
    assert two["curve"]["losses"] == pytest.approx(one["curve"]["losses"], rel=1e-5)
    assert (one["speed"]["global_batch"], two["speed"]["global_batch"]) == (2, 4)  # --batch is per process
    assert len(two["speed"]["peak_gib_per_process"]) == 2 and two["speed"]["tokens_per_s_median"] > 0
    proc = subprocess.run([sys.executable, str(script), "--compare", str(tmp_path / "1.json"),
                           str(tmp_path / "2.json")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "max relative loss difference" in proc.stdout, proc.stderr[-2000:]
