"""
Joint SFT of TWN: the reason adapter learns to write the teacher's chain-of-thought while the embed
adapter and the learned queries learn to embed, with and without that CoT.

Paper: Think When Needed (arXiv 2605.14448), the joint training of the dual LoRA with gradients
detached at the interface (claims 1-2). The loss per batch:

    loss = lambda * CoT next-token loss             (reason adapter; reads the input's KV detached)
         + InfoNCE(e0, targets) + InfoNCE(e1, targets)   (embed adapter + queries; read the CoT's KV detached)

with in-batch negatives plus the training set's hard negatives, temperature tau = 0.02 (VLM2Vec's).
`--no-detach` lets the gradients cross both boundaries, for the ablation.

    python train_sft.py                                  # mini world + tiny backbone: 600 steps, 3.5-10 min on 2 cores
    python train_sft.py --no-detach --out runs/sft-nodetach
    torchrun --nproc_per_node=2 train_sft.py             # DDP: gloo on CPU, nccl on GPU
    python train_sft.py --backbone /models/Qwen2-VL-2B-Instruct --data /data/MMEB-train \\
        --out runs/twn-2b --batch-size 1024 --micro-batch 32 --steps 5000 --lr 5e-5

Training resumes from the latest checkpoint in --out by itself. The final adapters, queries and
settings are written to --out (reasoning/, embedding/, twn.json).
"""

import argparse
import math
import os
import time

import torch
from tqdm import tqdm

import model as twn_model
import runtime
from data.collate import Processor

# -----------------------------------------------------------------------------
# settings

parser = argparse.ArgumentParser(description="Joint SFT of TWN (CoT loss + InfoNCE on both embeddings)")
g = parser.add_argument_group("data and model")
g.add_argument("--backbone", default="data/tiny-qwen2vl", help="local Qwen2-VL / Qwen3-VL directory")
g.add_argument("--data", default="data/world", help="MMEB-train directory (parquet under train/ or itself); "
               "the mini world is generated here if missing")
g.add_argument("--image-root", default=None, help="root of the parquet's image paths (default: --data)")
g.add_argument("--out", default="runs/sft", help="output directory; training resumes from it")
g.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (default: the backbone's)")
g.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="a bad training row: fail stops "
               "(naming its file and row, or the image when its batch is collated); skip drops it at start, "
               "checking every training item once")
g = parser.add_argument_group("TWN")
g.add_argument("--r", type=int, default=16, help="LoRA rank of each adapter")
g.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
g.add_argument("--queries", type=int, default=4, help="number of learned query tokens")
g.add_argument("--no-detach", action="store_true", help="ablation: let gradients cross the adapter interface")
g = parser.add_argument_group("optimisation")
g.add_argument("--steps", type=int, default=600, help="optimizer steps")
g.add_argument("--batch-size", type=int, default=32, help="query/target pairs per step, over all ranks")
g.add_argument("--micro-batch", type=int, default=0, help="GradCache chunk size per rank (0: no chunking)")
g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine with warm-up)")
g.add_argument("--warmup", type=int, default=50, help="warm-up steps")
g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
g.add_argument("--cot-weight", type=float, default=1.0, help="lambda: weight of the CoT next-token loss")
g.add_argument("--tau", type=float, default=0.02, help="InfoNCE temperature")
g.add_argument("--max-cot-tokens", type=int, default=96, help="teacher CoTs are cut to this many tokens")
g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
g.add_argument("--max-bad-steps", type=int, default=5, help="a step with a NaN/inf loss or gradient is skipped; "
               "this many in a row stop the run")
g = parser.add_argument_group("think gate (fitted after training on the model's own CoTs)")
g.add_argument("--gate-queries", type=int, default=4000, help="training queries labelled win/lose for the gate (0: no gate)")
g.add_argument("--think-budget", type=float, default=None, help="think on this fraction of inputs (default: the "
               "threshold with the best held-out score)")
g.add_argument("--gate-only", action="store_true", help="only (re)fit the gate of the model already in --out")
g = parser.add_argument_group("system")
g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
g.add_argument("--compile", action="store_true", help="torch.compile the backbone's decoder (CUDA)")
g.add_argument("--seed", type=int, default=0, help="seed for adapters, queries and data order")
g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps")
g.add_argument("--log-every", type=int, default=10, help="log line every N steps")
args = parser.parse_args()

rt = runtime.setup(args.device, args.seed)

# -----------------------------------------------------------------------------
# data: the mini world is made (and the tiny backbone is already committed) if nothing is given

if args.data == "data/world" and rt.master:
    from data import world
    made = world.version_of(args.data)
    if made != world.VERSION:
        print("generating the mini world in data/world" if made is None else
              f"data/world was written by an older data/world.py (version {made}, now {world.VERSION}): rewriting it")
        world.generate(args.data, seed=0)
