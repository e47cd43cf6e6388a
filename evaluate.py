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
`<out>/<mode>/<task>_score.json` (VLM2Vec's layout) and one `results.json` with everything.
"""

import argparse
import glob
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import gate as gate_lib
import model as twn_model
import runtime
from data.collate import Processor
from data.mmeb import load_image_task, load_visdoc

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

    def __init__(self, twn, proc, rt, batch_size, max_cot_tokens, gate=None):
        self.twn, self.proc, self.rt = twn, proc, rt
        self.batch_size, self.max_cot_tokens, self.gate = batch_size, max_cot_tokens, gate

    def _shards(self, n):
        per = math.ceil(n / self.rt.world)
        return range(self.rt.rank * per, min(n, (self.rt.rank + 1) * per))

    def _run(self, items, fn, desc):
        mine = list(self._shards(len(items)))
        outs = []
        for i in tqdm(range(0, len(mine), self.batch_size), desc=desc, leave=False, disable=not self.rt.master):
            chunk = [items[j] for j in mine[i:i + self.batch_size]]
            batch = {k: v.to(self.rt.device) for k, v in self.proc(chunk).items()}
            with torch.no_grad(), self.rt.autocast():
                outs += fn(batch)
        return runtime.gather_objects(outs)

    def targets(self, items):
        """No-think embeddings of candidates / documents: (N, H) float."""
        rows = self._run(items, lambda b: list(self.twn.embed_items(b).float().cpu()), "targets")
        return torch.stack(rows)

    def queries(self, items, modes):
        """Per query: {mode: embedding}, plus the CoT text, its token count and the gate's decision."""
        def fn(batch):
            enc = self.twn.encode(batch)
            pooled, e0 = self.twn.embed(enc)
            # the gate's decision (adaptive), or "yes" for every row (always think), or "no"
            if "adaptive" in modes:
                gate_says = self.gate.decide(pooled)
            else:
                gate_says = torch.full((len(e0),), "think" in modes, dtype=torch.bool, device=e0.device)
            decode = torch.ones_like(gate_says) if "think" in modes else gate_says
            out = [dict(nothink=e0[i].float().cpu(), state=pooled[i].float().cpu(), cot="", tokens=0,
                        thought=bool(gate_says[i])) for i in range(len(e0))]
            rows = decode.nonzero().squeeze(1)
            if len(rows):
                # only the rows that think decode, continuing from their cached encoding
                e1, ids, mask = self.twn.think_embed(enc.select(rows), self.max_cot_tokens)
                texts = self.proc.decode([r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())])
                for k, i in enumerate(rows.tolist()):
                    out[i].update(think=e1[k].float().cpu(), cot=texts[k], tokens=int(mask[k].sum()))
            if "adaptive" in modes:
                for o in out:
                    o["adaptive"] = o["think"] if o["thought"] else o["nothink"]
            return out
        return self._run(items, fn, "queries")


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


def evaluate_image_task(task, emb, modes, limit, image_root):
    queries = load_image_task(task.path, image_root)
    queries = queries[:limit] if limit else queries
    keys = {}
    for q in queries:
        for c in q.candidates:
            keys.setdefault((c.text, c.image), c)
    index = {k: i for i, k in enumerate(keys)}
    cand = emb.targets(list(keys.values()))  # each distinct candidate embedded once, for every mode
    t0 = time.time()
    outs = emb.queries([q.query for q in queries], modes)
    seconds = time.time() - t0
    per_query = []
    for q, o in zip(queries, outs):
        cols = torch.tensor([index[(c.text, c.image)] for c in q.candidates])
        row = dict(meta=q.meta, cot=o["cot"], tokens=o["tokens"], thought=o["thought"], state=o["state"])
        for mode in modes:
            s = cand[cols] @ o[mode]
            row[mode] = hit_at_1(s)
            row[f"{mode}_top"] = torch.argsort(s, descending=True)[:3].tolist()
        per_query.append(row)
    return per_query, seconds, queries


