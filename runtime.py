"""
What the training scripts share: the compute setup (device, DDP, autocast), the cross-rank gather,
the contrastive loss, checkpoints that resume exactly, and the guards against bad data and bad steps.

Not a framework: a handful of functions `train_sft.py` and `train_rl.py` call from their own loops.

DDP is detected from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU,
nccl on CUDA. There is no DistributedDataParallel wrapper: the trainable parameters are a few LoRA
matrices, and the contrastive loss needs every rank's embeddings anyway, so each rank computes the
*global* loss from gathered embeddings and the gradients are summed across ranks once per step
(`sync_grads`), after all micro-steps. See `gather` for why that sum is exactly the single-process
gradient.
"""

import contextlib
import glob
import json
import math
import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora
from data.mmeb import load_train

# -----------------------------------------------------------------------------
# compute setup


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    autocast: object  # a context manager factory: `with rt.autocast():`

    @property
    def master(self):
        return self.rank == 0


def setup(device=None, seed=0) -> Runtime:
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rank, world = 0, 1
    if ddp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    torch.manual_seed(seed)  # same seed on every rank: identical adapter init, no broadcast needed
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext  # fp32 on CPU: exact, and resumes bitwise
    return Runtime(rank, world, device, autocast)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# cross-rank pieces


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`, concatenated in rank order, with this rank's slot still differentiable.

    all_gather returns detached copies; putting the local tensor back in its slot keeps its gradient.
    Every rank then computes the same global loss, but each one's backward only reaches its own
    embeddings; summing the gradients over ranks (`sync_grads`) adds up exactly the single-process
    gradient of that loss.
    """
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def gather_objects(objs: list) -> list:
    if not dist.is_initialized():
        return objs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, objs)
    return [o for part in parts for o in part]


def sync_grads(params):
    """Sum gradients over ranks (one flat all-reduce); see `gather` for why a sum, not a mean."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def check_in_sync(params):
    """Every rank must hold rank 0's parameters (same init, same summed gradients); fail loudly if not."""
    if not dist.is_initialized():
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    if not torch.equal(flat, ref):
        raise RuntimeError(f"rank {dist.get_rank()} diverged from rank 0 (max diff {(flat - ref).abs().max():.3g})")


def mean_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    # subtle: nccl reduces CUDA tensors only (a CPU tensor is an error there), gloo CPU ones
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def batch_indices(n_items, batch_size, step, seed, rank, world):
    """This rank's share of step `step`'s batch: a fixed permutation per epoch, so the data order is a
    pure function of the step and a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = n_items // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    chunk = perm[i * batch_size:(i + 1) * batch_size].tolist()
    local = batch_size // world
    return chunk[rank * local:(rank + 1) * local]


# -----------------------------------------------------------------------------
# the contrastive loss


def info_nce(q, t, pos, same, tau):
    """InfoNCE of queries against targets, with duplicated targets masked out.

    q: (B, H) and t: (N, H) L2-normalised; pos: (B,) the column of each query's positive;
    same: (B, N) True where a column shows the *same* target as the query's positive (e.g. the answer
    "red" for two queries in one batch). Those columns are not negatives: pushing a query away from
    its own answer's duplicate would teach nothing but noise, so they are masked, the positive kept.
    """
    logits = q.float() @ t.float().T / tau  # (B, N)
    own = F.one_hot(pos, t.shape[0]).bool()
    logits = logits.masked_fill(same & ~own, float("-inf"))
    return F.cross_entropy(logits, pos)


def retrieval_logprob(e, cache, pos, tau):
    """log softmax_j(e . cache_j / tau) at each row's positive: (B, H), (N, H), (B,) -> (B,).

    The RL reward: how surely an embedding retrieves its positive from the global cache of targets.
    """
    return torch.log_softmax(e.float() @ cache.float().T / tau, -1).gather(1, pos[:, None]).squeeze(1)


# -----------------------------------------------------------------------------
# bad data and bad steps


def training_files(data_dir):
    """MMEB-train parquet files: those under <data_dir>/train/ if it exists, else under data_dir itself."""
    train_dir = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
    files = sorted(glob.glob(os.path.join(train_dir, "*.parquet")))
    if not files:
        raise SystemExit(f"no training parquet under {train_dir}")
    return files


def load_pairs(files, image_root, proc, on_error="fail"):
    """The training pairs of MMEB-train parquet files, and the problems of the pairs dropped.

    on_error="fail": a bad row raises, naming its file, row and problem (an image that cannot be decoded
    raises when its batch is collated, naming the image). "skip": bad rows are dropped, and so is every
    pair with an item the processor cannot collate, found by collating each distinct item once, up front
    (one decode per training image), since dropping it mid-run would unbalance the ranks' batches.
    """
    skip = on_error == "skip"
    pairs, dropped = [], []
    for path in files:
        skipped = [] if skip else None
        pairs += [(path, p) for p in load_train(path, image_root, skipped)]
        dropped += [problem for _, problem in skipped or []]
    if skip:
        problems = {}  # item -> why it does not collate (None: it does); each distinct item checked once
        kept = []
        for path, p in pairs:
            items = [(name, item) for name, item in (("query", p.query), ("pos", p.pos), ("neg", p.neg)) if item is not None]
            for _, item in items:
                if item not in problems:
                    problems[item] = proc.problem(item)
            bad = [(name, problems[item]) for name, item in items if problems[item]]
            if bad:
                dropped.append(f"{path}: row {p.row}, {bad[0][0]}: {bad[0][1]}")
            else:
                kept.append((path, p))
        pairs = kept
    return [p for _, p in pairs], dropped


class BadStepGuard:
    """Skips optimizer steps whose loss or gradient norm is NaN/inf; stops the run after `limit` in a row.

    One bad batch (an overflow, a degenerate batch) should cost one step, not the run, and must never
    reach the weights: AdamW would carry a NaN into every parameter it touches, for good. Many bad steps
    in a row mean the run has diverged: stop, leaving the last checkpoint as it was.

        guard = BadStepGuard(limit=5)
        if guard.ok(loss, grad_norm):
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)  # the step still counts: data order and LR schedule go on
    """

    def __init__(self, limit=5):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self, *values) -> bool:
        """True if every value is finite on every rank (a collective under DDP, so all ranks decide
        alike); else counts a bad step, and the `limit`-th in a row raises RuntimeError."""
        bad = not all(math.isfinite(float(v)) for v in values)
        if mean_over_ranks(float(bad)) == 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} steps in a row had a NaN/inf loss or gradient norm: the run has "
                               "diverged, stopping (the last checkpoint is untouched; try a lower --lr)")
        return False


# -----------------------------------------------------------------------------
# checkpoints: a complete directory per checkpoint, then an atomic pointer to it


def save_checkpoint(out_dir, step, twn, opt, meta):
    """out/ckpt-<step>/ (adapters, optimizer, RNG) then out/latest -> it; a kill at any moment leaves
    `latest` pointing at a complete checkpoint."""
    name = f"ckpt-{step:07d}"
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    twn.save(path)
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, os.path.join(path, "optimizer.safetensors"))
    lora.write_json(os.path.join(path, "trainer.json"),
                    {"step": step, "param_groups": state["param_groups"], "python_rng": random.getstate(), **meta})
    lora._atomic(os.path.join(out_dir, "latest"), lambda tmp: open(tmp, "w").write(name))
    for old in os.listdir(out_dir):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


# flags of both training scripts that do not change what is learned: a resumed run may change them
FREE_FLAGS = frozenset({"out", "on_error", "gate_queries", "think_budget", "device", "ckpt_every", "log_every",
                        "max_bad_steps"})


def check_same_run(out_dir, saved, args, free):
    """Resuming is only for the run that wrote the checkpoint: a rerun into the same --out with other data,
    seed or recipe would silently continue (or, finished, keep) the old model. `free` names the flags that
    do not change what is learned (FREE_FLAGS and the script's own), which may differ."""
    now = vars(args)
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in sorted(saved.keys() & now.keys())
               if k not in free and saved[k] != now[k]]
    if changed:
        raise SystemExit(f"{out_dir} holds a run with other settings ({'; '.join(changed)}): it would resume "
                         f"that run. Pass another --out, or delete {out_dir} to start over.")


def load_checkpoint(out_dir, twn, opt, args=None, free=()):
    """Restore the latest checkpoint in `out_dir`, if any; returns (step, meta) or (0, None).

    args: this run's flags; a checkpoint written with others (outside `free`, see check_same_run) is
    refused before anything is loaded."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.exists(pointer):
        return 0, None
    path = os.path.join(out_dir, open(pointer).read().strip())
    with open(os.path.join(path, "trainer.json")) as f:
        meta = json.load(f)
    if args is not None:
        check_same_run(out_dir, meta.get("args", {}), args, free)
    twn.load(path)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    state = {}
    for key, value in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    v, internal, gauss = meta["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return meta["step"], meta
