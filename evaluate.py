"""
MMEB-V2-style evaluation of TWN in three modes: never think, always think, think when the gate says so.

Paper: Think When Needed (arXiv 2605.14448), the evaluation of claims 3 and 5: retrieval quality on
MMEB-V2 (hit@1 for image tasks, NDCG@5 for visual documents) and how many reasoning tokens it costs.

    python evaluate.py --task all                        # every task of the mini world, SFT model in runs/sft
    python evaluate.py --task VQA --modes nothink,think  # one meta-task (CLS, VQA, RET, GRD, VisDoc)
    python evaluate.py --task ColorVQA --limit 50 --show 3
    python evaluate.py --model runs/twn-2b --backbone /models/Qwen2-VL-2B-Instruct --data /data/MMEB-V2/image-tasks --task all
    torchrun --nproc_per_node=8 evaluate.py ...          # queries and candidates sharded over ranks

Each query ranks its *own* candidates (MMEB's image tasks; gold at index 0); a visual-document query
ranks the whole corpus against graded qrels. A tie with the gold candidate counts as a miss. Target
embeddings are computed once per task (deduplicated) and shared by every mode. Writes
`<out>/<mode>/<task>_score.json` (VLM2Vec's layout), `<out>/<task>_summary.json` and one `results.json`
with everything.

A killed run resumes task by task: a task whose files are already in --out is reused, not redone, when
the flags, the model's files and the task's files are those it was scored with (`--overwrite` redoes
it). A bad row (unreadable image, empty text, broken schema) stops the run with its file, row and
problem; `--on-error skip` leaves it out instead, counted in the table and listed with its problem in
results.json (never scored as right or wrong).
"""

import argparse
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import gate as gate_lib
import lora
import model as twn_model
import runtime
from data.collate import Processor
from data.mmeb import load_image_task, load_visdoc
from decode import FastDecoder

MODES = ("nothink", "think", "adaptive")

# MMEB-V2's image tasks by meta-task (VLM2Vec); the mini world's tasks come from its world.json
MMEB_META = {
    "CLS": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
            "ImageNet-R", "ObjectNet", "Country211"],
    "VQA": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz",
            "GQA", "TextVQA"],
    "RET": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
            "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
    "GRD": ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
}


@dataclass
class Task:
    name: str
    meta: str           # CLS / VQA / RET / GRD / VisDoc
    path: str           # parquet file or BEIR directory
    graded: bool        # visual documents: NDCG@5 over a corpus


def discover(data_dir):
    """Tasks under a data directory: `eval/*.parquet` or `*.parquet` image tasks, BEIR subdirectories."""
    meta_of = {name: meta for meta, names in MMEB_META.items() for name in names}
    world_json = os.path.join(data_dir, "world.json")
    if os.path.exists(world_json):
        with open(world_json) as f:
            meta_of.update(json.load(f).get("meta_tasks", {}))
    root = os.path.join(data_dir, "eval") if os.path.isdir(os.path.join(data_dir, "eval")) else data_dir
    tasks = [Task(os.path.basename(p)[:-8], meta_of.get(os.path.basename(p)[:-8], "other"), p, False)
             for p in sorted(glob.glob(os.path.join(root, "*.parquet")))]
    for d in sorted(glob.glob(os.path.join(root, "*", ""))):
        if any(glob.glob(os.path.join(d, "qrels*"))):
            tasks.append(Task(os.path.basename(d.rstrip("/")), "VisDoc", d.rstrip("/"), True))
    return tasks


def select(tasks, spec):
    if spec == "all":
        return tasks
    wanted = spec.split(",")
    chosen = [t for t in tasks if t.name in wanted or t.meta in wanted]
    if not chosen:
        names = ", ".join(t.name for t in tasks)
        raise SystemExit(f"--task {spec}: no such task or meta-task; have: all, CLS, VQA, RET, GRD, VisDoc, {names}")
    return chosen


# -----------------------------------------------------------------------------
# embedding passes


