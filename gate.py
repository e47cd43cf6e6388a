"""
The think gate: a small MLP that decides, per input, whether writing a chain-of-thought is worth it.

Paper: Think When Needed (arXiv 2605.14448), the adaptive-think mechanism (claim 3): "for simple
inputs discriminative embeddings already perform well, and redundant reasoning can even mislead the
model". The gate reads the no-think state (the queries' pooled output over the input, which exists
anyway: the no-think embedding is computed first) and predicts the probability that thinking helps.

Self-supervised labels, from the model itself (no human labels): for a training query, rank its
positive among a global cache of target embeddings once with the no-think embedding and once with
the think embedding built on the model's *own* CoT. The query is a *win* (label 1) when thinking turns
a miss into a hit:

    rank0 = #targets scored above the positive without thinking       (0 = retrieved first)
    rank1 = #targets scored above the positive with the model's CoT
    label = 1  iff  min(rank1, top) < min(rank0, top)                 (top = 1: rank1 = 0 < rank0)

Only the first `top` places count because that is what the scores count (hit@1; NDCG@5 would take
top = 5), while the cache holds thousands of targets: a positive that moves from place 40 to 25 is
still a miss, and calling it a win taught the gate noise (README, "The gate": the gate's
ranking of the eval queries went from AUC 0.73 to 0.80). Ties are losses on purpose: a CoT that leaves
the answer where it was only costs tokens.
Thresholds: the default thinks least among the thresholds whose held-out *score* (hit@1 of the
adaptive choice) is as good as the best within noise (a paired sign test, see pick_threshold);
`budget` instead thinks on that fraction of inputs (the most confident).

    gate = Gate(hidden_size)
    fit(gate, states, labels)                          # class-balanced BCE
    gate.threshold.fill_(pick_threshold(gate.prob(held_states), hit0, hit1))
    think = gate.decide(states)                        # (B,) bool
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class Gate(nn.Module):

    def __init__(self, hidden_size, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        self.register_buffer("threshold", torch.tensor(0.5))

    def forward(self, state):
        """(B, H) no-think pooled state -> (B,) logit that thinking helps."""
        return self.net(state.float()).squeeze(-1)

    @torch.no_grad()
    def prob(self, state):
        return torch.sigmoid(self(state))

    @torch.no_grad()
    def decide(self, state):
        """(B,) bool: think? threshold <= 0 always thinks, >= 1 never (whatever sigmoid rounds to)."""
        t = self.threshold.item()
        if t <= 0 or t >= 1:
            return torch.full((state.shape[0],), t <= 0, dtype=torch.bool, device=state.device)
        return self.prob(state) >= t


# -----------------------------------------------------------------------------
# labels


def ranks(scores, pos):
    """scores (B, N) against the target cache, pos (B,) the positive's column -> (B,) targets strictly above it."""
    return (scores > scores.gather(1, pos[:, None])).sum(1)


def win_labels(rank0, rank1, top=1):
    """1 where thinking brought the positive into the first `top` places, else 0 (ties lose)."""
    return (rank1.clamp(max=top) < rank0.clamp(max=top)).float()


# -----------------------------------------------------------------------------
# fitting and thresholds


def fit(gate, states, labels, steps=100, lr=3e-3, weight_decay=1e-2, seed=0):
    """Full-batch AdamW on class-balanced BCE (wins are usually the minority). Few steps: a few thousand
    noisy labels, and a longer fit ranks held-out queries worse (300 steps: AUC 0.76-0.78 against 0.79-0.81).

    The gate's weights are drawn afresh from `seed` first, so a fit depends on its inputs alone, not on
    whatever used the global random state before (a whole SFT run, or none when a finished run is resumed).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in gate.net:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    pos = labels.sum().clamp(min=1)
    pos_weight = (len(labels) - pos) / pos
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    gate.train()
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(gate(states), labels, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gate.eval()
    return loss.item()


def sweep(probs, hit0, hit1):
    """Score vs think rate for every useful threshold: rows (threshold, think_rate, score), score in [0, 1].

    probs (N,) gate probabilities; hit0 / hit1 (N,) 1.0 where the no-think / think embedding retrieves right.
    """
    thresholds = torch.cat([torch.sort(probs.unique()).values, torch.tensor([1.0])])  # 1.0: never think
    rows = []
    for t in thresholds.tolist():
        think, hits = choose(probs, hit0, hit1, t)
        rows.append((t, think.float().mean().item(), hits.mean().item()))
    return rows


def choose(probs, hit0, hit1, t):
    """At threshold t: which inputs think (threshold 1 never does), and each one's hit with that choice."""
    think = probs >= t if t < 1 else torch.zeros_like(probs, dtype=torch.bool)
    return think, torch.where(think, hit1, hit0)


def pick_threshold(probs, hit0, hit1, budget=None):
    """The threshold that thinks least while scoring as well as the best one, or that thinks on `budget` of inputs.

    "As well as" is a paired comparison on the same held-out queries: against the best threshold, the
    cheaper one loses w queries and wins l; if thinking less changed nothing but noise, w - l would be a
    sum of w + l fair coin flips, with standard deviation sqrt(w + l). A threshold is kept when
    w - l <= sqrt(w + l): held-out sets are a thousand or so queries, and a query or two is not a reason to
    think more (the one-standard-error rule of model selection, applied to thinking).
    """
    if budget is not None:
        if budget <= 0:
            return 1.0
        return torch.quantile(probs, 1 - budget).item()
    rows = sweep(probs, hit0, hit1)
    best = max(rows, key=lambda row: (round(row[2], 9), -row[1]))
    top = choose(probs, hit0, hit1, best[0])[1]
    for t, _, _ in sorted(rows, key=lambda row: row[1]):  # least thinking first
        d = top - choose(probs, hit0, hit1, t)[1]
        lost, won = (d > 0).sum().item(), (d < 0).sum().item()
        if lost - won <= (lost + won) ** 0.5:
            return t
    return best[0]


# -----------------------------------------------------------------------------
# files


def save(gate, out_dir, info):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "gate.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in gate.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(out_dir, "gate.safetensors"))
    tmp = os.path.join(out_dir, "gate.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"hidden_size": gate.net[0].normalized_shape[0], "width": gate.net[1].out_features,
                   "threshold": gate.threshold.item(), **info}, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "gate.json"))


def load(out_dir, device="cpu"):
    from safetensors.torch import load_file
    path = os.path.join(out_dir, "gate.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: fit the gate first (python train_sft.py --gate-only --out {out_dir})")
    with open(path) as f:
        info = json.load(f)
    for key, kind in (("hidden_size", int), ("width", int), ("threshold", float)):
        if not isinstance(info.get(key), (kind, int)):
            raise ValueError(f"{path}: {key} must be a number, got {info.get(key)!r}")
    gate = Gate(info["hidden_size"], info["width"])
    gate.load_state_dict(load_file(os.path.join(out_dir, "gate.safetensors")))
    return gate.to(device).eval(), info
