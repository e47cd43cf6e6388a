"""
Inference speed of TWN beside the pipeline a user would write with HF: no-think, always-think, adaptive.

Paper: Think When Needed (arXiv 2605.14448), claim 3: thinking only when it helps saves reasoning tokens.
What that saves depends on what a thought costs, so this measures it, side by side in one run:

  (a) naive HF: `generate` the CoT with the reason adapter active, then a second full forward over
      [input, CoT, K query tokens] with the embed adapter (the vision tower and the input run twice);
  (b) twn: the input is encoded once, the K queries in the same forward (the no-think embedding; also
      timed as a second pass over the input's KV, as before `TWN.encode_embed`); the CoT continues from it
      (reference loop `TWN.write_cot`, and `decode.FastDecoder`: a static cache, eager, and on CUDA
      also as one CUDA graph per token; the reason adapter live or fused into a weight copy, the cache
      read once per K/V head or copied per query head as transformers' sdpa does); the embed adapter
      live, then fused as evaluate.py serves it; adaptive inference decodes only the rows the gate
      routes to thinking.

Rows: queries/s (a batch's queries over its wall time), decode tok/s (CoT tokens over the decode alone;
for HF, generate's time minus one forward over the input), peak GPU memory. Every CoT is exactly
--cot-tokens long (eos ignored) so that all paths decode the same number of tokens. Random weights.

    python bench/infer.py --device cpu --config tiny               # ~20 s on 2 cores
    python bench/infer.py --device cuda --config qwen2-vl-2b       # batch 32, 448 px + 40 tokens, 128 CoT tokens

Writes bench/results/<device>-<date>.json (section "infer") and prints a table with the ratios.
"""

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import common
import decode
import model as twn_model

parser = argparse.ArgumentParser(description="TWN inference speed vs the naive HF pipeline")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--config", default="tiny", choices=list(common.SPECS), help="backbone architecture and shapes")
parser.add_argument("--batch", type=int, default=None, help="queries per batch (default: the config's)")
parser.add_argument("--cot-tokens", type=int, default=None, help="CoT length, eos ignored (default: the config's)")
parser.add_argument("--think-rate", type=lambda x: [float(r) for r in x.split(",")], default=[0.5, 0.25],
                    help="comma-separated fractions of queries the gate routes to thinking")
parser.add_argument("--r", type=int, default=32, help="LoRA rank of each adapter (model.py's default)")
parser.add_argument("--iters", type=int, default=3, help="timed runs per row (median)")
parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled decoders (CUDA graphs)")
parser.add_argument("--nothink-only", action="store_true", help="stop after the no-think rows (a quick look at the LoRA's cost)")
parser.add_argument("--out-dir", default=os.path.join(common.ROOT, "bench", "results"), help="where the JSON goes")
parser.add_argument("--profile", action="store_true", help="also profile the no-think rows and a few eager decode "
                    "steps (top ops in <out-dir>/profile-infer-<config>.txt; bench/common.py, profile)")
args = parser.parse_args()

spec = common.SPECS[args.config]
B, N = args.batch or spec.batch, args.cot_tokens or spec.cot_tokens
dev = torch.device(args.device)
cuda = dev.type == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext  # as evaluate.py
torch.backends.cuda.matmul.allow_tf32 = True

twn, ids = common.build_twn(spec, dev, dtype, r=args.r, alpha=2.0 * args.r)
twn.eos_id = -1  # never stops: every CoT is exactly N tokens, in every path
backbone, K = twn.backbone, twn.cfg.num_queries
backbone.generation_config.eos_token_id = None
backbone.generation_config.pad_token_id = ids["pad"]
batch = common.query_batch(spec, ids, backbone.config, dev, dtype, rows=B)
T = batch["input_ids"].shape[1]
print(f"{common.device_name(dev)} | {args.config}: batch {B}, {T} input tokens ({spec.image_tokens ** 2} image), "
      f"{N} CoT tokens, {K} queries, LoRA r {args.r}, {dtype}")

rows = {}  # name -> dict(seconds per batch, queries per batch, decode seconds, peak GiB)


