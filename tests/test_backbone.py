"""The committed tiny backbone: loads like any Qwen2-VL directory, perceives unseen scenes; its script runs."""

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForImageTextToText

from data import world
from data.backbone import generate, lookup_accuracy, read_jsonl
from data.collate import Processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "data", "tiny-qwen2vl")


def test_committed_backbone_perceives_unseen_scenes(small_world):
    model = AutoModelForImageTextToText.from_pretrained(TINY).eval()  # exactly as a real Qwen2-VL dir
    proc = Processor.from_pretrained(TINY)
    rows = [r for r in read_jsonl(os.path.join(small_world, "pretrain_eval.jsonl"), small_world)
            if r["kind"] == "describe" and "/crops/" not in r["image"]][:24]
    with torch.no_grad():
        got = generate(model, proc, rows, max_new_tokens=64)
    hits, total = {"colour": 0, "shape": 0, "object": 0}, 0
    for row, text in zip(rows, got):
        pred = {cell: (c, s) for cell, c, s in world.parse_caption(text)}
        for cell, c, s in world.parse_caption(row["completion"]):
            total += 1
            p = pred.get(cell, (None, None))
            hits["colour"] += p[0] == c
            hits["shape"] += p[1] == s
            hits["object"] += p == (c, s)
    # blind guessing: colour 1/8, shape 1/4, object 1/32
    assert hits["colour"] / total > 0.9 and hits["shape"] / total > 0.9 and hits["object"] / total > 0.9, hits


def test_backbone_script_rebuilds_a_model_in_a_few_steps(small_world, tmp_path):
    out = tmp_path / "bb"
    run = subprocess.run([sys.executable, "-m", "data.backbone", "--world", small_world, "--out", str(out),
                          "--steps", "3", "--vision-steps", "2", "--report-size", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "pretrain_report.json").read_text())
    assert set(report["perception"]) == {"object", "cell", "colour", "shape"} and report["steps"] == 3
    assert set(report["lookup"]) == {"train_easy", "train_hard", "eval_easy", "eval_hard"}


class Oracle(torch.nn.Module):
    """A stand-in LM whose most likely next word at position t is input t+1 (shift=1: it knows the
    answer) or input t (shift=0: it repeats the word it just read)."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, input_ids, **_):
        target = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, 1000).float()})


def test_lookup_accuracy_scores_the_word_after_is_at(small_world):
    proc = Processor.from_pretrained(TINY)
    rows = [r for r in read_jsonl(os.path.join(small_world, "pretrain_eval.jsonl"), small_world)
            if r["kind"] == "think" and " is at " in r["completion"]][:6]
    assert len(rows) == 6
    assert lookup_accuracy(Oracle(shift=1), proc, rows, batch_size=4) == 1.0  # two batches, left padded
    assert lookup_accuracy(Oracle(shift=0), proc, rows, batch_size=4) == 0.0  # predicts "at" again
