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
            out = [dict(nothink=e0[i].float().cpu(), cot="", tokens=0, thought=bool(gate_says[i]))
                   for i in range(len(e0))]
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


def evaluate_image_task(task, emb, modes, limit):
    queries = load_image_task(task.path, os.path.dirname(os.path.dirname(task.path))
                              if os.path.basename(os.path.dirname(task.path)) == "eval" else os.path.dirname(task.path))
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
        row = dict(meta=q.meta, cot=o["cot"], tokens=o["tokens"], thought=o["thought"])
        for mode in modes:
            s = cand[cols] @ o[mode]
            row[mode] = hit_at_1(s)
            row[f"{mode}_top"] = torch.argsort(s, descending=True)[:3].tolist()
        per_query.append(row)
    return per_query, seconds, queries


def evaluate_visdoc(task, emb, modes, limit):
    vd = load_visdoc(task.path)
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
        row = dict(meta={}, cot=o["cot"], tokens=o["tokens"], thought=o["thought"])
        for mode in modes:
            row[mode] = ndcg_at_k(corpus @ o[mode], rel)
        per_query.append(row)
    return per_query, seconds, None


def summarise(rows, modes, seconds=None):
    n = len(rows)
    out = {"n": n}
    for mode in modes:
        out[mode] = 100 * sum(r[mode] for r in rows) / max(n, 1)
    out["think_rate"] = sum(r["thought"] for r in rows) / max(n, 1)
    out["tokens"] = sum(r["tokens"] for r in rows) / max(n, 1)
    if seconds is not None:
        out["qps"] = n / max(seconds, 1e-9)
    return out


def overall(results, modes):
    """MMEB's way: the mean of per-task scores (macro), overall and per difficulty."""
    def macro(parts):
        out = {k: sum(p[k] for p in parts) / len(parts) for k in (*modes, "think_rate", "tokens")}
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
    head = f"{'task':<16}{'meta':<7}{'n':>5}" + "".join(f"{m:>10}" for m in modes) + f"{'think%':>8}{'tok/q':>7}{'q/s':>7}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        s = r["all"]
        line = f"{name:<16}{r['meta']:<7}{s['n']:>5}" + "".join(f"{s[m]:>10.1f}" for m in modes)
        print(line + f"{100 * s['think_rate']:>8.0f}{s['tokens']:>7.1f}{s.get('qps', 0):>7.1f}")
        for diff, d in r.get("by_difficulty", {}).items():
            line = f"{'  ' + diff:<16}{'':<7}{d['n']:>5}" + "".join(f"{d[m]:>10.1f}" for m in modes)
            print(line + f"{100 * d['think_rate']:>8.0f}{d['tokens']:>7.1f}")


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
    g.add_argument("--limit", type=int, default=0, help="only the first N queries of each task (0: all)")
    g = parser.add_argument_group("how")
    g.add_argument("--batch-size", type=int, default=64, help="items per forward")
    g.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (default: the backbone's)")
    g.add_argument("--max-cot-tokens", type=int, default=96, help="longest CoT the reason adapter may write")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="directory for per-task score files (default: <model>/eval)")
    g.add_argument("--json", default=None, help="path of results.json (default: <out>/results.json)")
    g.add_argument("--show", type=int, default=0, help="print N example queries per task with CoT and top candidates")
    args = parser.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    gate = None
    if "adaptive" in modes:
        raise SystemExit("--modes adaptive needs the think gate (gate.py), which is not built yet; use nothink,think")

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
    emb = Embedder(twn, proc, rt, args.batch_size, args.max_cot_tokens, gate)

    out_dir = args.out or os.path.join(args.model, "eval")
    results = {}
    for task in select(discover(args.data), args.task):
        run = evaluate_visdoc if task.graded else evaluate_image_task
        rows, seconds, queries = run(task, emb, modes, args.limit)
        r = {"meta": task.meta, "metric": "ndcg_linear@5" if task.graded else "hit@1", "all": summarise(rows, modes, seconds)}
        diffs = sorted({row["meta"].get("difficulty") for row in rows} - {None})
        if diffs:
            r["by_difficulty"] = {d: summarise([x for x in rows if x["meta"].get("difficulty") == d], modes) for d in diffs}
        results[task.name] = r
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
        path = args.json or os.path.join(out_dir, "results.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"model": args.model, "backbone": backbone, "modes": modes, "tasks": results}, f, indent=2)
        print(f"\nwrote {path}")
    runtime.teardown()
    return results


if __name__ == "__main__":
    main()