def save(**more):
    """Written after every section, so a run cut short (a GPU lease ends) still leaves its numbers."""
    return common.write_results(dev, args.out_dir, "infer", dict(
        config=common.spec_dict(spec), batch=B, cot_tokens=N, input_tokens=T, think_rate=args.think_rate, r=args.r,
        dtype=str(dtype), iters=args.iters, command=common.command_line(), rows=rows, **more))


def profile(name, fn):
    if args.profile:
        with torch.no_grad(), autocast():
            path = os.path.join(args.out_dir, f"profile-infer-{args.config}.txt")
            print(f"    profile: {common.profile(name, fn, dev, path)}")


def row(name, fn, queries=B, warmup=None, decode_tokens=0, prefill=0.0, profiled=False):
    """Time fn (one batch); decode tok/s counts decode_tokens over the time less `prefill` seconds."""
    with torch.no_grad(), autocast():
        seconds, peak, warm = common.measure(fn, dev, args.iters, warmup)
    rows[name] = dict(seconds=seconds, queries=queries, qps=queries / seconds, peak_gib=peak, warmup_s=warm)
    if decode_tokens:
        rows[name]["decode_tok_s"] = decode_tokens / max(seconds - prefill, 1e-9)
    shown = f"{rows[name]['qps']:10.1f} q/s" + (f"{rows[name].get('decode_tok_s', 0):12.0f} tok/s" if decode_tokens else "")
    print(f"  {name:<40}{1000 * seconds:10.1f} ms{shown}" + (f"  {peak:6.2f} GiB" if peak is not None else "")
          + (f"  (warm-up {warm:.0f} s)" if warm > 5 else ""))
    if profiled:
        profile(name, fn)
    return seconds


def with_tokens(b, extra_ids):
    """The batch with text tokens appended (right after each row's input; rows are unpadded)."""
    n = extra_ids.shape[1]
    return dict(b, input_ids=torch.cat([b["input_ids"], extra_ids], 1),
                attention_mask=torch.cat([b["attention_mask"], torch.ones_like(extra_ids)], 1),
                mm_token_type_ids=torch.cat([b["mm_token_type_ids"], torch.zeros_like(extra_ids)], 1)) if n else b


placeholders = torch.full((B, K), 30, device=dev)  # K query tokens, as plain tokens for the HF paths
think_ids = twn.think_ids[None].expand(B, -1)

# -----------------------------------------------------------------------------
# no-think: one embedding per query

print("no-think")


def hf_forward(adapter=None):
    with twn.adapters.use(adapter):
        return backbone.model(**with_tokens(batch, placeholders)).last_hidden_state[:, -K:].mean(1)


def twn_nothink(adapter="embed"):
    """evaluate.py's no-think path: the input and the K queries in one forward (TWN.encode_embed)."""
    return twn.encode_embed(batch, adapter)[2]


def twn_nothink_two_passes():
    """The same embedding with the queries in a second pass over the input's cache (encode, then embed)."""
    return twn.embed(twn.encode(batch))[1]


t_hf = row("HF forward, input + K tokens (no LoRA)", hf_forward, profiled=True)
row("twn no-think, adapters off", lambda: twn_nothink(None))
t_live = row("twn no-think, embed adapter live", twn_nothink, profiled=True)
with torch.no_grad(), autocast():
    e_live = twn_nothink()
twn.fuse("embed")  # what evaluate.py serves with (--fuse-embed on): every row below runs the embed side fused
t_nothink = row("twn no-think, embed adapter fused", twn_nothink, profiled=True)
t_two = row("twn no-think, fused, queries in a second pass", twn_nothink_two_passes)
with torch.no_grad(), autocast():
    # in bf16 the folded weights round differently from the live adapter: how far apart are the embeddings?
    fused_cosine = (twn_nothink() * e_live).sum(-1).min().item()
print(f"  embeddings, fused vs live adapter: lowest cosine over the batch {fused_cosine:.5f}")
save()
if args.nothink_only:
    ratios = dict(nothink_vs_hf_forward=t_hf / t_nothink, nothink_live_vs_hf_forward=t_hf / t_live,
                  nothink_one_pass_vs_two=t_two / t_nothink, fused_vs_live_min_cosine=fused_cosine)
    print("".join(f"  {k:<36}{v:10.3f}\n" for k, v in ratios.items()) + f"wrote {save(ratios=ratios)}")
    raise SystemExit

