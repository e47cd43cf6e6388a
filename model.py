"""
The TWN model: one frozen Qwen2-VL / Qwen3-VL backbone, two LoRA adapters, learned query tokens.

Paper: Think When Needed (arXiv 2605.14448), the dual-LoRA architecture and the detach at the interface
(claims 1 and 2 of the abstract), in twn's reading (../shared/PAPER.md, "How twn reads the design"):

    input (image+text) --embed adapter--> KV_in --+--(detach)--> reason adapter writes the CoT --> KV_cot
                                                  |
    K learned queries --embed adapter--> attend to [KV_in]                    -> no-think embedding e0
    K learned queries --embed adapter--> attend to [KV_in, KV_cot.detach()]   -> think embedding e1

The input is encoded once, with the queries of e0 appended to the same forward (`encode_embed`).
Everything after it (the CoT, the queries of e1) is a continuation of that encoding through an explicit
KV cache and explicit M-RoPE positions: positions are computed once for the input with the backbone's
own `get_rope_index`, and every appended token is a text token whose position continues from the row's
last input position. Nothing relies on state the HF model keeps between calls (its `rope_deltas`).

Run `python model.py --param-report` for the parameter budget on the real backbones (meta device, no
weights): the default rank puts Qwen2-VL-2B's two adapters + queries at the paper's 3-5 %.
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForImageTextToText, DynamicCache

import lora

ADAPTERS = ("reason", "embed")


@dataclass
class TWNConfig:
    r: int = 32                 # LoRA rank of each adapter (32 puts Qwen2-VL-2B at ~3.4 %, see --param-report)
    alpha: float = 64.0
    dropout: float = 0.0
    targets: tuple = lora.DEFAULT_TARGETS
    lora_vision: bool = False   # adapters on the vision tower too
    num_queries: int = 4        # K learned query tokens; the embedding is their mean output
    detach: bool = True         # the paper's detach at the adapter interface (False: the ablation)
    think_prompt: str = "think :"  # text the reason adapter reads before writing its CoT

    def lora(self):
        return lora.LoRAConfig(self.r, self.alpha, self.dropout, tuple(self.targets), self.lora_vision)

    @classmethod
    def from_dict(cls, d):
        """Strict: unknown keys and wrong types are errors, not silently ignored settings."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown TWNConfig keys: {sorted(unknown)}")
        out = {}
        for k, v in d.items():
            want = type(getattr(cls(), k))
            if want is tuple and isinstance(v, list):
                v = tuple(v)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want):
                raise ValueError(f"TWNConfig.{k} must be {want.__name__}, got {type(v).__name__}: {v!r}")
            out[k] = v
        return cls(**out)


@dataclass
class State:
    """A batch's encoded context: per-layer KV, its attention mask, and each row's next text position.

    kv: list over layers of (k, v), each (B, kv_heads, T, head_dim); mask: (B, T) 1 = real token;
    next_pos: (B,) the M-RoPE position the next appended token of each row takes.
    """
    kv: list
    mask: torch.Tensor
    next_pos: torch.Tensor

    @property
    def length(self):
        return self.mask.shape[1]

    def detached(self):
        return State([(k.detach(), v.detach()) for k, v in self.kv], self.mask, self.next_pos)

    def tail(self, start):
        """The part appended after position `start` (e.g. the CoT's KV after the input's)."""
        return State([(k[:, :, start:], v[:, :, start:]) for k, v in self.kv], self.mask[:, start:], self.next_pos)

    def then(self, other):
        """This context followed by `other`, a tail (its next_pos wins: it is the later one)."""
        kv = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(self.kv, other.kv)]
        return State(kv, torch.cat([self.mask, other.mask], 1), other.next_pos)

    def select(self, rows):
        return State([(k[rows], v[rows]) for k, v in self.kv], self.mask[rows], self.next_pos[rows])

    @staticmethod
    def stack(states):
        """The rows of several States as one batch; shorter contexts are left padded (masked), as inputs are.

        Positions are explicit (next_pos), so padding in front changes nothing a row attends to.
        """
        T = max(s.length for s in states)
        pad = lambda x, t: F.pad(x, (0, 0, T - t, 0))  # (B, heads, t, d) -> (B, heads, T, d), zeros in front
        kv = [tuple(torch.cat([pad(s.kv[layer][j], s.length) for s in states]) for j in (0, 1))
              for layer in range(len(states[0].kv))]
        mask = torch.cat([F.pad(s.mask, (T - s.length, 0)) for s in states])
        return State(kv, mask, torch.cat([s.next_pos for s in states]))