if rt.world > 1:
    torch.distributed.barrier()
files = runtime.training_files(args.data)
proc = Processor.from_pretrained(args.backbone, max_pixels=args.max_pixels)
pairs, dropped = runtime.load_pairs(files, args.image_root or args.data, proc, args.on_error)
if dropped and rt.master:
    print(f"--on-error skip: dropped {len(dropped)} bad training pairs, the first: {dropped[0]}")
missing_cot = sum(p.cot is None for p in pairs)
if missing_cot:
    raise SystemExit(f"{missing_cot} of {len(pairs)} training pairs have no `cot`: joint SFT needs teacher CoTs")

# -----------------------------------------------------------------------------
# model and optimizer

cfg = twn_model.TWNConfig(r=args.r, alpha=args.alpha, num_queries=args.queries, detach=not args.no_detach)
twn = twn_model.from_pretrained(args.backbone, cfg, tokenizer=proc.tokenizer, device=rt.device)
if args.compile:
    # compile the decoder stack in place; `twn` itself stays the uncompiled module we save
    twn.backbone.model.language_model.compile()
params = [p for p in twn.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
# --gate-only only reads the finished model, whatever flags trained it; a training run resumes only its own run
step, _ = runtime.load_checkpoint(args.out, twn, opt, None if args.gate_only else args,
                                  free=runtime.FREE_FLAGS | {"compile"})
if args.gate_only:
    twn.load(args.out)  # the finished model, not a checkpoint
    step = args.steps
if rt.master:
    n = sum(p.numel() for p in params)
    print(f"TWN on {args.backbone}: {n / 1e6:.2f} M trainable ({n / sum(p.numel() for p in twn.backbone.parameters()) * 100:.1f} %), "
          f"{len(pairs)} pairs, detach={cfg.detach}, world {rt.world}" + (f", resumed at step {step}" if step else ""))


def lr_at(s):
    warm = min(1.0, (s + 1) / args.warmup)
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))


# -----------------------------------------------------------------------------
# helpers


def batch_for(s):
    return [pairs[j] for j in runtime.batch_indices(len(pairs), args.batch_size, s, args.seed, rt.rank, rt.world)]


def to_device(batch):
    return {k: v.to(rt.device) for k, v in batch.items()}


def key(item):
    return (item.text, item.image)


def targets_of(chunk):
    """Positives then hard negatives; targets with the same content are one target (see info_nce)."""
    return [p.pos for p in chunk] + [p.neg for p in chunk if p.neg is not None]


def forward_queries(chunk):
    batch = to_device(proc([p.query for p in chunk]))
    cot_ids, cot_mask = proc.tokenize_continuation([p.cot for p in chunk])
    cot_ids, cot_mask = cot_ids[:, :args.max_cot_tokens].to(rt.device), cot_mask[:, :args.max_cot_tokens].to(rt.device)
    with rt.autocast():
        return twn(batch, cot_ids, cot_mask)


def forward_targets(items):
    """Embed each distinct target once, then give every column its row: a batch repeats targets (the
    answer "b3" for several queries; 28 % of the mini world's columns), and the loss sees them all."""
    keys = [key(t) for t in items]
    row = {}
    for k, t in zip(keys, items):
        row.setdefault(k, (len(row), t))
    with rt.autocast():
        e = twn.encode_embed(to_device(proc([t for _, t in row.values()])))[2]
    return e[torch.tensor([row[k][0] for k in keys], device=e.device)]


def contrastive(e0, e1, t, q_keys, t_keys):
    """Global InfoNCE on both embeddings: gathered queries vs gathered targets (local slots live)."""
    e0, e1, t = runtime.gather(e0), runtime.gather(e1), runtime.gather(t)
    q_keys, t_keys = runtime.gather_objects(q_keys), runtime.gather_objects(t_keys)
    col = {k: j for j, k in reversed(list(enumerate(t_keys)))}  # first column holding each target
    pos = torch.tensor([col[k] for k in q_keys], device=t.device)
    same = torch.tensor([[tk == qk for tk in t_keys] for qk in q_keys], device=t.device)
    return runtime.info_nce(e0, t, pos, same, args.tau), runtime.info_nce(e1, t, pos, same, args.tau)