def evaluate_visdoc(task, emb, modes, limit, image_root):
    vd = load_visdoc(task.path, image_root)
    corpus = emb.targets(vd.corpus)
    q_items, q_ids = (vd.queries[:limit], vd.query_ids[:limit]) if limit else (vd.queries, vd.query_ids)
    t0 = time.time()
    outs = emb.queries(q_items, modes)
    seconds = time.time() - t0
    col = {cid: j for j, cid in enumerate(vd.corpus_ids)}
    per_query = []
    for qid, o in zip(q_ids, outs):
        rel = torch.zeros(len(vd.corpus_ids))
        for cid, grade in vd.qrels.get(qid, {}).items():
            rel[col[cid]] = grade
        row = dict(meta={}, cot=o["cot"], tokens=o["tokens"], thought=o["thought"], state=o["state"])
        for mode in modes:
            row[mode] = ndcg_at_k(corpus @ o[mode], rel)
        per_query.append(row)
    return per_query, seconds, None


def summarise(rows, modes, seconds=None):
    """Scores in %, the gate's think rate, and reasoning tokens per query for each thinking mode."""
    n = max(len(rows), 1)
    out = {"n": len(rows)}
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
        keys = [k for k in parts[0] if k not in ("n", "qps")]
        out = {k: sum(p[k] for p in parts) / len(parts) for k in keys}
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
    head = f"{'task':<16}{'meta':<7}{'n':>5}" + "".join(f"{m:>10}" for m in modes) + "".join(f"{e[0]:>10}" for e in extra) + f"{'q/s':>7}"
    print(head)
    print("-" * len(head))

    def line(name, meta, s, qps=True):
        cells = "".join(f"{s[m]:>10.1f}" for m in modes) + "".join(f"{s[key] * scale:>10.1f}" for _, key, scale, _ in extra)
        print(f"{name:<16}{meta:<7}{s['n']:>5}" + cells + (f"{s['qps']:>7.1f}" if qps and "qps" in s else ""))

    for name, r in results.items():
        line(name, r["meta"], r["all"])
        for diff, d in r.get("by_difficulty", {}).items():
            line("  " + diff, "", d, qps=False)


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
    chosen = min(rows, key=lambda r: abs(r[0] - gate.threshold.item()))
    x, y = xy(chosen[1], chosen[2])
    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill="red")
    d.text((pad, 15), f"score vs think rate (threshold {gate.threshold.item():.3f}: {100 * chosen[1]:.0f}% think, "
           f"{chosen[2]:.1f})", fill="black")
    d.text((pad, H - pad + 8), "0% think", fill="black")
    d.text((W - pad - 60, H - pad + 8), "100% think", fill="black")
    d.text((5, pad), f"{hi:.0f}", fill="black")
    d.text((5, H - pad - 10), f"{lo:.0f}", fill="black")
    img.save(os.path.join(out_dir, "sweep.png"))
    return rows


# -----------------------------------------------------------------------------
# fitting the gate on the model's own CoTs (called by train_sft.py and train_rl.py)


