"""train_rl.py as a user runs it: only the reason adapter moves, the reward environment stays put, resume."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import torch

from test_train import ENV, ROOT, adapters, kill_after_first_checkpoint, sft


STEPS = 200  # SFT steps for the reward test: enough for the think embedding to read its CoT (~1.5 min)


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
    log = rl(small_world, init, tmp_path / "rl", "--steps", 3, "--lr", "1e-2", "--gate-queries", 24)
    assert "stationary reward" in log and "reward" in log and "gate refit" in log
    before, after = adapters(init), adapters(tmp_path / "rl")
    for k in before:
        if k.startswith("reasoning/"):
            continue
        assert torch.equal(before[k], after[k]), f"{k} moved during RL"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("reasoning/"))
    # the gate refit reused the reward's cache: embedding every training target afresh ranks alike
    import model as twn_model
    import runtime
    from data.collate import Processor
    from evaluate import fit_gate
    proc = Processor.from_pretrained(small_backbone)
    pairs, _ = runtime.load_pairs(runtime.training_files(small_world), small_world, proc, "fail")
    twn = twn_model.from_pretrained(small_backbone, twn_model.read_config(tmp_path / "rl"), tokenizer=proc.tokenizer,
                                    device=torch.device("cpu"))
    twn.load(tmp_path / "rl")
    twn.eval()
    rt = runtime.setup("cpu")
    _, fresh = fit_gate(twn, proc, rt, pairs, tmp_path / "fresh", n=24, max_cot_tokens=6, seed=0)
    refit = json.loads((tmp_path / "rl" / "gate.json").read_text())
    assert fresh["mean_rank"]["think"] > 0  # ranks to compare: a cache in another order would move them
    assert {k: refit[k] for k in fresh} == json.loads(json.dumps(fresh))


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


def test_the_reward_ranks_a_cot_naming_the_right_answer_above_one_naming_a_wrong_one(tmp_path):
    """The reward as train_rl.py computes it (think embedding of [input, CoT] by the embed side, the
    log-probability of retrieving the positive among cached targets), on a briefly trained model.

    Each wrong CoT is the right one with the answer word swapped everywhere after the listing (its hop
    and its `answer :`), so the input is the same and only what the CoT concludes differs: an embedder
    that ignored the CoT would score both alike, and the test would fail."""
    import model as twn_model
    import runtime
    from data.collate import Processor
    from data import world
    from data.mmeb import load_image_task

    world_dir = str(tmp_path / "world")  # enough rows that the embedder cannot memorise the inputs
    world.generate(world_dir, seed=0, train_scenes=3000, eval_queries=32)
    init = tmp_path / "sft"
    sft(world_dir, os.path.join(ROOT, "data", "tiny-qwen2vl"), init, "--steps", STEPS, "--batch-size", 16)
    proc = Processor.from_pretrained(os.path.join(ROOT, "data", "tiny-qwen2vl"))
    twn = twn_model.from_pretrained(os.path.join(ROOT, "data", "tiny-qwen2vl"), twn_model.read_config(init),
                                    tokenizer=proc.tokenizer, device=torch.device("cpu"))
    twn.load(init)
    twn.eval()
    path = os.path.join(world_dir, "eval", "ColorVQA.parquet")
    queries, rows = load_image_task(path, world_dir), pq.read_table(path).to_pylist()
    margins = []
    with torch.no_grad():
        for q, row in zip(queries, rows):
            cache = twn.embed_items(proc(q.candidates))  # gold first, then the other colours
            wrong = next(c.text for c in q.candidates[1:] if c.text in world.COLOURS)
            look, rest = row["cot"].split(" . ", 1)
            bad = f"{look} . " + " ".join(wrong if w == row["answer"] else w for w in rest.split())
            enc = twn.encode(proc([q.query, q.query]))
            ids, mask = proc.tokenize_continuation([row["cot"], bad])
            _, after = twn.read_cot(enc, ids, mask)
            _, e1 = twn.embed(enc.then(after.tail(enc.length)))
            r = runtime.retrieval_logprob(e1, cache, torch.tensor([0, 0]), tau=0.02)
            margins.append((r[0] - r[1]).item())
    assert len(margins) >= 8
    # measured: 32 of 32 above zero, the smallest 1.3 nats; an untrained embedder: about half
    assert sum(m > 0 for m in margins) >= 0.9 * len(margins) and sum(margins) / len(margins) > 1.0, margins