# -----------------------------------------------------------------------------
# always think

print("always think")
cot = {}


def naive_generate(n=N):
    with twn.adapters.use("reason"):
        return backbone.generate(**with_tokens(batch, think_ids), max_new_tokens=n, do_sample=False)


def naive_think():
    seq = naive_generate()
    full = with_tokens(batch, torch.cat([seq[:, T:], placeholders], 1))
    with twn.adapters.use("embed"):
        return backbone.model(**full).last_hidden_state[:, -K:].mean(1)


# its decode rate: generate's time less one forward over the input (its prefill), as twn's excludes the encode
row("HF generate (default cache)", naive_generate, warmup=lambda: naive_generate(2), decode_tokens=B * N, prefill=t_hf)
t_naive = row("naive HF think (generate + forward)", naive_think, warmup=lambda: naive_generate(2))
with torch.no_grad(), autocast():
    enc = twn.encode(batch)


def twn_think(decoder, key, n=N):
    e = twn.encode_embed(batch)[0]  # e0, the no-think embedding (and the gate's input), comes with the encode
    ids_, _, after = (decoder or twn.write_cot)(e, n)
    cot[key] = ids_
    return twn.embed(e.then(after.tail(e.length)))[1]


def decode_only(decoder, key, n=N):
    cot[key] = (decoder or twn.write_cot)(enc, n)[0]


# "live": the reason adapter's two GEMMs run beside every projection; fused: a copy of the weights with it folded in.
# "K/V per head": transformers' sdpa, which copies the cache once per query head (decode.grouped_attention does not)
decoders = {"reference loop": None, "static cache, eager, fused": decode.FastDecoder(twn)}
if not cuda:  # on a GPU an eager decode of the 2B model takes seconds per batch: the graphs show the same split
    decoders["static cache, eager, LoRA live"] = decode.FastDecoder(twn, fuse=False)
    decoders["static cache, eager, fused, K/V per head"] = decode.FastDecoder(twn, grouped=False)
if cuda and not args.no_compile:
    decoders["CUDA graph, fused, K/V per head"] = decode.FastDecoder(twn, mode="graph", grouped=False)
    decoders["CUDA graph, fused"] = decode.FastDecoder(twn, mode="graph")
t_decode, t_think = {}, {}
for name, dec in decoders.items():
    if dec is not None:
        dec.reserve(B, T + twn.think_ids.numel() + N, enc.kv[0])  # the full capacity up front: one graph
    # warm-up: a short CoT (a graph's shapes do not depend on the length; it compiles and records here)
    warm = lambda dec=dec, name=name: decode_only(dec, name, min(N, 16))
    t_decode[name] = row(f"twn decode: {name}", lambda dec=dec, name=name: decode_only(dec, name), queries=B,
                         warmup=warm, decode_tokens=B * N)
    t_think[name] = row(f"twn think: {name}", lambda dec=dec, name=name: twn_think(dec, name), warmup=warm)
    save()
# a few decode steps as plain kernels (no graph), fused, with each attention: what a step is made of
if args.profile:
    for name in ("static cache, eager, fused, K/V per head", "static cache, eager, fused"):
        dec = decoders.get(name) or decode.FastDecoder(twn, grouped="per head" not in name)
        profile(f"4 decode steps: {name}", lambda dec=dec: dec(enc, 4))
best = max(list(decoders)[1:], key=lambda name: rows[f"twn decode: {name}"]["decode_tok_s"])
agree = {name: (cot[name] == cot["reference loop"]).float().mean().item() for name in decoders}
# did the compiled step become one CUDA graph? (a skip falls back to compiled kernels without graphs)
compile_stats = dict(**{f"dynamo_{k}": v for k, v in counters["stats"].items()},
                     **{f"inductor_{k}": v for k, v in counters["inductor"].items() if "cudagraph" in k})
if compile_stats:
    print(f"  compile: {compile_stats}")
