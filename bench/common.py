"""What bench/infer.py and bench/train.py share: the two model configs, synthetic inputs, timing, the results file.

Both benchmarks build the backbone from a config with random weights, directly on the device (no download;
speed does not depend on the weights' values), and feed it synthetic batches of the shapes below.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules (model.py, lora.py, ...) from bench/

import model as twn_model  # noqa: E402
from data.backbone import TEXT, VISION  # noqa: E402


@dataclass
class Spec:
    """One benchmark setting: the backbone and the shapes of a batch."""
    name: str
    batch: int          # queries (or query/target pairs) per batch
    image_tokens: int   # LLM tokens per side of the square image (28 px each): 16 = 448 px
    text_tokens: int    # query text after the image
    target_tokens: int  # text-only targets (training)
    cot_tokens: int     # every CoT is exactly this long (eos ignored), so runs compare like for like


SPECS = {
    # the committed tiny backbone's architecture (data/backbone.py), the mini world's 112 px images
    "tiny": Spec("tiny", batch=8, image_tokens=4, text_tokens=12, target_tokens=8, cot_tokens=32),
    # the setting: batch 32, 448 px image + 40 text tokens, 128 CoT tokens, 24-token targets
    "qwen2-vl-2b": Spec("qwen2-vl-2b", batch=32, image_tokens=16, text_tokens=40, target_tokens=24, cot_tokens=128),
}

# special token ids: the tiny backbone's (data/tiny-qwen2vl/config.json) and Qwen2-VL's own
TINY_IDS = dict(pad=0, eos=1, vision_start=2, vision_end=3, image=4, video=5)
QWEN_IDS = dict(pad=151643, eos=151645, vision_start=151652, vision_end=151653, image=151655, video=151656)


def backbone_config(spec: Spec):
    if spec.name == "tiny":
        text, vision, ids = dict(TEXT, vocab_size=98), VISION, TINY_IDS
    else:
        _, text, vision = twn_model.REAL_CONFIGS["Qwen2-VL-2B"]
        ids = QWEN_IDS
    config = twn_model.build_config("qwen2_vl", text, vision)
    config.image_token_id, config.video_token_id = ids["image"], ids["video"]
    config.vision_start_token_id, config.vision_end_token_id = ids["vision_start"], ids["vision_end"]
    return config, ids


def build_backbone(spec: Spec, device, dtype, seed=0):
    """A random-weight Qwen2-VL of the spec's architecture, initialised on the device itself (fast on a GPU)."""
    torch.manual_seed(seed)
    config, ids = backbone_config(spec)
    with torch.device(device):
        backbone = twn_model.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return backbone.eval(), ids


def build_twn(spec: Spec, device, dtype, r, alpha, seed=0):
    backbone, ids = build_backbone(spec, device, dtype, seed)
    think = [20, 21]  # two ordinary text ids stand in for the think prompt
    twn = twn_model.TWN(backbone, twn_model.TWNConfig(r=r, alpha=alpha), pad_id=ids["pad"], eos_id=ids["eos"],
                        think_ids=think).to(device)
    # B = 0 costs the same, but real values keep the adapted outputs from equalling the base model's
    with torch.no_grad():
        for name, p in twn.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.01)
    return twn, ids


def query_batch(spec: Spec, ids, config, device, dtype, rows=None, seed=0):
    """rows x [<vision_start>, image tokens, <vision_end>, text]: every row the same length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    B, h = rows or spec.batch, spec.image_tokens
    vis = config.vision_config
    patch_dim = 3 * vis.temporal_patch_size * vis.patch_size ** 2
    text = torch.randint(8, 90, (B, spec.text_tokens), generator=g)  # ordinary words in both vocabularies
    image = torch.tensor([ids["vision_start"]] + [ids["image"]] * h * h + [ids["vision_end"]])
    input_ids = torch.cat([image.expand(B, -1), text], 1)
    return dict(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        mm_token_type_ids=(input_ids == ids["image"]).long().to(device),
        pixel_values=torch.randn(B * 4 * h * h, patch_dim, generator=g).to(device, dtype),
        image_grid_thw=torch.tensor([[1, 2 * h, 2 * h]] * B).to(device),
    )


def text_batch(spec: Spec, device, rows=None, seed=1):
    """Text-only targets (spec.target_tokens each)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, 90, (rows or spec.batch, spec.target_tokens), generator=g).to(device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=torch.zeros_like(input_ids))


# -----------------------------------------------------------------------------
# timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, iters, warmup=None):
    """(median seconds of fn() over `iters` runs, peak GiB, seconds of the warm-up): `warmup` (default fn) runs first.

    On CUDA the device is synchronised around every run and the peak is the allocator's high-water mark
    during the timed runs; on CPU the peak is not tracked (None).
    """
    t0 = time.perf_counter()
    (warmup or fn)()
    sync(device)
    warm = time.perf_counter() - t0
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return statistics.median(times), peak, warm


def matmul_peak(device, dtype, n=None, iters=10):
    """TFLOP/s of one large matrix product on this device and dtype: the MFU denominator, measured here."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _, _ = measure(lambda: [a @ b for _ in range(iters)], device, 3)
    return 2 * n ** 3 * iters / seconds / 1e12


_profiled = set()  # files profile() has written in this run


def profile(name, fn, device, path, top=25):
    """Run fn() once under torch.profiler; append its top ops by self device time (CPU time on a CPU) to `path`.

    Not a timing (the profiler slows small kernels down): where a row's time goes, to pick what to make
    faster next. Also the share of the wall time the device was busy: far below 1, the GPU waits on Python.
    Returns a one-line summary.
    """
    from torch.profiler import ProfilerActivity
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    if cuda:
        # a kernel's time shows twice: as the kernel's own row and as its op's self device time. Busy is
        # the kernels' sum; the table lists the ops (aten::mm, not the cuBLAS kernel it picked)
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        busy = sum(getattr(e, key) for e in events if e not in ops) or sum(getattr(e, key) for e in ops)
        busy, events = busy / 1e6, ops
    else:
        busy = sum(getattr(e, key) for e in events) / 1e6
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    lines = [f"== {name}: wall {1000 * wall:.1f} ms (profiled), {'device' if cuda else 'cpu'} busy {1000 * busy:.1f} ms",
             f"{'op':<60}{'calls':>8}{'ms':>10}{'share':>8}"]
    lines += [f"{e.key[:59]:<60}{e.count:>8}{getattr(e, key) / 1e3:>10.2f}{getattr(e, key) / 1e6 / busy:>8.1%}"
              for e in events[:top]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a" if path in _profiled else "w") as f:  # a run's first table starts the file afresh
        f.write("\n".join(lines) + "\n\n")
    _profiled.add(path)
    head = ", ".join(f"{e.key[:40]} {getattr(e, key) / 1e6 / busy:.0%}" for e in events[:3])
    return f"busy {1000 * busy:.0f} of {1000 * wall:.0f} ms; top: {head}"


# -----------------------------------------------------------------------------
# results


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def results_path(device, out_dir):
    slug = "cpu" if torch.device(device).type == "cpu" else \
        "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    return os.path.join(out_dir, f"{slug}-{datetime.date.today().isoformat()}.json")


def write_results(device, out_dir, section, payload):
    """Merge {section: payload} into bench/results/<device>-<date>.json (infer and train share the file)."""
    import transformers
    path = results_path(device, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(device=device_name(device), torch=torch.__version__, transformers=transformers.__version__)
    data[section] = payload
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def spec_dict(spec):
    return asdict(spec)


def command_line():
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
