"""
Embedding-guided RL of the reasoning adapter: CoTs are rewarded by how well they make the embedding
retrieve the right target.

Paper: Think When Needed (arXiv 2605.14448), claim 4: the embedding module is a *stationary reward
environment* (its adapter and the queries are frozen during RL) and a *global embedding cache* of the
training targets makes the reward discriminative. GRPO-style, in the manner of nanochat's chat_rl.py.

Per step, for each of B training queries:
  1. encode the input once (frozen embed adapter), sample G CoTs from the reason adapter
     (temperature T, at most --max-cot-tokens);
  2. reward each CoT: embed [input, CoT] with the frozen embed side and score its positive against the
     global cache of every distinct training target:
         r = log softmax_j( e1 . c_j / tau )[positive]  +  format_bonus * [the CoT ended with eos]
     (a log-probability of retrieving the positive: dense, bounded above by 0, and it rewards pushing
     the hardest distractors down, not only the top-1 flip);
  3. advantages within the group: a = r - mean_G r  (no division by the group's std: when the G CoTs
     are near-identical, that division blows reward noise up into full-size pushes);
  4. a clipped policy-gradient loss over the CoT tokens, averaged per sequence then over the batch:
         L = -mean( min(rho * a, clip(rho, 1 - eps, 1 + eps) * a) ),   rho = p_now / p_sampled per token
     plus, if --kl > 0, kl * KL(policy || SFT reason adapter) with the k3 estimator.

Simplifications relative to full GRPO (numbered, as nanochat does):
  1. the reference for rho is the policy that sampled (no separate old-policy copy): with --ppo-epochs 1
     (the default) rho = 1 and the loss is REINFORCE with group-centred advantages;
  2. no KL penalty by default (--kl 0): the stationary reward cannot be hacked by drifting the embedder,
     and the CoT format is held by the format bonus;
  3. no value network, no GAE: one scalar reward per CoT, broadcast to its tokens;
  4. the group baseline is the mean of all G samples, the sample itself included (not leave-one-out);
  5. advantages are not divided by the group's standard deviation (as nanochat).

    python train_rl.py                                    # mini world, from runs/sft: ~2.5 min on 2 cores, then the gate refit
    torchrun --nproc_per_node=8 train_rl.py --init runs/twn-2b --data /data/MMEB-train --out runs/twn-2b-rl

Resumes from --out by itself; at the end refits the gate (the CoTs changed, so did the win/lose labels).
"""

import argparse
import contextlib
import json
import os
import shutil
import time

import torch
from tqdm import tqdm

import model as twn_model
import runtime
from data.collate import Processor
from data.mmeb import load_image_task
from evaluate import Embedder, fast_decoder, fit_gate, global_cache, hit_at_1

# -----------------------------------------------------------------------------
# settings

parser = argparse.ArgumentParser(description="Embedding-guided GRPO of TWN's reason adapter")
g = parser.add_argument_group("data and model")
g.add_argument("--init", default="runs/sft", help="the SFT model to start from (train_sft.py's --out)")
g.add_argument("--backbone", default=None, help="backbone directory (default: the one the SFT model used)")
g.add_argument("--data", default="data/world", help="MMEB-train directory (parquet under train/ or itself)")
g.add_argument("--image-root", default=None, help="root of the parquet's image paths (default: --data)")
g.add_argument("--out", default="runs/rl", help="output directory; training resumes from it")
g.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="a bad training row: fail stops "
               "(naming its file and row, or the image when its batch is collated); skip drops it at start, "
               "checking every training item once")