class Embedder:
    """Batches items through the model, optionally sharded over ranks; results in input order on every rank."""

    def __init__(self, twn, proc, rt, batch_size, max_cot_tokens, gate=None, decoder=None):
        self.twn, self.proc, self.rt = twn, proc, rt
        self.batch_size, self.max_cot_tokens, self.gate = batch_size, max_cot_tokens, gate
        self.decoder = decoder  # None: TWN.write_cot, the reference loop; else a decode.FastDecoder

    def _shards(self, n):
        per = math.ceil(n / self.rt.world)
        return range(self.rt.rank * per, min(n, (self.rt.rank + 1) * per))

    def _run(self, items, fn, desc, where=None, skipped=None, finish=None):
        """fn over batches of items; outputs in input order (None for an item left out).

        where: a name per item for error messages (file, row, column); skipped: None, and an item that
        does not collate (a corrupt image, ...) raises, or a dict that collects {index: problem} of the
        items left out. finish: called after the last batch (outputs may be completed in place until then).
        """
        mine = list(self._shards(len(items)))
        outs, bad = [], {}
        for i in tqdm(range(0, len(mine), self.batch_size), desc=desc, leave=False, disable=not self.rt.master):
            idx = mine[i:i + self.batch_size]
            batch, problems = self._collate(items, idx, where, skipped is not None)
            bad.update(problems)
            if batch is None:
                outs += [None] * len(idx)
                continue
            with torch.no_grad(), self.rt.autocast():
                done = iter(fn({k: v.to(self.rt.device) for k, v in batch.items()}))
            outs += [None if j in problems else next(done) for j in idx]
        if finish:
            finish()
        if skipped is not None:
            skipped.update(runtime.gather_objects(list(bad.items())))
        return runtime.gather_objects(outs)

    def _collate(self, items, idx, where, skip):
        """The batch of items[idx], and {index: problem} of those left out of it.

        One bad item spoils the whole batch, so a failed batch is collated again item by item to find it:
        a cost paid only when something is wrong.
        """
        try:
            return self.proc([items[j] for j in idx]), {}
        except ValueError:
            problems = {j: p for j in idx if (p := self.proc.problem(items[j]))}
            if not problems:
                raise  # the items collate one by one but not together: not a bad-input problem
        if not skip:
            j = min(problems)
            raise ValueError(f"{where[j] if where else f'item {j}'}: {problems[j]}")
        good = [j for j in idx if j not in problems]
        return (self.proc([items[j] for j in good]) if good else None), problems

    def targets(self, items, where=None, skipped=None):
        """No-think embeddings of candidates / documents: (N, H) float (see _run for where / skipped;
        the row of an item left out is zeros: drop it, never score it)."""
        rows = self._run(items, lambda b: list(self.twn.embed_items(b).float().cpu()), "targets", where, skipped)
        zero = torch.zeros(self.twn.queries.shape[-1])
        return torch.stack([zero if r is None else r for r in rows])

    def queries(self, items, modes, where=None, skipped=None):
        """Per query: {mode: embedding}, plus the CoT text, its token count and the gate's decision
        (None for a query left out; see _run for where / skipped).

        The rows that think are not decoded batch by batch: their encodings wait in a pool until it holds
        a full batch, then decode together. A decode step costs about the same for 8 rows as for 64 (it
        reads the same weights), so with a gate that thinks on a quarter of the queries, decoding per
        batch would pay full price for a quarter-full batch; pooled, thinking costs what it saves.
        """
        pending = []  # (encoded State of rows that think, their output dicts), waiting for a full batch

        def think(final=False):
            waiting = sum(len(outs) for _, outs in pending)
            if not waiting or (waiting < self.batch_size and not final):
                return
            enc, rows = twn_model.State.stack([s for s, _ in pending]), [o for _, outs in pending for o in outs]
            pending.clear()
            with torch.no_grad(), self.rt.autocast():
                # continuing from each row's cached encoding: the input is never run again
                e1, ids, mask = self.twn.think_embed(enc, self.max_cot_tokens, decode=self.decoder)
            texts = self.proc.decode([r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())])
            for k, o in enumerate(rows):
                o.update(think=e1[k].float().cpu(), cot=texts[k], tokens=int(mask[k].sum()))
                if "adaptive" in modes:
                    o["adaptive"] = o["think"] if o["thought"] else o["nothink"]

        def fn(batch):
            enc, pooled, e0 = self.twn.encode_embed(batch)
            # the gate's decision (adaptive), or "yes" for every row (always think), or "no"
            if "adaptive" in modes:
                gate_says = self.gate.decide(pooled)
            else:
                gate_says = torch.full((len(e0),), "think" in modes, dtype=torch.bool, device=e0.device)
            decode = torch.ones_like(gate_says) if "think" in modes else gate_says
            out = [dict(nothink=e0[i].float().cpu(), state=pooled[i].float().cpu(), cot="", tokens=0,
                        thought=bool(gate_says[i])) for i in range(len(e0))]
            if "adaptive" in modes:
                for o in out:
                    o["adaptive"] = o["nothink"]  # until it thinks, if the gate sent it to
            rows = decode.nonzero().squeeze(1)
            if len(rows):
                pending.append((enc.select(rows), [out[i] for i in rows.tolist()]))
                think()
            return out
        return self._run(items, fn, "queries", where, skipped, finish=lambda: think(final=True))