def train_step(chunk):
    """One step on this rank's pairs; returns (nce0, nce1, cot) as floats. Gradients left in .grad."""
    targets = targets_of(chunk)
    q_keys, t_keys = [key(p.pos) for p in chunk], [key(t) for t in targets]
    if not args.micro_batch or args.micro_batch >= len(chunk):
        out = forward_queries(chunk)
        t = forward_targets(targets)
        nce0, nce1 = contrastive(out["e0"], out["e1"], t, q_keys, t_keys)
        # CoT loss is per rank: /world so that summed gradients give the global mean
        (nce0 + nce1 + args.cot_weight * out["cot_loss"] / rt.world).backward()
        return nce0.item(), nce1.item(), out["cot_loss"].item()
    # GradCache: naive accumulation would shrink the negatives to one micro-batch. Instead embed the
    # whole batch without a graph, take the loss's gradient w.r.t. those embeddings, then re-run each
    # chunk with a graph and push the cached gradient through it (exact: same gradient as one big batch).
    mb = args.micro_batch
    q_chunks = [chunk[i:i + mb] for i in range(0, len(chunk), mb)]
    t_chunks = [targets[i:i + mb] for i in range(0, len(targets), mb)]
    with torch.no_grad():
        outs = [forward_queries(c) for c in q_chunks]
        t = torch.cat([forward_targets(c) for c in t_chunks])
    e0 = torch.cat([o["e0"] for o in outs]).requires_grad_()
    e1 = torch.cat([o["e1"] for o in outs]).requires_grad_()
    t = t.requires_grad_()
    nce0, nce1 = contrastive(e0, e1, t, q_keys, t_keys)
    (nce0 + nce1).backward()
    cot_total = 0.0
    for i, c in enumerate(q_chunks):
        out = forward_queries(c)
        rows = slice(i * mb, i * mb + len(c))
        cot = out["cot_loss"] * len(c) / len(chunk)
        cot_total += cot.item()
        ((out["e0"] * e0.grad[rows]).sum() + (out["e1"] * e1.grad[rows]).sum()
         + args.cot_weight * cot / rt.world).backward()
    for i, c in enumerate(t_chunks):
        (forward_targets(c) * t.grad[i * mb:i * mb + len(c)]).sum().backward()
    return nce0.item(), nce1.item(), cot_total


# -----------------------------------------------------------------------------
# the loop

if args.batch_size % rt.world:
    raise SystemExit(f"--batch-size {args.batch_size} must divide over {rt.world} ranks")
twn.train()
guard = runtime.BadStepGuard(args.max_bad_steps)
t0 = time.time()
bar = tqdm(total=args.steps, initial=step, desc="sft", disable=not rt.master, mininterval=5)
while step < args.steps:
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    opt.zero_grad(set_to_none=True)
    nce0, nce1, cot = train_step(batch_for(step))
    runtime.sync_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if guard.ok(nce0, nce1, cot, norm):
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)  # the bad gradients never reach the weights; the step still counts
        if rt.master:
            tqdm.write(f"step {step + 1:5d} | skipped: nce0 {nce0:.3f} | nce1 {nce1:.3f} | cot {cot:.3f} | "
                       f"grad {norm:.2f} | {guard.in_a_row} bad in a row")
    step += 1
    bar.update(1)
    if step % args.log_every == 0 or step == args.steps:
        cot = runtime.mean_over_ranks(cot)  # a collective: every rank takes part
        if rt.master:
            tqdm.write(f"step {step:5d} | nce0 {nce0:.3f} | nce1 {nce1:.3f} | cot {cot:.3f} | "
                       f"grad {norm:.2f} | lr {lr_at(step - 1):.2e} | {(time.time() - t0) / 60:.1f} min")
    if step % args.ckpt_every == 0 and step < args.steps:
        runtime.check_in_sync(params)
        if rt.master:
            runtime.save_checkpoint(args.out, step, twn, opt, {"args": vars(args)})
bar.close()
runtime.check_in_sync(params)
if rt.master and not args.gate_only:
    runtime.save_checkpoint(args.out, step, twn, opt, {"args": vars(args)})  # a rerun finds nothing left to do
    twn.save(args.out, extra={"sft": vars(args), "steps": step})

# -----------------------------------------------------------------------------
# the think gate: label training queries by whether the model's own CoT helped, fit, pick a threshold

if args.gate_queries:
    from evaluate import fit_gate
    twn.eval()
    _, info = fit_gate(twn, proc, rt, pairs, args.out, n=args.gate_queries, budget=args.think_budget,
                       max_cot_tokens=args.max_cot_tokens, seed=args.seed)
    if rt.master:
        h = info["held_out"]
        print(f"gate: {info['queries']} queries, thinking helped {100 * info['win_rate']:.0f}% "
              f"({', '.join(f'{d} {100 * v:.0f}%' for d, v in info['win_rate_by_difficulty'].items())}); held-out hit@1 "
              f"no-think {100 * h['nothink']:.1f}, think {100 * h['think']:.1f}, adaptive {100 * h['adaptive']:.1f} "
              f"at {100 * h['think_rate']:.0f}% thinking")
runtime.teardown()