# -----------------------------------------------------------------------------


class TWN(nn.Module):

    def __init__(self, backbone: nn.Module, cfg: TWNConfig, pad_id: int, eos_id: int, think_ids: list):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)  # frozen: only the adapters and the queries learn
        self.adapters = lora.inject(backbone, ADAPTERS, cfg.lora())
        hidden = backbone.get_input_embeddings().weight
        # queries start near the mean token embedding so they look like ordinary tokens to the frozen model
        init = hidden.detach().float().mean(0) + 0.02 * torch.randn(cfg.num_queries, hidden.shape[1], device=hidden.device)
        self.queries = nn.Parameter(init)  # (K, H), fp32
        self.fused = set()  # adapters that run on a fused weight copy (see fuse): inference only
        self.pad_id, self.eos_id = pad_id, eos_id
        self.register_buffer("think_ids", torch.tensor(think_ids, dtype=torch.long), persistent=False)

    @property
    def lm(self):
        """The decoder stack (Qwen2VLTextModel / Qwen3VLTextModel): what continuations run through."""
        return self.backbone.model.language_model

    @property
    def device(self):
        return self.queries.device

    def trainable_parameters(self, which):
        """Parameters of one side: "reason" (its LoRA) or "embed" (its LoRA + the queries)."""
        params = [p for n, p in self.named_parameters() if f".{which}." in n and ".lora_" in n]
        return params + [self.queries] if which == "embed" else params

    def adapter(self, name):
        """Adapter `name` on for the forwards inside: through its fused weight copy if fuse() made one."""
        return self.adapters.use(name, fused=name in self.fused)

    @torch.no_grad()
    def fuse(self, name="embed"):
        """Inference: from now on adapter `name` runs on a copy of the weights with it folded in (lora.fuse).

        One GEMM per projection instead of three, so the no-think path costs what the plain backbone does
        (README, "Speed"), for one more copy of the LM's projection weights. Serving fuses the embed
        adapter (evaluate.py): targets, no-think and think embeddings all use it alone, and the decoder
        keeps its own copy for the reason adapter. The copy passes no gradient (training through it is
        an error); load() refreshes it.
        """
        lora.fuse(self.backbone, name)
        self.fused.add(name)

    # --- the three building blocks ------------------------------------------------------------

    def encode(self, batch, adapter="embed") -> State:
        """Run the input (left padded, images included) once; return its KV cache and positions."""
        return self._encode(batch, adapter, queries=False)[0]

    def encode_embed(self, batch, adapter="embed"):
        """`encode` and `embed` in one forward -> (State of the input, pooled state, no-think embedding e0).

        The K queries ride at the end of the input instead of reading it in a second pass. Attention is
        causal, so the input's KV (what a CoT continues from) is the same, and the queries see what
        `embed(encode(batch))` shows them, at the same positions (a test checks values and gradients).
        It saves a pass through every layer for K tokens: little arithmetic, but on a GPU as many kernel
        launches as the input's own pass, which is what the no-think path and a training step wait on.
        """
        state, hidden = self._encode(batch, adapter, queries=True)
        pooled = hidden.float().mean(1)  # (B, H)
        return state, pooled, F.normalize(pooled, dim=-1)

    def _encode(self, batch, adapter, queries):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, T = ids.shape
        # M-RoPE positions for the whole input, computed once, passed explicitly: (3, B, T)
        pos, _ = self.backbone.model.get_rope_index(
            ids, batch["mm_token_type_ids"], batch.get("image_grid_thw"), attention_mask=mask)
        # the next token of each row continues from its largest position (text after an image jumps
        # by the image's grid extent, not by its token count: that is M-RoPE)
        next_pos = pos.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1  # (B,)
        embeds, types, full_mask = self.token_embeds(ids), batch["mm_token_type_ids"], mask
        if queries:  # appended after each row's last token (rows are left padded), as `extend` would
            K = self.cfg.num_queries
            embeds = torch.cat([embeds, self.queries[None].expand(B, K, -1).to(embeds.dtype)], 1)
            pos = torch.cat([pos, (next_pos[:, None] + torch.arange(K, device=ids.device)).expand(3, B, K)], 2)
            types, full_mask = F.pad(types, (0, K)), F.pad(mask, (0, K), value=1)
        cache = DynamicCache()
        with self.adapter(adapter):
            # embeddings, not ids, go in (the queries have no token id); HF then finds the image
            # placeholders by their embedding, where the image features are written (and checks that
            # it found as many as there are features: a stray match would be an error, not a wrong input)
            out = self.backbone.model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos,
                                      past_key_values=cache, use_cache=True, pixel_values=batch.get("pixel_values"),
                                      image_grid_thw=batch.get("image_grid_thw"), mm_token_type_ids=types)
        kv = [(layer.keys[:, :, :T], layer.values[:, :, :T]) for layer in cache.layers]  # the input's own
        return State(kv, mask, next_pos), out.last_hidden_state[:, T:]

    def extend(self, state: State, embeds, mask, adapter):
        """Append tokens to a context: (B, L, H) embeds, (B, L) right-padded mask -> hidden, new State.

        Appended tokens are text: all three M-RoPE axes advance together from the row's next_pos.
        """
        B, L = mask.shape
        pos = (state.next_pos[:, None] + torch.arange(L, device=mask.device)[None]).expand(3, B, L)
        full_mask = torch.cat([state.mask, mask], 1)
        cache = DynamicCache(state.kv)
        with self.adapter(adapter):
            out = self.lm(inputs_embeds=embeds.to(self.lm.dtype), attention_mask=full_mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return out.last_hidden_state, State(kv, full_mask, state.next_pos + mask.sum(1))

    def embed(self, state: State):
        """The K learned queries read a context with the embed adapter -> (pooled state, L2-normalised embedding)."""
        B, K = state.mask.shape[0], self.cfg.num_queries
        queries = self.queries[None].expand(B, K, -1)
        hidden, _ = self.extend(state, queries, state.mask.new_ones(B, K), "embed")
        pooled = hidden.float().mean(1)  # (B, H)
        return pooled, F.normalize(pooled, dim=-1)

    def token_embeds(self, ids):
        return self.backbone.get_input_embeddings()(ids)

    def think_segment(self, cot_ids, cot_mask):
        """[think prompt, CoT] as one right-padded segment: (B, P + L) ids and mask."""
        B = cot_ids.shape[0]
        prompt = self.think_ids[None].expand(B, -1)
        return torch.cat([prompt, cot_ids], 1), torch.cat([torch.ones_like(prompt), cot_mask], 1)

    def read_cot(self, past: State, cot_ids, cot_mask):
        """Teacher-force [think prompt, CoT] with the reason adapter after `past`.

        Returns (B, L) log-probabilities of the CoT's tokens (0 at padding) and the State after the CoT.
        """
        seg_ids, seg_mask = self.think_segment(cot_ids, cot_mask)
        hidden, after = self.extend(past, self.token_embeds(seg_ids), seg_mask, "reason")
        P = self.think_ids.numel()
        # the last prompt token predicts CoT token 0, CoT token t predicts token t+1
        return token_logprobs(self.backbone.lm_head, hidden[:, P - 1:-1], cot_ids, cot_mask), after

    # --- teacher-forced training forward (joint SFT) --------------------------------------------

    def forward(self, batch, cot_ids, cot_mask):
        """Input + teacher CoT -> CoT next-token loss (reason side), e0 and e1 (embed side).

        cot_ids / cot_mask: (B, L) the teacher CoT ending in eos, right padded.
        Returns dict(cot_loss, e0, e1, pooled0) with e0, e1 (B, H) L2-normalised.
        """
        enc, pooled0, e0 = self.encode_embed(batch)

        # --- the detach, boundary 1: the reason adapter reads the input's KV as a constant, so the CoT
        # loss cannot push the embed adapter (which produced KV_in) around
        past = enc.detached() if self.cfg.detach else enc
        logp, after = self.read_cot(past, cot_ids, cot_mask)
        # per-example mean over its own tokens, then over the batch: long CoTs don't outweigh short ones
        cot_loss = (-logp.sum(1) / cot_mask.sum(1).clamp(min=1)).mean()

        # --- the detach, boundary 2: the think embedding reads the CoT's KV as a constant, so the
        # contrastive loss cannot push the reason adapter (which produced KV_cot) around
        cot_kv = after.tail(enc.length)
        cot_kv = cot_kv.detached() if self.cfg.detach else cot_kv
        _, e1 = self.embed(enc.then(cot_kv))
        return dict(cot_loss=cot_loss, e0=e0, e1=e1, pooled0=pooled0)

    # --- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def write_cot(self, enc: State, max_new_tokens=64, temperature=0.0, generator=None):
        """Decode a CoT with the reason adapter, continuing from the input's encoding.

        Returns (ids (B, L) with pad after eos, mask (B, L) 1 on generated tokens incl. eos, State after).
        Rows that finished keep appending masked pad tokens so the batch stays rectangular.
        """
        B = enc.mask.shape[0]
        prompt = self.think_ids[None].expand(B, -1)
        hidden, state = self.extend(enc, self.token_embeds(prompt), torch.ones_like(prompt), "reason")
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        out_ids, out_mask = [], []
        for _ in range(max_new_tokens):
            logits = self.backbone.lm_head(hidden[:, -1]).float()  # (B, V)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tok = logits.argmax(-1)
            live = ~done
            tok = torch.where(live, tok, torch.full_like(tok, self.pad_id))
            out_ids.append(tok)
            out_mask.append(live.long())
            hidden, state = self.extend(state, self.token_embeds(tok[:, None]), live.long()[:, None], "reason")
            done = done | (tok == self.eos_id)
            if done.all():
                break
        return torch.stack(out_ids, 1), torch.stack(out_mask, 1), state

    @torch.no_grad()
    def embed_items(self, batch):
        """No-think embedding of a collated batch (targets are always embedded this way)."""
        return self.encode_embed(batch)[2]

    @torch.no_grad()
    def think_embed(self, enc: State, max_new_tokens=64, temperature=0.0, generator=None, decode=None):
        """Write a CoT, then embed [input, CoT] -> (e1, cot ids, cot mask).

        decode: what writes the CoT, with write_cot's signature and contract; None is `self.write_cot`
        (the reference loop), a `decode.FastDecoder` is the same decode over a static cache (CUDA graphs).
        """
        ids, mask, after = (decode or self.write_cot)(enc, max_new_tokens, temperature, generator)
        return self.embed(enc.then(after.tail(enc.length)))[1], ids, mask

    # --- files -----------------------------------------------------------------------------------

    def save(self, out_dir, extra=None):
        """Each adapter as safetensors + JSON; the queries travel with the embed adapter."""
        lc = self.cfg.lora()
        lora.save_adapter(self.backbone, "reason", lc, os.path.join(out_dir, "reasoning"))
        lora.save_adapter(self.backbone, "embed", lc, os.path.join(out_dir, "embedding"))
        lora._atomic(os.path.join(out_dir, "embedding", "queries.safetensors"),
                     lambda tmp: save_file({"queries": self.queries.detach().float().contiguous()}, tmp))
        lora.write_json(os.path.join(out_dir, "twn.json"), {"twn": asdict(self.cfg), **(extra or {})})

    def load(self, out_dir):
        lora.load_adapter(self.backbone, "reason", os.path.join(out_dir, "reasoning"))
        lora.load_adapter(self.backbone, "embed", os.path.join(out_dir, "embedding"))
        path = os.path.join(out_dir, "embedding", "queries.safetensors")
        tensors = lora.read_tensors(path)
        if set(tensors) != {"queries"}:
            raise ValueError(f"{path}: expected one tensor 'queries', found {sorted(tensors)}")
        q = tensors["queries"]
        if q.shape != self.queries.shape:
            raise ValueError(f"{out_dir}: queries have shape {tuple(q.shape)}, the model wants {tuple(self.queries.shape)}")
        with torch.no_grad():
            self.queries.copy_(q)
        for name in self.fused:
            self.fuse(name)  # the fused copies must follow the adapters just loaded


def token_logprobs(head: nn.Module, hidden, ids, mask, chunk=1024):
    """log p(ids | hidden) under the LM head, (B, L), 0 where mask is 0.

    Only the real tokens go through the head, `chunk` at a time, each chunk checkpointed: a real
    vocabulary has 152k words, so the fp32 logits of 4,096 CoT tokens would be 2.5 GB, and softmax's
    backward would keep another copy; here one chunk's logits exist at a time, forward and backward.
    """
    rows = mask.flatten().nonzero().squeeze(1)
    h, t = hidden.flatten(0, 1)[rows], ids.flatten()[rows]

    def logp(h, t):
        logits = head(h).float()
        return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1)

    grad = torch.is_grad_enabled() and h.requires_grad
    out = [checkpoint(logp, h[i:i + chunk], t[i:i + chunk], use_reentrant=False) if grad
           else logp(h[i:i + chunk], t[i:i + chunk]) for i in range(0, len(rows), chunk)]
    flat = hidden.new_zeros(ids.numel(), dtype=torch.float32)
    return flat.index_put((rows,), torch.cat(out)).view(ids.shape) if out else flat.view(ids.shape)