# -----------------------------------------------------------------------------
# metrics


def hit_at_1(scores):
    """scores: (C,) over a query's own candidates, gold at 0. Strictly above every other: a tie is a miss."""
    return float(scores[0] > scores[1:].max()) if len(scores) > 1 else 1.0


def ndcg_at_k(scores, rel, k=5):
    """Linear-gain NDCG@k (VLM2Vec's ndcg_linear@5): scores (N,) over the corpus, rel (N,) graded relevance."""
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    disc = 1 / torch.log2(torch.arange(2, k + 2, dtype=torch.float))
    dcg = (rel[top] * disc[:len(top)]).sum()
    ideal = (torch.sort(rel, descending=True).values[:k] * disc[:min(k, len(rel))]).sum()
    return float(dcg / ideal) if ideal > 0 else 0.0


# -----------------------------------------------------------------------------
# one task


def evaluate_image_task(task, emb, modes, limit, image_root, skipped=None):
    """Hit@1 of each query over its own candidates, on the first `limit` rows of the file (0: all).

    skipped: None, and a bad row raises an error naming the file, the row and the problem; or a list
    that collects (row, message) of the rows left out, when read or when embedded. A row that loses
    its query or any candidate is left out: it can be scored neither right nor wrong.
    """
    queries = load_image_task(task.path, image_root, skipped)
    if limit:
        queries = [q for q in queries if q.row < limit]
        skipped = skipped if skipped is None else [s for s in skipped if s[0] < limit]
    keys, where = {}, {}
    for q in queries:
        for j, c in enumerate(q.candidates):
            keys.setdefault((c.text, c.image), c)
            where.setdefault((c.text, c.image), f"{task.path}: row {q.row}, candidate {j}")
    index = {k: i for i, k in enumerate(keys)}
    bad = None if skipped is None else {}
    cand = emb.targets(list(keys.values()), list(where.values()), bad)  # each distinct candidate once, for every mode
    if bad:
        lost = {q.row: next((f"candidate {j}: {bad[index[(c.text, c.image)]]}" for j, c in enumerate(q.candidates)
                             if index[(c.text, c.image)] in bad), None) for q in queries}
        skipped += [(row, f"{task.path}: row {row}, {problem}") for row, problem in lost.items() if problem]
        queries = [q for q in queries if not lost[q.row]]
    bad = None if skipped is None else {}
    t0 = time.time()
    outs = emb.queries([q.query for q in queries], modes, [f"{task.path}: row {q.row}, query" for q in queries], bad)
    seconds = time.time() - t0
    if bad:
        skipped += [(queries[k].row, f"{task.path}: row {queries[k].row}, query: {bad[k]}") for k in sorted(bad)]
        queries, outs = [q for k, q in enumerate(queries) if k not in bad], [o for o in outs if o is not None]
    per_query = []
    for q, o in zip(queries, outs):
        cols = torch.tensor([index[(c.text, c.image)] for c in q.candidates])
        row = dict(meta=q.meta, cot=o["cot"], tokens=o["tokens"], thought=o["thought"], state=o["state"])
        for mode in modes:
            s = cand[cols] @ o[mode]
            row[mode] = hit_at_1(s)
            row[f"{mode}_top"] = torch.argsort(s, descending=True)[:3].tolist()
        per_query.append(row)
    return per_query, seconds, queries, skipped


