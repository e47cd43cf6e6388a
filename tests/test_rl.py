"""train_rl.py as a user runs it: only the reason adapter moves, the reward environment stays put, resume."""

import subprocess
import sys

import torch

from test_train import ENV, ROOT, adapters, kill_after_first_checkpoint, sft


def rl(world, init, out, *extra, wait=True):
    cmd = [sys.executable, "train_rl.py", "--data", world, "--init", init, "--out", out, "--batch-size", "4",
           "--group", "2", "--max-cot-tokens", "6", "--eval-every", "0", "--gate-queries", "0", "--log-every", "1",
           *map(str, extra)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def test_rl_moves_only_the_reason_adapter_and_keeps_the_cache_valid(small_world, small_backbone, tmp_path):
    init = tmp_path / "sft"
    sft(small_world, small_backbone, init, "--steps", 2)
    log = rl(small_world, init, tmp_path / "rl", "--steps", 3, "--lr", "1e-2")
    assert "stationary reward" in log and "reward" in log
    before, after = adapters(init), adapters(tmp_path / "rl")
    for k in before:
        if k.startswith("reasoning/"):
            continue
        assert torch.equal(before[k], after[k]), f"{k} moved during RL"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("reasoning/"))


def test_rl_sigkill_then_resume_equals_an_uninterrupted_run(small_world, small_backbone, tmp_path):
    init = tmp_path / "sft"
    sft(small_world, small_backbone, init, "--steps", 2)
    steps = ["--steps", 4, "--ckpt-every", 2, "--lr", "1e-2"]
    rl(small_world, init, tmp_path / "straight", *steps)
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(rl(small_world, init, killed, *steps, wait=False), killed)
    assert "resumed at step" in rl(small_world, init, killed, *steps)
    a, b = adapters(tmp_path / "straight"), adapters(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
