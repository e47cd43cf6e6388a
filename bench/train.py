"""
Training speed of TWN's joint SFT step beside the baseline a user has today: `peft` LoRA + InfoNCE.

Paper: Think When Needed (arXiv 2605.14448), claims 1-2: two adapters on one frozen backbone, trained
jointly with the gradient detached at their interface. The joint step does more than a plain contrastive
step (a CoT next-token loss, and two embeddings per query), so the question is what that costs:

  baseline  peft LoRA (r 16, alpha 64, every linear layer of the LM) on the same backbone, VLM2Vec's
            encode (the CausalLM forward with output_hidden_states, last-token pooling) and, beside it,
            the same through the bare decoder (no lm_head over every token); InfoNCE, tau 0.02
  twn       the joint step of train_sft.py (CoT loss + InfoNCE on e0 and e1), and its contrastive part
            alone (e0 only), adapters r 16 each

Same batch for all: pairs of (image + text query, text target), in-batch negatives, one AdamW step.
Rows: pairs/s, peak GPU memory, and MFU = FLOPs counted by torch.utils.flop_counter for one step, over
the step's time, over a matrix product's rate measured in the same run (bf16 on CUDA, fp32 on CPU).
Random weights; LoRA trainable in fp32, backbone bf16 on CUDA (fp32 on CPU), autocast as train_sft.py.

    python bench/train.py --device cpu --config tiny               # ~20 s on 2 cores
    python bench/train.py --device cuda --config qwen2-vl-2b       # batch 32 pairs, 448 px + 40 tokens vs 24

peft is optional (not in requirements.txt): without it the baseline rows are skipped, with a message.
Writes bench/results/<device>-<date>.json (section "train") and prints a table with the ratios.
"""

import argparse
import contextlib
import gc
import os

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

import common
import lora
import runtime

parser = argparse.ArgumentParser(description="TWN joint SFT step vs a peft LoRA InfoNCE step")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--config", default="tiny", choices=list(common.SPECS), help="backbone architecture and shapes")
parser.add_argument("--batch", type=int, default=None, help="query/target pairs per step (default: the config's)")
parser.add_argument("--cot-tokens", type=int, default=None, help="teacher CoT length (default: the config's)")
parser.add_argument("--iters", type=int, default=3, help="timed steps per row (median)")
parser.add_argument("--out-dir", default=os.path.join(common.ROOT, "bench", "results"), help="where the JSON goes")
parser.add_argument("--profile", action="store_true", help="also profile one step of each row (top ops in "
                    "<out-dir>/profile-train-<config>.txt; bench/common.py, profile)")
args = parser.parse_args()

spec = common.SPECS[args.config]
B, C = args.batch or spec.batch, args.cot_tokens or spec.cot_tokens
dev = torch.device(args.device)
cuda = dev.type == "cuda"
dtype = torch.bfloat16 if cuda else torch.float32
autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
torch.backends.cuda.matmul.allow_tf32 = True
TAU = 0.02

peak_tflops = common.matmul_peak(dev, dtype)
config, ids = common.backbone_config(spec)
queries = common.query_batch(spec, ids, config, dev, dtype, rows=B)
targets = common.text_batch(spec, dev, rows=B)
pos = torch.arange(B, device=dev)
same = torch.eye(B, dtype=torch.bool, device=dev)  # every target is distinct here
cot_ids = torch.randint(8, 90, (B, C), generator=torch.Generator().manual_seed(2)).to(dev)
cot_ids[:, -1] = ids["eos"]
cot_mask = torch.ones_like(cot_ids)
print(f"{common.device_name(dev)} | {args.config}: {B} pairs, query {queries['input_ids'].shape[1]} tokens "
      f"({spec.image_tokens ** 2} image), target {spec.target_tokens}, CoT {C} | matmul {peak_tflops:.1f} TFLOP/s ({dtype})")

rows = {}


def _gqa(shape, q):
    """K/V shape with the query's head count: grouped-query attention does the work of every query head."""
    return (shape[0], q[1], *shape[2:])


# torch's attention formulas assert equal head counts; Qwen2-VL's LM shares K/V heads (12 query, 2 KV)
aten = torch.ops.aten
GQA_FLOPS = {
    **{op: lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, _gqa(k, q), _gqa(v, q))
       for op in (aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
                  aten._scaled_dot_product_cudnn_attention)},
    **{op: lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, _gqa(k, q), _gqa(v, q))
       for op in (aten._scaled_dot_product_efficient_attention_backward,
                  aten._scaled_dot_product_flash_attention_backward,
                  aten._scaled_dot_product_cudnn_attention_backward)},
}


def row(name, step, n_trainable):
    step()  # warm-up (allocator, autotuning)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=GQA_FLOPS) as counter:
        step()
    flops = counter.get_total_flops()
    seconds, peak, _ = common.measure(step, dev, args.iters)
    rows[name] = dict(seconds=seconds, pairs_s=B / seconds, peak_gib=peak, tflop_per_step=flops / 1e12,
                      mfu=flops / seconds / (peak_tflops * 1e12), trainable_m=n_trainable / 1e6)
    r = rows[name]
    print(f"  {name:<40}{1000 * seconds:9.1f} ms{r['pairs_s']:9.1f} pairs/s{flops / 1e9:11.1f} GFLOP"
          f"{100 * r['mfu']:7.1f} % MFU" + (f"{peak:8.2f} GiB" if peak is not None else ""))
    if args.profile:
        path = os.path.join(args.out_dir, f"profile-train-{args.config}.txt")
        print(f"    profile: {common.profile(name, step, dev, path)}")
    save()  # row by row: a run cut short (bench/gpu.sh's time caps) keeps what it measured