def evaluate_visdoc(task, emb, modes, limit, image_root, skipped=None):
    """NDCG@5 of each query over the whole corpus (skipped: as in evaluate_image_task).

    Only queries with qrels are scored: a BEIR queries file may also hold other splits' queries. A page
    left out takes every query it is relevant to with it; as a distractor, it is simply not ranked.
    """
    vd = load_visdoc(task.path, image_root, skipped=skipped)
    bad = None if skipped is None else {}
    corpus = emb.targets(vd.corpus, [f"{task.path}: corpus '{cid}'" for cid in vd.corpus_ids], bad)
    gone = {vd.corpus_ids[j]: problem for j, problem in (bad or {}).items()}
    corpus_ids = [cid for cid in vd.corpus_ids if cid not in gone]
    corpus = corpus[[j for j, cid in enumerate(vd.corpus_ids) if cid not in gone]]
    q_ids = [qid for qid in vd.query_ids if qid in vd.qrels]
    q_ids = q_ids[:limit] if limit else q_ids
    for qid in q_ids:
        lost = [cid for cid in vd.qrels[qid] if cid in gone]
        if lost:
            skipped.append((None, f"{task.path}: query '{qid}' left out: its relevant page '{lost[0]}' was: {gone[lost[0]]}"))
    q_ids = [qid for qid in q_ids if not any(cid in gone for cid in vd.qrels[qid])]
    item = dict(zip(vd.query_ids, vd.queries))
    bad = None if skipped is None else {}
    t0 = time.time()
    outs = emb.queries([item[qid] for qid in q_ids], modes, [f"{task.path}: query '{qid}'" for qid in q_ids], bad)
    seconds = time.time() - t0
    if bad:
        skipped += [(None, f"{task.path}: query '{q_ids[k]}': {bad[k]}") for k in sorted(bad)]
        q_ids, outs = [qid for k, qid in enumerate(q_ids) if k not in bad], [o for o in outs if o is not None]
    col = {cid: j for j, cid in enumerate(corpus_ids)}
    per_query = []
    for qid, o in zip(q_ids, outs):
        rel = torch.zeros(len(corpus_ids))
        for cid, grade in vd.qrels.get(qid, {}).items():
            rel[col[cid]] = grade
        row = dict(meta={}, cot=o["cot"], tokens=o["tokens"], thought=o["thought"], state=o["state"])
        for mode in modes:
            row[mode] = ndcg_at_k(corpus @ o[mode], rel)
        per_query.append(row)
    return per_query, seconds, None, skipped


def summarise(rows, modes, seconds=None):
    """Scores in %, the gate's think rate, and reasoning tokens per query for each thinking mode."""
    n = max(len(rows), 1)
    out = {"n": len(rows)}
    if not rows:
        return out  # every row skipped: no score, rather than a score of 0
    for mode in modes:
        out[mode] = 100 * sum(r[mode] for r in rows) / n
    out["think_rate"] = sum(r["thought"] for r in rows) / n
    if "think" in modes:
        out["tokens_think"] = sum(r["tokens"] for r in rows) / n  # every query decoded
    if "adaptive" in modes:
        out["tokens_adaptive"] = sum(r["tokens"] * r["thought"] for r in rows) / n  # only those the gate sent
    if seconds is not None:
        out["qps"] = len(rows) / max(seconds, 1e-9)
    return out


def overall(results, modes):
    """MMEB's way: the mean of per-task scores (macro), overall and per difficulty."""
    def macro(parts):
        scored = [p for p in parts if p["n"]]  # a task with every row skipped has no score to average
        keys = [k for k in (scored[0] if scored else {}) if k not in ("n", "qps", "skipped")]
        out = {k: sum(p[k] for p in scored) / len(scored) for k in keys}
        if any("skipped" in p for p in parts):
            out["skipped"] = sum(p.get("skipped", 0) for p in parts)
        return dict(n=sum(p["n"] for p in parts), **out)
    r = {"meta": "", "all": macro([t["all"] for t in results.values()])}
    diffs = sorted({d for t in results.values() for d in t.get("by_difficulty", {})})
    if diffs:
        r["by_difficulty"] = {d: macro([t["by_difficulty"][d] for t in results.values() if d in t.get("by_difficulty", {})])
                              for d in diffs}
    return r


# -----------------------------------------------------------------------------
# printing


