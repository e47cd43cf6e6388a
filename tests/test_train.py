"""train_sft.py and evaluate.py as a user runs them: subprocesses, 1 or 2 ranks, killed and resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def sft(world, backbone, out, *extra, nproc=1, wait=True):
    launcher = [sys.executable, "train_sft.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29517", "train_sft.py"]
    cmd = launcher + ["--data", world, "--backbone", backbone, "--out", out, "--batch-size", "8",
                      "--log-every", "1", "--warmup", "2", "--gate-queries", "0", *map(str, extra)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def adapters(out):
    tensors = {}
    for part in ("reasoning/reason", "embedding/embed", "embedding/queries"):
        tensors.update({f"{part}:{k}": v for k, v in load_file(os.path.join(out, f"{part}.safetensors")).items()})
    return tensors


def differing(a, b):
    """(adapter weights that differ between two runs, all of them). Adam's first steps move each weight by
    about +-lr whatever the size of its gradient, so a weight whose gradient is zero up to rounding may
    step either way in two runs that compute the same gradient in another order: tests allow a handful."""
    assert a.keys() == b.keys()
    off = sum(int((~torch.isclose(a[k], b[k], rtol=1e-3, atol=1e-5)).sum()) for k in a)
    return off, sum(a[k].numel() for k in a)


def kill_after_first_checkpoint(proc, out):
    """SIGKILL a training subprocess as soon as its first checkpoint exists: a real kill -9, mid-run."""
    deadline = time.time() + 300
    while not (out / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "twn.json").exists(), "the run finished before it could be killed"


def losses(log):
    """(nce0, nce1, cot, grad norm) per logged step."""
    pattern = r"nce0 ([\d.]+) \| nce1 ([\d.]+) \| cot ([\d.]+) \| grad ([\d.]+)"
    return [tuple(map(float, m)) for m in re.findall(pattern, log)]


def test_sft_trains_and_ddp_matches_one_process(small_world, small_backbone, tmp_path):
    one = sft(small_world, small_backbone, tmp_path / "one", "--steps", 3)
    two = sft(small_world, small_backbone, tmp_path / "two", "--steps", 3, nproc=2)
    # the first step's losses and gradient norm come before any update: the global loss of the same
    # 8 pairs, and (gradients summed over ranks) the same gradient; the later ones follow the same updates
    assert len(losses(one)) == len(losses(two)) == 3
    for l1, l2 in zip(losses(one), losses(two)):
        assert l1 == pytest.approx(l2, rel=1e-3)
    # summed cross-rank gradients == the single-process gradient, so the same updates, up to Adam's
    # rounding (`differing`; seen here: one weight of 8,192 in one matrix off by 6e-5)
    off, total = differing(adapters(tmp_path / "one"), adapters(tmp_path / "two"))
    assert off <= 1e-4 * total, f"{off} of {total} adapter weights differ"
    assert "diverged" not in two


def test_gradcache_chunks_give_the_full_batch_update(small_world, small_backbone, tmp_path):
    sft(small_world, small_backbone, tmp_path / "full", "--steps", 2)
    sft(small_world, small_backbone, tmp_path / "chunks", "--steps", 2, "--micro-batch", 3)
    a, b = adapters(tmp_path / "full"), adapters(tmp_path / "chunks")
    # Wrong negatives in the chunks (the bug GradCache exists to avoid) change the gradient everywhere.
    off, total = differing(a, b)
    assert off <= 1e-4 * total, f"{off} of {total} adapter weights differ"


def test_sigkill_then_resume_equals_an_uninterrupted_run(small_world, small_backbone, tmp_path):
    steps = ["--steps", 6, "--ckpt-every", 2]
    sft(small_world, small_backbone, tmp_path / "straight", *steps)
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(sft(small_world, small_backbone, killed, *steps, wait=False), killed)
    log = sft(small_world, small_backbone, killed, *steps)
    assert "resumed at step" in log
    a, b = adapters(tmp_path / "straight"), adapters(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_rerun_with_other_settings_is_refused_not_resumed(small_world, small_backbone, tmp_path):
    out = tmp_path / "run"
    sft(small_world, small_backbone, out, "--steps", 1)
    before = adapters(out)
    sft(small_world, small_backbone, out, "--steps", 1, "--log-every", 5)  # logging only: the same run, done
    run = sft(small_world, small_backbone, out, "--steps", 1, "--seed", 1, wait=False)
    log = run.communicate(timeout=600)[0]
    assert run.returncode != 0 and f"{out} holds a run with other settings (--seed 0 -> 1)" in log
    after = adapters(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def evaluate(*args):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_evaluate_prints_scores_per_mode_and_difficulty(small_world, small_backbone, tmp_path):
    out = tmp_path / "m"
    log = sft(small_world, small_backbone, out, "--steps", 1, "--gate-queries", 40)
    assert "gate: 40 queries" in log and (out / "gate.json").exists()
    run = evaluate("--model", out, "--data", small_world, "--task", "VQA,Ground", "--limit", 6, "--show", 1,
                   "--max-cot-tokens", 8, "--modes", "nothink,think,adaptive", "--sweep")
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "eval" / "results.json").read_text())["tasks"]
    assert set(results) == {"ColorVQA", "ShapeVQA", "WhereVQA", "Ground", "overall"}
    for name, r in results.items():
        s = r["all"]
        assert s["n"] == (6 * 4 if name == "overall" else 6)
        assert all(0 <= s[m] <= 100 for m in ("nothink", "think", "adaptive"))
        assert 0 < s["tokens_think"] <= 8 and s["tokens_adaptive"] <= s["tokens_think"]
        assert 0 <= s["think_rate"] <= 1
    assert set(results["ColorVQA"]["by_difficulty"]) == {"easy", "hard"}
    assert (out / "eval" / "think" / "ColorVQA_score.json").exists()
    assert (out / "eval" / "sweep.csv").read_text().startswith("threshold,think_rate,score")
    assert (out / "eval" / "sweep.png").exists()
    assert "CoT" in run.stdout and "overall" in run.stdout


def test_adaptive_mode_without_a_gate_says_how_to_fit_one(small_world, small_backbone, tmp_path):
    out = tmp_path / "m"
    sft(small_world, small_backbone, out, "--steps", 1)
    run = evaluate("--model", out, "--data", small_world, "--modes", "adaptive", "--limit", 2)
    assert run.returncode != 0 and "gate-only" in run.stderr


def test_evaluate_reads_a_beir_visual_document_task_with_ndcg(small_world, small_backbone, tmp_path):
    import shutil
    out = tmp_path / "m"
    sft(small_world, small_backbone, out, "--steps", 1)
    data = tmp_path / "mmeb"
    (data / "DocTask").mkdir(parents=True)
    pages = sorted(os.listdir(os.path.join(small_world, "images", "eval")))[:5]
    for p in pages:
        shutil.copy(os.path.join(small_world, "images", "eval", p), data / "DocTask" / p)
    (data / "DocTask" / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(["red circle", "blue square", "a cross"])))
    (data / "DocTask" / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "image": p}) + "\n"
                                                           for i, p in enumerate(pages)))
    (data / "DocTask" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t2\nq0\td1\t1\nq1\td2\t1\nq2\td4\t1\n")
    run = evaluate("--model", out, "--data", data, "--task", "VisDoc", "--modes", "nothink,think", "--max-cot-tokens", 4)
    assert run.returncode == 0, run.stderr
    r = json.loads((out / "eval" / "results.json").read_text())["tasks"]["DocTask"]
    assert r["metric"] == "ndcg_linear@5" and r["all"]["n"] == 3 and 0 <= r["all"]["nothink"] <= 100
    assert json.loads((out / "eval" / "nothink" / "DocTask_score.json").read_text())["ndcg_linear@5"] == r["all"]["nothink"] / 100