def save(**more):
    return common.write_results(dev, args.out_dir, "train", dict(
        config=common.spec_dict(spec), batch=B, cot_tokens=C, dtype=str(dtype), iters=args.iters,
        matmul_tflops=peak_tflops, command=common.command_line(), rows=rows, **more))


# -----------------------------------------------------------------------------
# twn: the joint step of train_sft.py, and its contrastive part alone

twn, _ = common.build_twn(spec, dev, dtype, r=16, alpha=32.0)
twn.train()
params = [p for p in twn.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)


def twn_step(joint, two_passes=False):
    # two_passes: the queries read the input in a second pass (encode, then embed), as before TWN.encode_embed
    embed = (lambda b: twn.embed(twn.encode(b))[1]) if two_passes else (lambda b: twn.encode_embed(b)[2])
    opt.zero_grad(set_to_none=True)
    with autocast():
        t = embed(targets)
        if joint:
            out = twn(queries, cot_ids, cot_mask)
            loss = (runtime.info_nce(out["e0"], t, pos, same, TAU) + runtime.info_nce(out["e1"], t, pos, same, TAU)
                    + out["cot_loss"])
        else:
            loss = runtime.info_nce(embed(queries), t, pos, same, TAU)
    loss.backward()
    opt.step()


n_twn = sum(p.numel() for p in params)
print("twn (two adapters, r 16 each, + queries)")
row("twn joint SFT (CoT + e0 + e1)", lambda: twn_step(True), n_twn)
row("twn contrastive only (e0)", lambda: twn_step(False), n_twn)
row("twn contrastive, queries in a second pass", lambda: twn_step(False, two_passes=True), n_twn)
del twn, opt, params  # the baseline gets the device to itself
gc.collect()
if cuda:
    torch.cuda.empty_cache()

# -----------------------------------------------------------------------------
# the baseline: peft LoRA on the same backbone, the same InfoNCE step

try:
    import peft
except ImportError:
    peft = None
    print("peft is not installed: skipping the baseline rows (pip install peft to run them)")

if peft is not None:
    backbone, _ = common.build_backbone(spec, dev, dtype)
    model = peft.get_peft_model(backbone, peft.LoraConfig(r=16, lora_alpha=64, lora_dropout=0.0,
                                                          target_modules=list(lora.DEFAULT_TARGETS)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def encode(batch, vlm2vec):
        if vlm2vec:  # VLM2Vec's MMEBModel.encode_input: the CausalLM forward, last layer's last token
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        else:
            hidden = model.base_model.model.model(**batch).last_hidden_state
        return F.normalize(hidden[:, -1].float(), dim=-1)  # rows are unpadded: the last token is real

    def peft_step(vlm2vec):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = runtime.info_nce(encode(queries, vlm2vec), encode(targets, vlm2vec), pos, same, TAU)
        loss.backward()
        opt.step()

    print(f"peft {peft.__version__} LoRA (r 16, alpha 64, {', '.join(lora.DEFAULT_TARGETS)})")
    n_peft = sum(p.numel() for p in params)
    row("peft LoRA, VLM2Vec encode (CausalLM)", lambda: peft_step(True), n_peft)
    row("peft LoRA, bare decoder (no lm_head)", lambda: peft_step(False), n_peft)

# -----------------------------------------------------------------------------
# ratios

j, c = rows["twn joint SFT (CoT + e0 + e1)"], rows["twn contrastive only (e0)"]
ratios = dict(contrastive_one_pass_vs_two=c["pairs_s"] / rows["twn contrastive, queries in a second pass"]["pairs_s"])
base = "peft LoRA, VLM2Vec encode (CausalLM)"
if base in rows:
    lean = rows["peft LoRA, bare decoder (no lm_head)"]
    ratios.update(joint_pairs_s_vs_peft=j["pairs_s"] / rows[base]["pairs_s"],
                  joint_pairs_s_vs_peft_bare=j["pairs_s"] / lean["pairs_s"],
                  contrastive_pairs_s_vs_peft_bare=c["pairs_s"] / lean["pairs_s"])
    if cuda:
        ratios.update(joint_memory_vs_peft=j["peak_gib"] / rows[base]["peak_gib"],
                      joint_memory_vs_peft_bare=j["peak_gib"] / lean["peak_gib"])
print("\nratios (same run)")
for k, v in ratios.items():
    goal = ""
    if cuda and k in ("joint_pairs_s_vs_peft", "joint_memory_vs_peft"):
        met = v >= 1.0 if "pairs" in k else v <= 1.0
        goal = f"  target {'>=' if 'pairs' in k else '<='} 1: {'met' if met else 'NOT met'}"
    print(f"  {k:<36}{v:8.3f}{goal}")
print(f"wrote {save(ratios=ratios)}")