def print_table(results, modes):
    extra = [("think%", "think_rate", 100, "adaptive"), ("tok think", "tokens_think", 1, "think"),
             ("tok adapt", "tokens_adaptive", 1, "adaptive")]
    extra = [e for e in extra if e[3] in modes]
    skips = any(r["all"].get("skipped") for r in results.values())  # a column only when rows were skipped
    head = (f"{'task':<16}{'meta':<7}{'n':>5}" + (f"{'skip':>6}" if skips else "") + "".join(f"{m:>10}" for m in modes)
            + "".join(f"{e[0]:>10}" for e in extra) + f"{'q/s':>7}")
    print(head)
    print("-" * len(head))

    def cell(s, key, scale=1):
        return f"{s[key] * scale:>10.1f}" if key in s else f"{'-':>10}"  # '-': every row skipped

    def line(name, meta, s, qps=True):
        cells = "".join(cell(s, m) for m in modes) + "".join(cell(s, key, scale) for _, key, scale, _ in extra)
        skip = f"{s.get('skipped', ''):>6}" if skips else ""
        print(f"{name:<16}{meta:<7}{s['n']:>5}" + skip + cells + (f"{s['qps']:>7.1f}" if qps and "qps" in s else ""))

    for name, r in results.items():
        line(name, r["meta"], r["all"])
        for diff, d in r.get("by_difficulty", {}).items():
            line("  " + diff, "", d, qps=False)
    for name, r in results.items():
        if r.get("skipped"):
            print(f"{name}: {len(r['skipped'])} rows skipped (all in results.json), the first: {r['skipped'][0]['problem']}")


def write_sweep(per_task, gate, out_dir):
    """Score vs think rate over gate thresholds, macro-averaged over tasks: sweep.csv and sweep.png."""
    from PIL import Image, ImageDraw

    curves = {name: gate_lib.sweep(p, s0, s1) for name, (p, s0, s1) in per_task.items()}
    grid = sorted({t for c in curves.values() for t, _, _ in c})
    rows = []
    for t in grid:
        rate = score = 0.0
        for name, (p, s0, s1) in per_task.items():
            think = p >= t if t < 1 else torch.zeros_like(p, dtype=torch.bool)
            rate += think.float().mean().item() / len(per_task)
            score += 100 * torch.where(think, s1, s0).mean().item() / len(per_task)
        rows.append((t, rate, score))
    with open(os.path.join(out_dir, "sweep.csv"), "w") as f:
        f.write("threshold,think_rate,score\n")
        f.writelines(f"{t:.6f},{r:.4f},{sc:.3f}\n" for t, r, sc in rows)
    # a plain PIL plot: score (y) against think rate (x); the saved threshold is the red dot
    W, H, pad = 640, 420, 50
    lo, hi = min(r[2] for r in rows) - 1, max(r[2] for r in rows) + 1
    xy = lambda rate, sc: (pad + rate * (W - 2 * pad), H - pad - (sc - lo) / (hi - lo) * (H - 2 * pad))
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    pts = sorted((xy(r, sc) for _, r, sc in rows))
    d.line(pts, fill="navy", width=2)
    # the grid point that thinks on exactly the queries the gate does (its threshold lies between grid points)
    chosen = min((r for r in rows if r[0] >= gate.threshold.item()), key=lambda r: r[0], default=rows[-1])
    x, y = xy(chosen[1], chosen[2])
    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill="red")
    d.text((pad, 15), f"score vs think rate (threshold {gate.threshold.item():.3g}: {100 * chosen[1]:.0f}% think, "
           f"{chosen[2]:.1f})", fill="black")
    d.text((pad, H - pad + 8), "0% think", fill="black")
    d.text((W - pad - 60, H - pad + 8), "100% think", fill="black")
    d.text((5, pad), f"{hi:.0f}", fill="black")
    d.text((5, H - pad - 10), f"{lo:.0f}", fill="black")
    img.save(os.path.join(out_dir, "sweep.png"))
    return rows


# -----------------------------------------------------------------------------
# fitting the gate on the model's own CoTs (called by train_sft.py and train_rl.py)


def global_cache(emb, pairs):
    """Every distinct training target (positives and hard negatives), embedded once without thinking.

    Distinct by content: a target's text and the bytes of its image file. The same picture can sit under
    several paths (the mini world writes a recurring scene to a file of its own, and a crop of a red
    circle is the same picture in every scene: 6,786 paths, 4,563 contents); as twins in the cache they
    embed equally, and whether a positive ranks above its twin would be decided by rounding (README, "The gate").
    Returns (targets, column of each target's (text, image) key, (N, H) embeddings): the gate's label
    pool and the RL reward's environment.
    """
    digests = {}

    def content(t):
        if t.image and t.image not in digests:
            with open(t.image, "rb") as f:
                digests[t.image] = hashlib.sha256(f.read()).hexdigest()
        return t.text, digests.get(t.image)

    first, column = {}, {}  # content -> its first target; (text, image) -> column
    for p in pairs:
        for t in (p.pos, p.neg):
            if t is not None:
                c = first.setdefault(content(t), (len(first), t))[0]
                column[(t.text, t.image)] = c
    targets = [t for _, t in first.values()]
    return targets, column, emb.targets(targets)