def read_config(out_dir) -> TWNConfig:
    with open(os.path.join(out_dir, "twn.json")) as f:
        return TWNConfig.from_dict(json.load(f)["twn"])


def from_pretrained(backbone_dir, cfg: TWNConfig = None, tokenizer=None, device=None, dtype=None) -> TWN:
    """Load a local Qwen2-VL or Qwen3-VL directory, freeze it, and inject the two adapters.

    One code path for both families: AutoModelForImageTextToText picks the class from config.json.
    The backbone is bf16 on CUDA and fp32 on CPU; adapters and queries are fp32 on both.
    """
    from transformers import AutoTokenizer

    cfg = cfg or TWNConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # use_safetensors: weights never come from a pickle (.bin), which can run code when loaded
    backbone = AutoModelForImageTextToText.from_pretrained(backbone_dir, dtype=dtype, use_safetensors=True).to(device).eval()
    tok = tokenizer or AutoTokenizer.from_pretrained(backbone_dir)
    think_ids = tok(cfg.think_prompt, add_special_tokens=False)["input_ids"]
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    return TWN(backbone, cfg, pad_id=pad_id, eos_id=eos_id, think_ids=think_ids).to(device)


# -----------------------------------------------------------------------------
# parameter report: the real backbones' shapes, written out, built on the meta device (no weights)

