"""
Hand-written LoRA with several named adapters on one frozen base layer.

Paper: TWN's *dual LoRA* (claim 1 of the abstract): one frozen Qwen2-VL / Qwen3-VL backbone carries two
low-rank adapters, `reason` (writes the chain-of-thought) and `embed` (produces the embedding). Both live
side by side in every wrapped linear layer; which one acts is chosen per call, so the same weights serve
both roles without copying the backbone.

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

B starts at zero, so a freshly injected model computes exactly what the base model computes.

Usage:
    switch = inject(model, adapters=("reason", "embed"), r=32, alpha=64)
    with switch.use("embed"):
        out = model(...)          # every wrapped layer adds the embed adapter's update
    with switch.use(None):
        out = model(...)          # adapters off: the plain backbone
    fuse(model, "reason")         # decoding: a copy of each weight with the adapter folded in ...
    with switch.use("reason", fused=True):
        out = model(...)          # ... one GEMM per layer instead of three (no gradient: inference only)

Files: `save_adapter` writes `<name>.safetensors` + `<name>.json` (our layout); `export_peft` writes
`adapter_model.safetensors` + `adapter_config.json` with PEFT's key names, so `peft` can load an adapter.
"""

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# the language model's projections in Qwen2 / Qwen3 decoder layers (attention + SwiGLU MLP)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS
    include_vision: bool = False  # the vision tower stays untouched by default

    @property
    def scaling(self):
        return self.alpha / self.r


class AdapterSwitch:
    """Says which adapter the wrapped layers of one model apply. Shared by all of them, owned by the model."""

    def __init__(self, names):
        self.names = tuple(names)
        self.active = None  # None: adapters off, the plain base model
        self.fused = False  # True: layers read their fused copy of the active adapter (LoRALinear.fuse)

    @contextlib.contextmanager
    def use(self, name, fused=False):
        if name is not None and name not in self.names:
            raise KeyError(f"unknown adapter {name!r}; this model has {self.names}")
        previous = self.active, self.fused
        self.active, self.fused = name, fused and name is not None
        try:
            yield
        finally:
            self.active, self.fused = previous


# -----------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus one low-rank update per named adapter (PEFT's attribute names)."""

    def __init__(self, base: nn.Linear, switch: AdapterSwitch, cfg: LoRAConfig):
        super().__init__()
        self.base_layer = base
        self.switch = switch
        self.scaling = cfg.scaling
        self.merged = None  # name of the adapter folded into base_layer.weight, if any
        self.fused = {}  # adapter name -> a copy of base_layer.weight with that adapter folded in (see fuse)
        # adapters are kept and trained in fp32 even when the backbone is bf16 (see forward)
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.ModuleDict({n: nn.Linear(base.in_features, cfg.r, **kw) for n in switch.names})
        self.lora_B = nn.ModuleDict({n: nn.Linear(cfg.r, base.out_features, **kw) for n in switch.names})
        self.lora_dropout = nn.ModuleDict(
            {n: nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity() for n in switch.names}
        )
        self.reset_parameters()

    def reset_parameters(self):
        if self.base_layer.weight.is_meta:
            return  # built on the meta device (parameter counting): nothing to initialise
        for n in self.switch.names:
            nn.init.kaiming_uniform_(self.lora_A[n].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[n].weight)  # the adapted layer starts equal to the base layer

    def delta_weight(self, name):
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling  # (out, in)

    def forward(self, x):
        name = self.switch.active
        if self.merged is not None and name != self.merged:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base weight; unmerge it before using {name!r}")
        if self.switch.fused:
            if torch.is_grad_enabled() and self.lora_A[name].weight.requires_grad:
                raise RuntimeError(f"the fused copy of adapter {name!r} passes no gradient to it: use it under no_grad")
            return F.linear(x, self.fused[name], self.base_layer.bias)
        y = self.base_layer(x)
        if name is None or name == self.merged:
            return y
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        # subtle: the weights are fp32 but the update is computed in the activations' dtype (bf16 on a bf16
        # backbone, as autocast would), and added to y inside the second GEMM (addmm's beta * y): the
        # full-width update is never written out on its own, which in fp32 cost four passes over y per call
        h = F.linear(self.lora_dropout[name](x.to(y.dtype)), A.to(y.dtype))  # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.to(y.dtype).t(), alpha=self.scaling)
        return out.view(y.shape)

    @torch.no_grad()
    def fuse(self, name):
        """(Re)write the fused copy of adapter `name`: W + (alpha / r) B A in W's dtype, beside W.

        For decoding, where one adapter runs for many steps: one GEMM per layer instead of three and the casts
        between them. It costs a second copy of the wrapped weights' memory and passes no gradient; it is
        rewritten in place, so a CUDA graph that reads it stays valid after the adapter trains (RL).
        """
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base weight; unmerge it before fusing {name!r}")
        w = self.base_layer.weight
        fused = (w.float() + self.delta_weight(name)).to(w.dtype)
        old = self.fused.get(name)
        if old is not None and (old.shape, old.dtype, old.device) == (w.shape, w.dtype, w.device):
            old.copy_(fused)
        else:
            # a fixed address, like a parameter's: CUDA graphs (torch.compile's too) read it in place, never copy it in
            torch._dynamo.mark_static_address(fused)
            self.fused[name] = fused

    @torch.no_grad()
    def merge(self, name):
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged")
        w = self.base_layer.weight
        w += self.delta_weight(name).to(w.dtype)
        self.merged = name

    @torch.no_grad()
    def unmerge(self):
        if self.merged is None:
            return
        w = self.base_layer.weight
        w -= self.delta_weight(self.merged).to(w.dtype)
        self.merged = None