g = parser.add_argument_group("RL")
g.add_argument("--steps", type=int, default=60, help="optimizer steps")
g.add_argument("--batch-size", type=int, default=16, help="queries per step, over all ranks")
g.add_argument("--group", type=int, default=4, help="G: CoTs sampled per query")
g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
g.add_argument("--max-cot-tokens", type=int, default=96, help="longest sampled CoT")
g.add_argument("--tau", type=float, default=0.02, help="temperature of the retrieval reward's softmax")
g.add_argument("--format-bonus", type=float, default=0.5, help="reward for a CoT that ends (eos) in time")
g.add_argument("--clip", type=float, default=0.2, help="PPO clip range of the probability ratio")
g.add_argument("--ppo-epochs", type=int, default=1, help="gradient steps per batch of samples")
g.add_argument("--kl", type=float, default=0.0, help="weight of KL(policy || SFT reason adapter)")
g.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW, constant after warm-up)")
g.add_argument("--warmup", type=int, default=5, help="warm-up steps")
g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
g.add_argument("--max-bad-steps", type=int, default=5, help="a step with a NaN/inf loss or gradient is skipped; "
               "this many in a row stop the run")
g = parser.add_argument_group("evaluation and gate")
g.add_argument("--eval-every", type=int, default=20, help="held-out think-mode hit@1 every N steps (0: off)")
g.add_argument("--eval-limit", type=int, default=48, help="held-out queries per eval task")
g.add_argument("--eval-tasks", default="ColorVQA,ShapeVQA,WhereVQA,ColorCLS", help="held-out tasks for the periodic check")
g.add_argument("--gate-queries", type=int, default=4000, help="training queries for the final gate refit (0: skip)")
g.add_argument("--think-budget", type=float, default=None, help="think on this fraction of inputs (default: best held-out score)")
g = parser.add_argument_group("system")
g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
g.add_argument("--seed", type=int, default=0, help="seed for sampling and data order")
g.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N steps")
g.add_argument("--log-every", type=int, default=5, help="log line every N steps")
args = parser.parse_args()

rt = runtime.setup(args.device, args.seed)

# -----------------------------------------------------------------------------
# the SFT model; only the reason adapter learns

with open(os.path.join(args.init, "twn.json")) as f:
    saved = json.load(f)
backbone = args.backbone or saved.get("sft", {}).get("backbone")
proc = Processor.from_pretrained(backbone)
twn = twn_model.from_pretrained(backbone, twn_model.read_config(args.init), tokenizer=proc.tokenizer, device=rt.device)
twn.load(args.init)
policy = twn.trainable_parameters("reason")
for p in twn.trainable_parameters("embed"):
    p.requires_grad_(False)  # the embedding side is the reward environment: frozen, so the cache stays valid
sft_reason = [p.detach().clone() for p in policy]  # the KL reference
opt = torch.optim.AdamW(policy, lr=args.lr, weight_decay=0.0)
step, _ = runtime.load_checkpoint(args.out, twn, opt, args,
                                  free=runtime.FREE_FLAGS | {"eval_every", "eval_limit", "eval_tasks"})

files = runtime.training_files(args.data)
pairs, dropped = runtime.load_pairs(files, args.image_root or args.data, proc, args.on_error)
if dropped and rt.master:
    print(f"--on-error skip: dropped {len(dropped)} bad training pairs, the first: {dropped[0]}")