def fit_gate(twn, proc, rt, pairs, out_dir, n=4000, budget=None, batch_size=64, max_cot_tokens=96, held_out=0.35, seed=0,
             decoder=None, cache=None):
    """Self-supervised gate labels from the model's own CoTs, a class-balanced fit, a held-out threshold.

    A third of the queries are held out for the threshold: it is picked by a sign test whose noise
    shrinks with their number (with 800 of 4000, one seed's gate settled at 15 % thinking, 2.5 points
    below always-think on the eval set; README, "The gate").

    Each of n training queries ranks its positive among the global cache of every distinct training
    target, without and with its own greedy CoT; a win is a miss that thinking turns into a hit (gate.win_labels).
    decoder: the caller's FastDecoder to reuse (its cache and CUDA graph); None makes one.
    cache: the caller's `global_cache(...)` result, when the embed side has not moved since it was made
    (train_rl.py's, checked stationary); None embeds every training target again.
    """
    g = torch.Generator().manual_seed(seed)
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:n].tolist()]
    emb = Embedder(twn, proc, rt, batch_size, max_cot_tokens, decoder=decoder or fast_decoder(twn, rt.device))
    keys, col, cache = cache or global_cache(emb, pairs)
    # decoded in order of their text, so that a batch holds one task's questions: a batch decodes until
    # its longest CoT ends, and CoT lengths differ more across tasks than within (same CoTs, ~13 % faster)
    order = sorted(range(len(chosen)), key=lambda i: chosen[i].query.text)
    outs = [None] * len(chosen)
    for i, o in zip(order, emb.queries([chosen[i].query for i in order], ["nothink", "think"])):
        outs[i] = o
    pos = torch.tensor([col[(p.pos.text, p.pos.image)] for p in chosen])
    rank0 = gate_lib.ranks(torch.stack([o["nothink"] for o in outs]) @ cache.T, pos)
    rank1 = gate_lib.ranks(torch.stack([o["think"] for o in outs]) @ cache.T, pos)
    labels = gate_lib.win_labels(rank0, rank1)
    states = torch.stack([o["state"] for o in outs])
    n_fit = int(len(chosen) * (1 - held_out))
    gate = gate_lib.Gate(states.shape[1])
    gate_lib.fit(gate, states[:n_fit], labels[:n_fit], seed=seed)
    probs = gate.prob(states[n_fit:])
    hit0, hit1 = (rank0[n_fit:] == 0).float(), (rank1[n_fit:] == 0).float()
    gate.threshold.fill_(gate_lib.pick_threshold(probs, hit0, hit1, budget))
    think = gate.decide(states[n_fit:])
    difficulty = [p.meta.get("difficulty") for p in chosen]
    info = dict(
        queries=len(chosen), cache=len(keys), win_rate=labels.mean().item(), budget=budget,
        mean_rank=dict(nothink=rank0.float().mean().item(), think=rank1.float().mean().item()),  # 0: first of the cache
        win_rate_by_difficulty={d: labels[[i for i, x in enumerate(difficulty) if x == d]].mean().item()
                                for d in sorted(set(difficulty) - {None})},
        held_out=dict(n=len(hit0), nothink=hit0.mean().item(), think=hit1.mean().item(),
                      adaptive=torch.where(think, hit1, hit0).mean().item(), think_rate=think.float().mean().item(),
                      label_accuracy=((probs >= 0.5).float() == labels[n_fit:]).float().mean().item()))
    if rt.master:
        gate_lib.save(gate, out_dir, info)
    return gate, info


def fast_decoder(twn, device):
    """decode.FastDecoder: one CUDA graph per token on a GPU, eager on a CPU (where folding the reason
    adapter into the weights alone makes it ~1.5x the reference loop: README, "Speed")."""
    return FastDecoder(twn, mode="graph" if device.type == "cuda" else "eager")


def describe(item):
    return os.path.relpath(item.image) if item.image else item.text