def fit_gate(twn, proc, rt, pairs, out_dir, n=2000, budget=None, batch_size=64, max_cot_tokens=96, held_out=0.2, seed=0):
    """Self-supervised gate labels from the model's own CoTs, a class-balanced fit, a held-out threshold.

    Each of n training queries ranks its positive among the global cache of every distinct training
    target, without and with its own greedy CoT; a win is a strictly better rank (gate.win_labels).
    """
    g = torch.Generator().manual_seed(seed)
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:n].tolist()]
    keys = {}
    for p in pairs:
        for t in (p.pos, p.neg):
            if t is not None:
                keys.setdefault((t.text, t.image), t)
    col = {k: j for j, k in enumerate(keys)}
    emb = Embedder(twn, proc, rt, batch_size, max_cot_tokens)
    cache = emb.targets(list(keys.values()))  # (N, H): the global cache, embedded once
    outs = emb.queries([p.query for p in chosen], ["nothink", "think"])
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
        win_rate_by_difficulty={d: labels[[i for i, x in enumerate(difficulty) if x == d]].mean().item()
                                for d in sorted(set(difficulty) - {None})},
        held_out=dict(n=len(hit0), nothink=hit0.mean().item(), think=hit1.mean().item(),
                      adaptive=torch.where(think, hit1, hit0).mean().item(), think_rate=think.float().mean().item(),
                      label_accuracy=((probs >= 0.5).float() == labels[n_fit:]).float().mean().item()))
    if rt.master:
        gate_lib.save(gate, out_dir, info)
    return gate, info


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate TWN on MMEB-V2-style tasks (no-think / think / adaptive)")
    g = parser.add_argument_group("what")
    g.add_argument("--task", default="all", help="task name(s), comma separated, a meta-task (CLS, VQA, RET, GRD, VisDoc) or all")
    g.add_argument("--modes", default="nothink,think", help=f"comma-separated subset of {','.join(MODES)}")
    g.add_argument("--model", default="runs/sft", help="TWN directory written by train_sft.py / train_rl.py")
    g.add_argument("--backbone", default=None, help="backbone directory (default: the one the model was trained on)")
    g.add_argument("--data", default="data/world", help="MMEB-V2 image-task parquet dir, or the mini world")
    g.add_argument("--image-root", default=None, help="root of the image paths in the task files (default: --data)")
    g.add_argument("--limit", type=int, default=0, help="only the first N queries of each task (0: all)")
    g = parser.add_argument_group("how")
    g.add_argument("--batch-size", type=int, default=64, help="items per forward")
    g.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (default: the backbone's)")
    g.add_argument("--max-cot-tokens", type=int, default=96, help="longest CoT the reason adapter may write")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--threshold", type=float, default=None, help="override the gate's saved threshold (0: always think, 1: never)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="directory for per-task score files (default: <model>/eval)")
    g.add_argument("--json", default=None, help="path of results.json (default: <out>/results.json)")
    g.add_argument("--show", type=int, default=0, help="print N example queries per task with CoT and top candidates")
    g.add_argument("--sweep", action="store_true", help="write the score vs think-rate curve over gate thresholds (CSV + PNG)")
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
    emb = Embedder(twn, proc, rt, args.batch_size, args.max_cot_tokens, gate)

    out_dir = args.out or os.path.join(args.model, "eval")
    results, per_task = {}, {}
    for task in select(discover(args.data), args.task):
        run = evaluate_visdoc if task.graded else evaluate_image_task
        rows, seconds, queries = run(task, emb, modes, args.limit, args.image_root or (None if task.graded else args.data))
        r = {"meta": task.meta, "metric": "ndcg_linear@5" if task.graded else "hit@1", "all": summarise(rows, modes, seconds)}
        diffs = sorted({row["meta"].get("difficulty") for row in rows} - {None})
        if diffs:
            r["by_difficulty"] = {d: summarise([x for x in rows if x["meta"].get("difficulty") == d], modes) for d in diffs}
        results[task.name] = r
        if args.sweep:
            probs = gate.prob(torch.stack([row["state"] for row in rows]).to(rt.device)).cpu()
            per_task[task.name] = (probs, torch.tensor([row["nothink"] for row in rows]),
                                   torch.tensor([row["think"] for row in rows]))
        if rt.master:
            for mode in modes:
                os.makedirs(os.path.join(out_dir, mode), exist_ok=True)
                score = {r["metric"].replace("hit@1", "acc"): r["all"][mode] / 100, "num_pred": len(rows)}
                with open(os.path.join(out_dir, mode, f"{task.name}_score.json"), "w") as f:
                    json.dump(score, f, indent=2)
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