# -----------------------------------------------------------------------------
# injection


def inject(model: nn.Module, adapters=("reason", "embed"), cfg: LoRAConfig = LoRAConfig()) -> AdapterSwitch:
    """Wrap every targeted nn.Linear of `model` in a LoRALinear; returns the switch that drives them.

    Targets match the last component of a module's name (`...self_attn.q_proj` matches "q_proj").
    The vision tower (any module under a `visual` attribute) is skipped unless cfg.include_vision.
    A target that matches nothing is an error: a silently wrong target name trains nothing.
    """
    switch = AdapterSwitch(adapters)
    hits = {t: 0 for t in cfg.targets}
    # list first: we mutate the module tree while walking it
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in hits or not isinstance(module, nn.Linear):
            continue
        if not cfg.include_vision and ".visual." in f".{name}.":
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, LoRALinear(module, switch, cfg))
        hits[leaf] += 1
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"LoRA targets matched no nn.Linear in {type(model).__name__}: {missing}")
    return switch


def lora_layers(model: nn.Module):
    """(name, LoRALinear) pairs, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module, name: str):
    for _, layer in lora_layers(model):
        layer.merge(name)


def unmerge(model: nn.Module):
    for _, layer in lora_layers(model):
        layer.unmerge()


def fuse(model: nn.Module, name: str):
    """Refresh every layer's fused copy of adapter `name` (used under `switch.use(name, fused=True)`)."""
    for _, layer in lora_layers(model):
        layer.fuse(name)


# -----------------------------------------------------------------------------
# files


def adapter_state_dict(model: nn.Module, name: str) -> dict:
    """{"<module path>.lora_A.weight": A, "<module path>.lora_B.weight": B} for one adapter."""
    state = {}
    for path, layer in lora_layers(model):
        state[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().float().contiguous()
        state[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().float().contiguous()
    return state


def _atomic(path, write):
    """Write to a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    _atomic(path, dump)


def save_adapter(model: nn.Module, name: str, cfg: LoRAConfig, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, f"{name}.safetensors"),
            lambda tmp: save_file(adapter_state_dict(model, name), tmp))
    write_json(os.path.join(out_dir, f"{name}.json"), {"adapter": name, **asdict(cfg)})


def read_tensors(path: str) -> dict:
    """A .safetensors file's tensors (never pickle: a file cannot run code); a damaged file is a
    ValueError that names it (safetensors' own message does not)."""
    try:
        return load_file(path)
    except SafetensorError as e:  # a bad header, a truncated file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_adapter(model: nn.Module, name: str, out_dir: str):
    """Load `<name>.safetensors` into the model's `name` adapter; every key must match exactly."""
    path = os.path.join(out_dir, f"{name}.safetensors")
    state = read_tensors(path)
    expected = adapter_state_dict(model, name)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{path}: adapter keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, tensor in state.items():
            path_, ab, _ = key.rsplit(".", 2)
            param = getattr(layers[path_], ab)[name].weight
            if param.shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model wants {tuple(param.shape)}")
            param.copy_(tensor)


def export_peft(model: nn.Module, name: str, cfg: LoRAConfig, out_dir: str, base_model_name_or_path: str = ""):
    """One adapter in PEFT's layout: `PeftModel.from_pretrained(hf_model, out_dir)` loads it.

    PEFT wraps the HF model as `base_model.model.<path>` and drops the adapter name from saved keys.
    """
    os.makedirs(out_dir, exist_ok=True)
    state = {f"base_model.model.{k}": v for k, v in adapter_state_dict(model, name).items()}
    _atomic(os.path.join(out_dir, "adapter_model.safetensors"), lambda tmp: save_file(state, tmp))
    write_json(os.path.join(out_dir, "adapter_config.json"), {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)}),
        # a regex would be needed to keep PEFT off the vision tower's same-named layers
        "exclude_modules": None if cfg.include_vision else r".*\.visual\..*",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    })