REAL_CONFIGS = {
    "Qwen2-VL-2B": ("qwen2_vl", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
                    dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536)),
    "Qwen2-VL-7B": ("qwen2_vl", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
                    dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584)),
    "Qwen3-VL-4B": ("qwen3_vl", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                    tie_word_embeddings=True),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                         deepstack_visual_indexes=[5, 11, 17])),
    "Qwen3-VL-8B": ("qwen3_vl", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                    tie_word_embeddings=False),
                    dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                         deepstack_visual_indexes=[8, 16, 24])),
}


def build_config(model_type, text, vision):
    """A Qwen2-VL / Qwen3-VL config from plain dicts (real shapes, or the tiny ones the tests use)."""
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision)
    config.tie_word_embeddings = text.get("tie_word_embeddings", False)
    return config


def param_report(cfg: TWNConfig):
    rows = []
    for name, (model_type, text, vision) in REAL_CONFIGS.items():
        with torch.device("meta"):
            backbone = AutoModelForImageTextToText.from_config(build_config(model_type, text, vision))
            n_backbone = sum(p.numel() for p in {id(p): p for p in backbone.parameters()}.values())
            lora.inject(backbone, ADAPTERS, cfg.lora())
        n_lora = sum(p.numel() for n, p in backbone.named_parameters() if ".lora_" in n)
        n_queries = cfg.num_queries * text["hidden_size"]
        rows.append((name, n_backbone, n_lora + n_queries, 100 * (n_lora + n_queries) / n_backbone))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--param-report", action="store_true", help="print backbone vs dual-LoRA parameter counts")
    parser.add_argument("--r", type=int, default=TWNConfig.r, help="LoRA rank of each adapter")
    parser.add_argument("--alpha", type=float, default=TWNConfig.alpha, help="LoRA alpha")
    args = parser.parse_args()
    if not args.param_report:
        parser.print_help()
    else:
        cfg = TWNConfig(r=args.r, alpha=args.alpha)
        print(f"dual LoRA (reason + embed), rank {cfg.r} on {', '.join(cfg.targets)}, + {cfg.num_queries} queries")
        print(f"{'backbone':<14}{'backbone params':>18}{'TWN extra':>14}{'extra %':>10}")
        for name, nb, ne, pct in param_report(cfg):
            print(f"{name:<14}{nb / 1e9:>16.3f} B{ne / 1e6:>12.1f} M{pct:>9.2f} %")