def to_device(batch):
    return {k: v.to(rt.device) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# the global embedding cache: every distinct training target, embedded once by the frozen embed side

twn.eval()  # no dropout anywhere during RL: the reward must be a deterministic function of the CoT
twn.fuse("embed")  # frozen for the whole run: it can run on a weight copy with the adapter folded in (faster)
# the sampler: decode.FastDecoder (static cache; the reason adapter folded into a weight copy that it
# refreshes at every call, so each step samples from the policy as it is now; a CUDA graph on a GPU)
decoder = fast_decoder(twn, rt.device)
emb = Embedder(twn, proc, rt, 64, args.max_cot_tokens, decoder=decoder)
keys, column, cache = global_cache(emb, pairs)
cache = cache.to(rt.device)  # (N, H)
if rt.master:
    print(f"RL of the reason adapter ({sum(p.numel() for p in policy) / 1e6:.2f} M params) from {args.init}; "
          f"global cache of {len(keys)} targets; {len(pairs)} queries; G={args.group}" +
          (f"; resumed at step {step}" if step else ""))


def rewards(e1, pos, finished):
    """(B*G,) reward: log-probability of retrieving the positive from the cache, plus the format bonus."""
    logp = runtime.retrieval_logprob(e1, cache, pos, args.tau)
    return logp + args.format_bonus * finished.float()


def token_logprobs(enc, ids, mask):
    """(B, L) log-probability of each sampled CoT token under the current reason adapter."""
    return twn.read_cot(enc, ids, mask)[0]


@contextlib.contextmanager
def reference_weights():
    """Temporarily put the SFT reason adapter back in place (for the KL term's reference log-probs)."""
    now = [p.detach().clone() for p in policy]
    with torch.no_grad():
        for p, ref in zip(policy, sft_reason):
            p.copy_(ref)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, cur in zip(policy, now):
                p.copy_(cur)


def held_out_think_score():
    """Mean think-mode hit@1 on the first --eval-limit queries of a few eval tasks (a quick progress check)."""
    scores = []
    for name in args.eval_tasks.split(","):
        path = os.path.join(args.data, "eval", f"{name}.parquet")
        if not os.path.exists(path):
            continue
        queries = load_image_task(path, args.data)[:args.eval_limit]
        cands = {(c.text, c.image): c for q in queries for c in q.candidates}
        index = {k: i for i, k in enumerate(cands)}
        cand = emb.targets(list(cands.values()))
        outs = emb.queries([q.query for q in queries], ["think"])
        for q, o in zip(queries, outs):
            cols = torch.tensor([index[(c.text, c.image)] for c in q.candidates])
            scores.append(hit_at_1(cand[cols] @ o["think"]))
    return 100 * sum(scores) / max(len(scores), 1)


# -----------------------------------------------------------------------------
# the loop

if args.batch_size % rt.world:
    raise SystemExit(f"--batch-size {args.batch_size} must divide over {rt.world} ranks")
sampler = torch.Generator(device=rt.device)
guard = runtime.BadStepGuard(args.max_bad_steps)
t0 = time.time()
if rt.master and args.eval_every and step == 0:
    print(f"step     0 | held-out think hit@1 {held_out_think_score():.1f}")
bar = tqdm(total=args.steps, initial=step, desc="rl", disable=not rt.master, mininterval=5)
while step < args.steps:
    chunk = [pairs[j] for j in runtime.batch_indices(len(pairs), args.batch_size, step, args.seed, rt.rank, rt.world)]
    G = args.group
    sampler.manual_seed(args.seed * 1_000_003 + step * 7919 + rt.rank)  # per step: a resumed run samples the same
    # 1. encode once, sample G CoTs per query (no graph: sampling is not differentiated)
    with torch.no_grad():
        enc = twn.encode(to_device(proc([p.query for p in chunk])))
        enc = enc.select(torch.arange(len(chunk), device=rt.device).repeat_interleave(G))  # (B*G rows)
        ids, mask, after = decoder(enc, args.max_cot_tokens, args.temperature, sampler)
        # 2. the frozen embedder scores each CoT against the global cache
        _, e1 = twn.embed(enc.then(after.tail(enc.length)))
        pos = torch.tensor([column[(p.pos.text, p.pos.image)] for p in chunk], device=rt.device).repeat_interleave(G)
        finished = (ids == twn.eos_id).any(1)
        r = rewards(e1, pos, finished)
        # 3. advantages: each CoT against its group's mean
        rg = r.view(-1, G)
        adv = (rg - rg.mean(1, keepdim=True)).view(-1)
        old = token_logprobs(enc, ids, mask)
        ref = None
        if args.kl > 0:
            with reference_weights():
                ref = token_logprobs(enc, ids, mask)
    # 4. clipped policy gradient over the CoT tokens
    m = mask.float()
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    for group in opt.param_groups:
        group["lr"] = lr
    for _ in range(args.ppo_epochs):
        now = token_logprobs(enc, ids, mask)
        rho = torch.exp(now - old)
        pg = torch.min(rho * adv[:, None], rho.clamp(1 - args.clip, 1 + args.clip) * adv[:, None])
        per_token = -pg
        if ref is not None:
            per_token = per_token + args.kl * (torch.exp(ref - now) - (ref - now) - 1)  # k3 estimator of KL
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        (loss / rt.world).backward()  # summed over ranks below: the global mean
        runtime.sync_grads(policy)
        norm = torch.nn.utils.clip_grad_norm_(policy, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if not guard.ok(loss.item(), norm):
            opt.zero_grad(set_to_none=True)  # the bad gradients never reach the weights; the step still counts
            if rt.master:
                tqdm.write(f"step {step + 1:5d} | skipped: loss {loss.item():.3f} | grad {norm:.2f} | "
                           f"{guard.in_a_row} bad in a row")
            break
        opt.step()
    step += 1
    bar.update(1)
    if step % args.log_every == 0 or step == args.steps:
        stats = [runtime.mean_over_ranks(x) for x in (r.mean().item(), rg.std(1).mean().item(), m.sum(1).mean().item(),
                                                        finished.float().mean().item())]
        if rt.master:
            tqdm.write(f"step {step:5d} | reward {stats[0]:.3f} | spread {stats[1]:.3f} | cot len {stats[2]:.1f} | "
                       f"ended {100 * stats[3]:.0f}% | grad {norm:.2f} | {(time.time() - t0) / 60:.1f} min")
    if rt.master and args.eval_every and step % args.eval_every == 0:
        tqdm.write(f"step {step:5d} | held-out think hit@1 {held_out_think_score():.1f}")
    if step % args.ckpt_every == 0 and step < args.steps:
        runtime.check_in_sync(policy)
        if rt.master:
            runtime.save_checkpoint(args.out, step, twn, opt, {"args": vars(args)})
bar.close()
runtime.check_in_sync(policy)
# the reward environment must not have moved: re-embed some cached targets and compare
probe = list(range(0, len(keys), max(1, len(keys) // 64)))
drift = (emb.targets([keys[i] for i in probe]).to(rt.device) - cache[probe]).abs().max().item()
if drift > 1e-5:
    raise RuntimeError(f"the global cache went stale: re-embedded targets moved by {drift:.3g}")
if rt.master:
    print(f"stationary reward: {len(probe)} cached targets re-embedded after RL, max change {drift:.1e}")

# -----------------------------------------------------------------------------
# save, then refit the gate: the CoTs changed, so whether thinking helps changed too

if rt.master:
    runtime.save_checkpoint(args.out, step, twn, opt, {"args": vars(args)})
    twn.save(args.out, extra={"sft": saved.get("sft", {}), "rl": vars(args), "steps": step})
if args.gate_queries:
    _, info = fit_gate(twn, proc, rt, pairs, args.out, n=args.gate_queries, budget=args.think_budget,
                       max_cot_tokens=args.max_cot_tokens, seed=args.seed, decoder=decoder,
                       cache=(keys, column, cache.cpu()))  # the embed side is frozen: the reward's cache is the gate's
    if rt.master:
        h = info["held_out"]
        print(f"gate refit: thinking helped {100 * info['win_rate']:.0f}% of queries; held-out hit@1 no-think "
              f"{100 * h['nothink']:.1f}, think {100 * h['think']:.1f}, adaptive {100 * h['adaptive']:.1f} "
              f"at {100 * h['think_rate']:.0f}% thinking")
elif rt.master and os.path.exists(os.path.join(args.init, "gate.json")):
    for name in ("gate.json", "gate.safetensors"):  # keep the SFT gate beside the RL adapters
        shutil.copy(os.path.join(args.init, name), os.path.join(args.out, name))
runtime.teardown()