def show_examples(task, rows, queries, modes, n):
    print(f"\n--- {task.name}: {n} examples ---")
    for row, q in list(zip(rows, queries))[:n]:
        print(f"query : {q.query.text.replace('<|vision_start|><|image_pad|><|vision_end|>', '<image> ')}")
        print(f"gold  : {describe(q.candidates[0])}  [{q.meta.get('difficulty', '')}]")
        if row["cot"]:
            print(f"CoT   : {row['cot']}  ({row['tokens']} tokens; thinking chosen: {row['thought']})")
        for mode in modes:
            top = [describe(q.candidates[i]) for i in row[f"{mode}_top"]]
            print(f"{mode:<8}: {'right' if row[mode] else 'wrong'}; top 3: {top}")
        print()


def stamp(*paths):
    """{file: [size, modification time]} of every file at or under `paths` (missing ones left out): what
    tells a saved result from a stale one. Retraining the model or regenerating a task file changes it."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        elif os.path.exists(path):
            files.append(path)
    return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


def finished(out_dir, task, modes, settings):
    """The result an earlier run saved for `task` with the same settings, if it scored every mode in
    `modes` (VLM2Vec's resume: a score file per mode; our summary beside them holds the numbers)."""
    summary = os.path.join(out_dir, f"{task.name}_summary.json")
    scores = [os.path.join(out_dir, mode, f"{task.name}_score.json") for mode in modes]
    if not all(os.path.exists(path) for path in [summary, *scores]):
        return None
    try:
        with open(summary) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: redo the task
    result = saved.get("result") if isinstance(saved, dict) else None
    if not isinstance(result, dict) or saved.get("settings") != settings or not all(m in result.get("all", {}) for m in modes):
        return None
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate TWN on MMEB-V2-style tasks (no-think / think / adaptive)")
    g = parser.add_argument_group("what")
    g.add_argument("--task", default="all", help="task name(s), comma separated, a meta-task (CLS, VQA, RET, GRD, VisDoc) or all")
    g.add_argument("--modes", default="nothink,think", help=f"comma-separated subset of {','.join(MODES)}")
    g.add_argument("--model", default="runs/sft", help="TWN directory written by train_sft.py / train_rl.py")
    g.add_argument("--backbone", default=None, help="backbone directory (default: the one the model was trained on)")
    g.add_argument("--data", default="data/world", help="MMEB-V2 image-task parquet dir, or the mini world")
    g.add_argument("--image-root", default=None, help="root of the image paths in the task files (default: --data)")
    g.add_argument("--limit", type=int, default=0, help="only the first N rows of each task (0: all)")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="a bad row (unreadable image, "
                   "empty text, broken schema): fail stops with its file, row and problem; skip leaves it out, "
                   "counted in the table and listed in results.json")
    g = parser.add_argument_group("how")
    g.add_argument("--batch-size", type=int, default=64, help="items per forward")
    g.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (default: the backbone's)")
    g.add_argument("--max-cot-tokens", type=int, default=96, help="longest CoT the reason adapter may write")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--threshold", type=float, default=None, help="override the gate's saved threshold (0: always think, 1: never)")
    g.add_argument("--fast-decode", choices=["on", "off"], default="on",
                   help="write CoTs with decode.FastDecoder (static cache; on CUDA one CUDA graph per token) instead "
                        "of the reference loop TWN.write_cot (the same tokens in fp32)")
    g.add_argument("--fuse-embed", choices=["on", "off"], default="on",
                   help="run the embed adapter on a copy of the weights with it folded in (TWN.fuse): the no-think "
                        "path at the plain backbone's speed, for one more copy of the LM's projection weights")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="directory for per-task score files (default: <model>/eval)")
    g.add_argument("--json", default=None, help="path of results.json (default: <out>/results.json)")
    g.add_argument("--show", type=int, default=0, help="print N example queries per task with CoT and top candidates")
    g.add_argument("--sweep", action="store_true", help="write the score vs think-rate curve over gate thresholds "
                   "(CSV + PNG; redoes every task, it needs the per-query gate states)")
    g.add_argument("--overwrite", action="store_true", help="redo tasks already scored in --out with the same "
                   "flags, model and task files (by default they are reused, so a killed run resumes)")
    args = parser.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")

    rt = runtime.setup(args.device)
    with open(os.path.join(args.model, "twn.json")) as f:
        saved = json.load(f)
    backbone = args.backbone or saved.get("sft", {}).get("backbone")
    if not backbone:
        raise SystemExit(f"{args.model}/twn.json names no backbone: pass --backbone")
    proc = Processor.from_pretrained(backbone, max_pixels=args.max_pixels)
    twn = twn_model.from_pretrained(backbone, twn_model.read_config(args.model), tokenizer=proc.tokenizer, device=rt.device)
    twn.load(args.model)
    twn.eval()
    if args.fuse_embed == "on":
        twn.fuse("embed")
    gate = None
    if "adaptive" in modes or args.sweep:
        try:
            gate, _ = gate_lib.load(args.model, rt.device)
        except FileNotFoundError as e:
            raise SystemExit(f"--modes adaptive / --sweep: {e}")
        if args.threshold is not None:
            gate.threshold.fill_(args.threshold)
    if args.sweep and not {"nothink", "think"} <= set(modes):
        raise SystemExit("--sweep needs --modes with nothink and think (it replays the gate over both)")
    decoder = None if args.fast_decode == "off" else fast_decoder(twn, rt.device)
    emb = Embedder(twn, proc, rt, args.batch_size, args.max_cot_tokens, gate, decoder)

    out_dir = args.out or os.path.join(args.model, "eval")
    # what a saved task result depends on: these flags, the model's files and the task's own files (a
    # task of the same name from another --data, or the model retrained, is scored again)
    flags = {k: getattr(args, k) for k in ("limit", "max_pixels", "max_cot_tokens", "threshold", "on_error")}
    model_files = stamp(*(os.path.join(args.model, f) for f in
                          ("twn.json", "reasoning", "embedding", "gate.json", "gate.safetensors")))
    results, per_task = {}, {}
    for task in select(discover(args.data), args.task):
        settings = {**flags, "backbone": backbone, "image_root": args.image_root or args.data,
                    "model": model_files, "task": stamp(task.path)}
        done = None if args.overwrite or args.sweep else finished(out_dir, task, modes, settings)
        if done:
            if rt.master:
                print(f"{task.name}: scored before, reusing {out_dir}/{task.name}_summary.json (--overwrite redoes it)")
            results[task.name] = done
            continue
        run = evaluate_visdoc if task.graded else evaluate_image_task
        skipped = [] if args.on_error == "skip" else None
        rows, seconds, queries, skipped = run(task, emb, modes, args.limit,
                                              args.image_root or (None if task.graded else args.data), skipped)
        r = {"meta": task.meta, "metric": "ndcg_linear@5" if task.graded else "hit@1", "all": summarise(rows, modes, seconds)}
        r["all"]["skipped"] = len(skipped or [])
        if skipped:
            r["skipped"] = [{"row": row, "problem": problem} for row, problem in skipped]
        diffs = sorted({row["meta"].get("difficulty") for row in rows} - {None})
        if diffs:
            r["by_difficulty"] = {d: summarise([x for x in rows if x["meta"].get("difficulty") == d], modes) for d in diffs}
        results[task.name] = r
        if args.sweep and rows:
            probs = gate.prob(torch.stack([row["state"] for row in rows]).to(rt.device)).cpu()
            per_task[task.name] = (probs, torch.tensor([row["nothink"] for row in rows]),
                                   torch.tensor([row["think"] for row in rows]))
        if rt.master:
            for mode in modes if rows else []:  # no score files without a score: the task is redone next time
                os.makedirs(os.path.join(out_dir, mode), exist_ok=True)
                score = {r["metric"].replace("hit@1", "acc"): r["all"][mode] / 100, "num_pred": len(rows)}
                lora.write_json(os.path.join(out_dir, mode, f"{task.name}_score.json"), score)
            # written last and atomically: its presence means the task is complete
            os.makedirs(out_dir, exist_ok=True)
            lora.write_json(os.path.join(out_dir, f"{task.name}_summary.json"), {"settings": settings, "result": r})
            if args.show and queries:
                show_examples(task, rows, queries, modes, args.show)
    if rt.master:
        results["overall"] = overall(results, modes)
        print_table(results, modes)
        if args.sweep:
            write_sweep(per_task, gate, out_dir)
            print(f"wrote {out_dir}/sweep.csv and sweep.png (score vs think rate over gate thresholds)")
        path = args.json or os.path.join(out_dir, "results.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"model": args.model, "backbone": backbone, "modes": modes, "tasks": results}, f, indent=2)
        print(f"\nwrote {path}")
    runtime.teardown()
    return results


if __name__ == "__main__":
    main()