save(greedy_agreement=agree, compile_stats=compile_stats)

# -----------------------------------------------------------------------------
# adaptive: the gate routes a fraction of the rows to thinking

dec = decoders[best]


def adaptive_per_batch(routed):
    """What evaluate.Embedder does: within each batch, decode the routed rows as a dense sub-batch."""
    e = twn.encode_embed(batch)[0]
    return twn.think_embed(e.select(routed), N, decode=dec)[0]


def adaptive_pooled(routed, n_pool):
    """A server's queue: the routed rows of n_pool batches are decoded together, as one decode batch."""
    subs = []
    for _ in range(n_pool):
        e = twn.encode_embed(batch)[0]
        subs.append(e.select(routed))
    # every row has the same length here; a real queue would left-pad states to a common length
    pooled = twn_model.State([(torch.cat([s.kv[i][0] for s in subs]), torch.cat([s.kv[i][1] for s in subs]))
                              for i in range(len(subs[0].kv))],
                             torch.cat([s.mask for s in subs]), torch.cat([s.next_pos for s in subs]))
    return twn.think_embed(pooled, N, decode=dec)[0]


adaptive = {}
for rate in args.think_rate:
    print(f"adaptive, think rate {rate} ({best})")
    routed = torch.randperm(B, generator=torch.Generator().manual_seed(0))[:max(1, round(rate * B))].to(dev)
    n_pool = max(1, round(1 / rate))  # batches whose thinking rows fill one decode batch
    fn = lambda routed=routed: adaptive_per_batch(routed)
    a = row(f"adaptive {rate}, per batch", fn, warmup=fn) / B
    fn = lambda routed=routed, n_pool=n_pool: adaptive_pooled(routed, n_pool)
    p = row(f"adaptive {rate}, pooled over {n_pool} batches", fn, queries=n_pool * B, warmup=fn) / (n_pool * B)
    always = t_think[best] / B
    # ideal: no-think for every query plus the thinking part for the routed fraction (perfect pooling)
    adaptive[rate] = dict(per_batch_over_always=a / always, pooled_over_always=p / always,
                          ideal=(t_nothink + rate * (t_think[best] - t_nothink)) / t_think[best])
    save(greedy_agreement=agree, compile_stats=compile_stats)

# -----------------------------------------------------------------------------
# ratios and the results file

ratios = {
    "decode_speedup_vs_hf_generate": rows[f"twn decode: {best}"]["decode_tok_s"] / rows["HF generate (default cache)"]["decode_tok_s"],
    "decode_tok_s": rows[f"twn decode: {best}"]["decode_tok_s"],
    "think_speedup_vs_naive_hf": t_naive / t_think[best],
    "think_cost_over_nothink": t_think[best] / t_nothink,
    "nothink_vs_hf_forward": t_hf / t_nothink,
    "nothink_live_vs_hf_forward": t_hf / t_live,
    "nothink_one_pass_vs_two": t_two / t_nothink,
    "lora_overhead_nothink_live": t_live / rows["twn no-think, adapters off"]["seconds"] - 1,
    "fused_vs_live_min_cosine": fused_cosine,
    **{f"adaptive_{r}_{k}": v for r, d in adaptive.items() for k, v in d.items()},
}
targets = {"decode_speedup_vs_hf_generate": (">=", 3.0), "decode_tok_s": (">=", 10000.0),
           "nothink_vs_hf_forward": (">=", 0.9),
           **{f"adaptive_{r}_{k}": ("<=", 0.5) for r in adaptive if r <= 0.5 for k in ("per_batch_over_always", "pooled_over_always")}}
print("\nratios (same run)")
for k, v in ratios.items():
    goal = ""
    if k in targets and cuda:
        op, x = targets[k]
        goal = f"  target {op} {x:g}: {'met' if (v >= x if op == '>=' else v <= x) else 'NOT met'}"
    print(f"  {k:<36}{v:10.3f}{goal}")
print(f"  greedy tokens equal to the reference loop: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in agree.items()))
path = save(greedy_agreement=agree, compile_stats=compile_stats, ratios=ratios)
print(f"wrote {path}")
