"""
Stage 0: a tiny Qwen2-VL that perceives the mini world, standing in for Qwen/Qwen2-VL-2B-Instruct.

twn's pipeline starts from a pretrained multimodal LLM that can see and can reason in text. Nothing can
be downloaded here, so this script makes one: a small `Qwen2VLForConditionalGeneration` built from a
config, with a word-level tokenizer trained on the world's closed vocabulary, pretrained from scratch
(every parameter, next-token loss on the completion) on the world's training scenes:
  0a. the vision tower alone, supervised per image token (each token is one grid cell) with that
      cell's colour and shape, like a ViT pretrained before the LLM learns to read it;
  0b. the whole model on the world's text over train images:
  - perception   `describe :`             -> the canonical caption (`a1 red circle , b3 blue square`)
  - direct       `<question>`              -> `answer : blue`
  - reasoning    `<question> think :`      -> the teacher CoT, ending in `answer : blue`
  and, text only, in every batch beside them (`--drills`, fresh random scenes, `world.reading_drill`):
  - reading      `<question> think : <listing> .` -> the CoT's hops (`the square is at b1 . b1 is blue ...`)
It is saved as a standard HF directory (config.json, model.safetensors, tokenizer files,
preprocessor_config.json, generation_config.json): everything downstream loads it with
`from_pretrained(dir)` exactly as it loads the real Qwen2-VL, and nothing special-cases it.

    python -m data.backbone --world data/world --out data/tiny-qwen2vl        # ~30 min on 2 cores
    python -m data.backbone --steps 20 --out /tmp/bb                          # a smoke run

The result is committed (a few MB), so the main job starts from it; this is the command that rebuilds it.
At the end it reports, on eval scenes it never saw, how well it perceives (per attribute) and how its
direct answers compare with its chains of thought on easy and hard questions (pretrain_report.json),
and how often it gets a CoT's lookup step right (`lookup_accuracy`, on training and eval scenes).

    python -m data.backbone --report-only                                     # the report of the committed one
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # `python data/backbone.py` as well as `python -m data.backbone`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data import world as world_lib
from data.collate import Processor
from data.mmeb import QWEN_IMAGE, Item
from data.tokenizer import build_word_tokenizer

# -----------------------------------------------------------------------------
# the architecture: Qwen2-VL's, scaled down. Measured on 2 cores: a 4-layer / 128-wide LM with a
# 4-block / 128-wide vision tower perceives the world; a wider/deeper LM was *worse* per second.

TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
VISION = dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4, hidden_size=128, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
# images are 112 px (56 px crops): 4x4 (2x2) LLM tokens, one per 28 px cell of the world's grid
IMAGE_PROCESSOR = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)


def make_tokenizer_and_config(world_dir):
    path = os.path.join(world_dir, "world.json")
    with open(path) as f:
        vocabulary = json.load(f).get("vocabulary")
    if not isinstance(vocabulary, list) or not all(isinstance(word, str) for word in vocabulary):
        raise ValueError(f"{path}: 'vocabulary' must be a list of words (regenerate it: python -m data.world)")
    tok = build_word_tokenizer(vocabulary + ["describe", "think", "answer", ":"])
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(text_config=dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
                                            eos_token_id=tok.eos_token_id),
                           vision_config=VISION, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    return tok, config


def save_backbone(model, tok, out_dir):
    """A standard HF directory; written to a temp dir and renamed so a crash leaves no half model."""
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(tmp)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(tmp)
    if os.path.exists(out_dir):
        os.replace(out_dir, out_dir.rstrip("/") + ".old")
    os.replace(tmp, out_dir)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(old):
        import shutil
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# data: prompt + completion, loss on the completion (and its eos) only


def read_jsonl(path, world_dir):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
            for key in ("image", "prompt", "completion"):
                if key not in row:
                    raise ValueError(f"{path}:{i + 1}: missing key {key!r}")
            rows.append(row)
    for row in rows:
        row["image"] = os.path.join(world_dir, row["image"]) if row["image"] else None
    return rows


def to_item(row, completion=True):
    text = row["prompt"] + (f" {row['completion']}<|im_end|>" if completion else "")
    return Item(f"{QWEN_IMAGE} {text}" if row["image"] else text, row["image"])


def batch_loss(model, proc, rows):
    """Mean over examples of each example's mean completion-token NLL (long CoTs don't outweigh captions)."""
    batch = proc([to_item(r) for r in rows])
    # left padding puts every row's completion (+ eos) at the very end of the sequence
    n_comp = torch.tensor([len(proc.tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1
                           for r in rows])
    T = batch["input_ids"].shape[1]
    logits = model(**batch).logits[:, :-1].float()  # position t predicts token t+1
    targets = batch["input_ids"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    on_completion = (torch.arange(1, T)[None] >= (T - n_comp)[:, None]).float()
    return ((nll * on_completion).sum(1) / n_comp).mean()


# -----------------------------------------------------------------------------
# stage 0a: the vision tower first, as a real MLLM's ViT is pretrained before the LLM learns to read it


def warm_up_vision(model, proc, rows, steps, batch_size=16, lr=1e-3, seed=0):
    """Supervise the vision tower's merged tokens directly: each 28 px cell is one token, labelled with
    its object's colour and shape (or empty), through a throw-away linear head.

    Why: trained only through the language model's next-token loss, the tower learned colours and cells
    in 2,400 steps but stayed at chance on shapes; supervised per token, it knows shapes in ~50 steps.
    """
    scenes = [r for r in rows if r["kind"] == "describe" and "/crops/" not in r["image"]]
    colours, shapes = [None, *world_lib.COLOURS], [None, *world_lib.SHAPES]
    visual = model.model.visual
    head = torch.nn.Linear(visual.config.hidden_size, len(colours) + len(shapes))
    opt = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=lr)
    rng = random.Random(seed)
    for _ in tqdm(range(steps), desc="vision warm-up", mininterval=5):
        chunk = rng.sample(scenes, batch_size)
        batch = proc([Item(QWEN_IMAGE, r["image"]) for r in chunk])
        tokens = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output  # (B*16, H)
        colour = torch.zeros(len(chunk), len(world_lib.CELLS), dtype=torch.long)
        shape = torch.zeros_like(colour)
        for i, r in enumerate(chunk):
            for cell, c, s in world_lib.parse_caption(r["completion"]):
                j = world_lib.CELLS.index(cell)  # the merged tokens come in reading order, like the cells
                colour[i, j], shape[i, j] = colours.index(c), shapes.index(s)
        logits = head(tokens)
        loss = (F.cross_entropy(logits[:, :len(colours)], colour.view(-1))
                + F.cross_entropy(logits[:, len(colours):], shape.view(-1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


# -----------------------------------------------------------------------------
# the report: perception and direct-vs-CoT accuracy on eval scenes


@torch.no_grad()
def generate(model, proc, rows, max_new_tokens, batch_size=64):
    outs = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = proc([to_item(r, completion=False) for r in chunk])
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        outs += proc.decode(ids[:, batch["input_ids"].shape[1]:])
    return outs


def final_answer(text):
    return text.rsplit("answer :", 1)[-1].strip() if "answer :" in text else ""


@torch.no_grad()
def lookup_accuracy(model, proc, rows, batch_size=64):
    """Teacher-forced: how often the most likely next word after `is at` in a CoT is the right cell.

    That word is the CoT's lookup step ("the triangle is at ___"): find the object the question names in
    the listing just written, copy its cell. Every VQA and grounding CoT makes one, and a hard one makes it
    among look-alikes, so this is the skill the reasoner's accuracy rests on. Fed the teacher's CoT, it
    measures the step alone, not the errors before it.
    """
    ok = total = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = proc([to_item(r) for r in chunk])
        ids = batch["input_ids"]
        best = model(**batch).logits.argmax(-1)
        for j, row in enumerate(chunk):
            words = row["completion"].split()  # the world's tokenizer: one token per word
            start = ids.shape[1] - len(words) - 1  # left padded: the completion and eos end the row
            for k in range(2, len(words)):
                if words[k - 2:k] == ["is", "at"]:
                    ok += int(best[j, start + k - 1] == ids[j, start + k])
                    total += 1
    return round(ok / max(total, 1), 3)


@torch.no_grad()
def report(model, proc, world_dir, n=300):
    """Per-attribute perception of unseen scenes, and direct vs CoT accuracy by difficulty."""
    model.eval()
    rows = read_jsonl(os.path.join(world_dir, "pretrain_eval.jsonl"), world_dir)
    random.Random(0).shuffle(rows)
    out = {}
    describe = [r for r in rows if r["kind"] == "describe" and "crops" not in r["image"]][:n]
    got = generate(model, proc, describe, 64)
    hits = {"object": 0, "cell": 0, "colour": 0, "shape": 0}
    total = 0
    for row, text in zip(describe, got):
        pred = {o[0]: o[1:] for o in world_lib.parse_caption(text)}
        for cell, colour, shape in world_lib.parse_caption(row["completion"]):
            total += 1
            p = pred.get(cell)
            hits["cell"] += p is not None
            hits["colour"] += p is not None and p[0] == colour
            hits["shape"] += p is not None and p[1] == shape
            hits["object"] += p == (colour, shape)
    out["perception"] = {k: round(v / max(total, 1), 3) for k, v in hits.items()}
    for kind in ("direct", "think"):
        for difficulty in ("easy", "hard"):
            sel = [r for r in rows if r["kind"] == kind and r["difficulty"] == difficulty][:n]
            got = generate(model, proc, sel, 96 if kind == "think" else 8)
            acc = sum(final_answer(g) == final_answer(r["completion"]) for r, g in zip(sel, got)) / max(len(sel), 1)
            out[f"{kind}_{difficulty}"] = round(acc, 3)
    train = read_jsonl(os.path.join(world_dir, "pretrain.jsonl"), world_dir)
    random.Random(0).shuffle(train)
    out["lookup"] = {f"{split}_{difficulty}": lookup_accuracy(model, proc, [
        r for r in split_rows if r["kind"] == "think" and r["difficulty"] == difficulty and " is at " in r["completion"]][:n])
        for split, split_rows in (("train", train), ("eval", rows)) for difficulty in ("easy", "hard")}
    model.train()
    return out


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description="Build and pretrain the tiny Qwen2-VL backbone on the mini world.")
    parser.add_argument("--world", default="data/world", help="mini world directory (generated if missing)")
    parser.add_argument("--out", default="data/tiny-qwen2vl", help="where the HF backbone directory goes")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument("--steps", type=int, default=3600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine, warm-up)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    parser.add_argument("--vision-steps", type=int, default=200, help="stage 0a: supervised vision warm-up steps")
    parser.add_argument("--report-size", type=int, default=300, help="eval examples per report line (describe, direct, think)")
    parser.add_argument("--report-every", type=int, default=0, help="run the eval report every N steps (0: at the end)")
    parser.add_argument("--drills", type=int, default=32, help="text-only reading drills added to each step's batch "
                        "(world.reading_drill: without them the lookup step stays near chance)")
    parser.add_argument("--report-only", action="store_true", help="report on the backbone already in --out, "
                        "train nothing (printed; pretrain_report.json keeps the build's report)")
    args = parser.parse_args()

    if not os.path.exists(os.path.join(args.world, "world.json")):
        print(f"generating the mini world in {args.world}")
        world_lib.generate(args.world, seed=0)
    if args.report_only:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.out)
        print(json.dumps(report(model, Processor.from_pretrained(args.out), args.world, n=args.report_size), indent=2))
        return
    torch.manual_seed(args.seed)
    tok, config = make_tokenizer_and_config(args.world)
    model = Qwen2VLForConditionalGeneration(config)
    save_backbone(model, tok, args.out)  # the processor reads its settings from the directory
    proc = Processor.from_pretrained(args.out)
    print(f"tiny Qwen2-VL: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")

    rows = read_jsonl(os.path.join(args.world, "pretrain.jsonl"), args.world)
    t0 = time.time()
    if args.vision_steps:
        print(f"stage 0a: vision warm-up, final loss {warm_up_vision(model, proc, rows, args.vision_steps, seed=args.seed):.3f}")
    rng, drill_rng = random.Random(args.seed), np.random.default_rng(args.seed)
    eval_scenes = frozenset(r["completion"] for r in read_jsonl(os.path.join(args.world, "pretrain_eval.jsonl"), args.world)
                            if r["kind"] == "describe")  # never drill on a scene the eval shows
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order, pos = [], 0
    model.train()
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5)
    for step in bar:
        if pos + args.batch_size > len(order):
            order, pos = list(range(len(rows))), 0
            rng.shuffle(order)
        chunk = [rows[i] for i in order[pos:pos + args.batch_size]]
        pos += args.batch_size
        chunk += [world_lib.reading_drill(drill_rng, eval_scenes) for _ in range(args.drills)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = batch_loss(model, proc, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step):.1e}")
        if args.report_every and (step + 1) % args.report_every == 0:
            tqdm.write(f"step {step + 1}: {report(model, proc, args.world, n=100)}")
    minutes = (time.time() - t0) / 60
    save_backbone(model, tok, args.out)
    result = dict(report(model, proc, args.world, n=args.report_size), steps=args.steps, minutes=round(minutes, 1), seed=args.seed,
                  command=" ".join(["python -m data.backbone"] + sys.argv[1:]))
    with open(os.path.join(args.out, "pretrain_report.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
