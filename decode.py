"""
The fast reasoning decode: `TWN.write_cot` over a static, preallocated KV cache, one CUDA graph replay per token.

Paper: Think When Needed (arXiv 2605.14448), claim 3. Thinking is the cost TWN exists to avoid: the gate
skips the CoT where it does not help, and this module makes the CoT that remains cheap. On a GPU,
decoding a batch is bound by reading the weights once per token (~1 ms per step for a 2B model), but a
plain loop (`TWN.write_cot`, HF `generate` with its default cache) spends far longer than that in Python,
launching a few thousand small kernels per token and growing the cache with `torch.cat`. Here every
step has the same shapes and reads its inputs from the same buffers:

    slots  0 ........ T0-1 | T0 .. T0+P-1 | T0+P ............ T0+P+N-1 | ... capacity
           input's KV       think prompt   one CoT token per step       (masked, unused)
    mask   the input's mask | 1 ...........| 1 while the row is live, 0 after its eos

- the input's KV (one `model.State`, encoded once) is copied into a `transformers.StaticCache`;
- the attention mask always spans the whole preallocated length (unwritten slots are 0);
- positions are explicit: an appended token is text, so all three M-RoPE axes are next_pos + t;
- the write slot is the cache's own counter (a tensor advanced in place), not a Python int.

So the step can be compiled once and recorded once as a CUDA graph. Modes:

    "eager"            the step as plain PyTorch (what the CPU tests run)
    "reduce-overhead"  torch.compile(mode="reduce-overhead"): Inductor kernels in CUDA graphs that
                       torch records and replays for us
    "graph"            the torch.compile'd step recorded by hand as one torch.cuda.CUDAGraph: a token is
                       one replay (CUDA only; the graph keeps the first call's autocast setting)

By default the step reads a copy of the weights with the reason adapter folded in (`lora.fuse`, refreshed
at every call): one GEMM per projection instead of three. On an H100 (Qwen2-VL-2B, batch 32, bf16) the
graph decodes 6.3k tok/s fused and 4.0k with the adapter live; the reference loop ~0.6k (README, "Speed";
bench/infer.py measures it). Those runs predate `grouped_attention`, through which the step now reads
the cache: transformers' sdpa copied it once per query head at every step.

Sampling stays outside the graph and draws as `write_cot` does, so the same generator gives the same
tokens (it may draw a few more times after the last row ends: "all done?" is asked every few steps).
It returns what `write_cot` returns (ids, mask, State after), token for token, so

    decoder = FastDecoder(twn, mode="graph")                # keep it: it owns the cache and the graph
    e1, ids, mask = twn.think_embed(enc, 128, decode=decoder)

`TWN.write_cot` stays the readable reference; tests/test_decode.py checks the two agree.
"""

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import lora
from model import TWN, State

MODES = ("eager", "reduce-overhead", "graph")


def _round_up(n, m):
    return -(-n // m) * m


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention that reads each K/V head once, never a copy per query head.

    Qwen2-VL shares each K/V head among several query heads (2B: 12 query heads, 2 K/V heads).
    transformers' "sdpa" lets torch handle that only when there is no mask; with a mask it first copies
    K and V once per query head (`repeat_kv`). A static cache always has a mask (its unwritten slots), so
    every decode step would copy the whole cache six times per layer: on the 2B model at batch 32 that is
    ~2.5 GB written and read again per token, more than reading the weights. Here the G query heads
    of a group become G query rows of their K/V head, (B, H, L, D) -> (B, H/G, G*L, D), each row
    keeping its own mask row: the same attention, one read of the cache.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, L, D = query.shape
    q = query.reshape(B, H // groups, groups * L, D)  # query head h = k * G + j reads K/V head k, as repeat_kv
    mask = attention_mask if L == 1 else attention_mask.repeat(1, 1, groups, 1)  # (B, 1, L, S) -> (B, 1, G*L, S)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, H, L, D).transpose(1, 2), None  # (B, L, H, D), as transformers' attention functions return


# registered under our own name, with sdpa's mask; FastDecoder switches the LM to it while it decodes
AttentionInterface.register("twn_grouped_sdpa", grouped_attention)
AttentionMaskInterface.register("twn_grouped_sdpa", sdpa_mask)


class FastDecoder:
    """`TWN.write_cot` over a static cache. Callable with write_cot's signature; keep one per model.

    The cache, the step's input buffers and the graph are kept between calls and grow only when a call
    needs more rows or slots (rows rounded up to a power of two, slots to a multiple of 64), so a stream
    of batches of varying size records a handful of graphs, not one per batch. Extra rows decode pad
    tokens and are dropped; extra slots stay masked.
    """

    def __init__(self, twn: TWN, mode="eager", check_every=8, fuse=True, grouped=True):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose from {MODES}")
        self.twn, self.mode = twn, mode
        # fuse: decode on a copy of the weights with the reason adapter folded in (lora.LoRALinear.fuse),
        # refreshed at every call: one GEMM per layer and step instead of three plus casts. Costs one more
        # copy of the LM's projection weights; in bf16 the folded weights round differently from the live
        # adapter, so a greedy token can differ where two logits are within bf16 rounding.
        self.fuse = fuse
        # grouped: attention reads each K/V head of the cache once (grouped_attention) where the LM runs
        # transformers' "sdpa"; False keeps transformers' copy per query head (to measure what it costs)
        self.grouped = grouped
        self.check_every = check_every  # all rows done? costs a host sync, so ask every few steps
        self.cache, self.rows, self.slots, self.graph = None, 0, 0, None
        # dynamic=False: one compiled step per capacity, and capacities change rarely
        kw = dict(mode="reduce-overhead") if mode == "reduce-overhead" else {}
        self.step_fn = self.forward if mode == "eager" else torch.compile(self.forward, dynamic=False, **kw)

    def forward(self, tok, pos, mask):
        """(R, L) token ids, (3, R, L) positions, (R, capacity) mask -> (R, V) fp32 logits of the last token.

        Writes the tokens' KV at the cache's current slot and advances it. Called under `self.reasoning()`.
        """
        twn = self.twn
        embeds = twn.token_embeds(tok).to(twn.lm.dtype)
        out = twn.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                     use_cache=True)
        return twn.backbone.lm_head(out.last_hidden_state[:, -1]).float()

    @contextlib.contextmanager
    def reasoning(self):
        """The reason adapter on, live or through its fused copy; the cache read by grouped_attention."""
        config = self.twn.lm.config
        previous = config._attn_implementation
        if self.grouped and previous == "sdpa":
            config._attn_implementation = "twn_grouped_sdpa"  # read by every layer at call time
        try:
            with self.twn.adapters.use("reason", fused=self.fuse):
                yield
        finally:
            config._attn_implementation = previous

    def reserve(self, rows, slots, like):
        """Make sure the cache holds `rows` x `slots`; `like` is one layer's (k, v) for dtype, heads and device."""
        k, v = like
        if self.cache is not None and rows <= self.rows and slots <= self.slots and \
                self.mask.device == k.device and self.cache.layers[0].keys.dtype == k.dtype:
            return
        R = self.rows = max(self.rows, 1 << (rows - 1).bit_length())
        S = self.slots = max(self.slots, _round_up(slots, 64))
        self.cache = StaticCache(config=self.twn.backbone.config, max_cache_len=S)
        for layer in self.cache.layers:
            # allocates (R, kv_heads, S, head_dim) and marks it a static address for CUDA graphs
            layer.lazy_initialization(k.new_empty(R, k.shape[1], 1, k.shape[3]), v.new_empty(R, v.shape[1], 1, v.shape[3]))
        # the step's inputs live in fixed buffers, written in place before each step (a graph reads them there)
        self.tok = torch.full((R, 1), self.twn.pad_id, dtype=torch.long, device=k.device)
        self.pos = torch.zeros(3, R, 1, dtype=torch.long, device=k.device)
        self.mask = torch.zeros(R, S, dtype=torch.long, device=k.device)
        self.graph = None  # recorded again on the next step

    def step(self):
        """One token per row from the buffers (self.tok, self.pos, self.mask) -> (R, V) logits."""
        if self.mode == "graph":
            if self.graph is None:
                self.record()
            self.graph.replay()
            return self.logits
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        with self.reasoning():
            return self.step_fn(self.tok, self.pos, self.mask)

    def record(self):
        """Record one step as a CUDA graph (after a warm-up on a side stream, as torch.cuda.graph asks)."""
        if not self.mask.is_cuda:
            raise RuntimeError('FastDecoder mode "graph" needs CUDA; use "eager" on the CPU')
        # subtle: the warm-up steps really run and advance the write slot; put it back afterwards (the
        # replay then rewrites the same slot with the same values). Recording itself runs nothing.
        slot = [layer.cumulative_length.clone() for layer in self.cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.reasoning():
            for _ in range(2):  # the first call compiles
                self.step_fn(self.tok, self.pos, self.mask)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self.reasoning():
            self.logits = self.step_fn(self.tok, self.pos, self.mask)  # a buffer every replay rewrites
        for layer, s in zip(self.cache.layers, slot):
            layer.cumulative_length.copy_(s)

    @torch.no_grad()
    def __call__(self, enc: State, max_new_tokens=64, temperature=0.0, generator=None):
        """Same contract as `TWN.write_cot`: (ids (B, L) pad after eos, mask (B, L), State after the CoT)."""
        twn = self.twn
        B, T0 = enc.mask.shape
        P = twn.think_ids.numel()
        start = T0 + P  # slot of CoT token 0
        if self.fuse:
            lora.fuse(twn.backbone, "reason")  # in place: the adapter may have trained since the last call (RL)
        self.reserve(B, start + max_new_tokens, enc.kv[0])
        R, dev = self.rows, enc.mask.device

        # --- the input's encoding into slots [0, T0); rows B..R-1 are filler (never read back)
        for layer, (k, v) in zip(self.cache.layers, enc.kv):
            layer.keys[:B, :, :T0] = k
            layer.values[:B, :, :T0] = v
            layer.cumulative_length.fill_(T0)  # the write slot: StaticLayer.update advances it in place
        mask = self.mask  # (R, S): the whole capacity, fixed shape
        mask.zero_()
        mask[:B, :T0] = enc.mask
        mask[:, T0:start] = 1
        mask[B:, start:] = 1  # filler rows stay "live" so none of their queries sees an empty mask
        next_pos = torch.zeros(R, dtype=torch.long, device=dev)
        next_pos[:B] = enc.next_pos

        # --- the think prompt: P tokens at once, eager (a different shape from the step's)
        prompt = twn.think_ids[None].expand(R, -1)
        pos = (next_pos[:, None] + torch.arange(P, device=dev)).expand(3, R, P)
        with self.reasoning():
            logits = self.forward(prompt, pos, mask)
        next_pos += P

        # --- one token per step, every shape fixed
        ids = torch.full((B, max_new_tokens), twn.pad_id, dtype=torch.long, device=dev)
        out_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        self.tok.fill_(twn.pad_id)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            # sampling as in write_cot, on the real rows only: the same draws from the same generator
            if temperature > 0:
                probs = torch.softmax(logits[:B] / temperature, -1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tok = logits[:B].argmax(-1)
            live = ~done
            tok = torch.where(live, tok, torch.full_like(tok, twn.pad_id))
            ids[:, t], out_mask[:, t] = tok, live
            mask[:B, start + t] = live  # subtle: a finished row appends a masked pad, as in write_cot
            self.tok[:B, 0] = tok
            self.pos.copy_(next_pos[None, :, None].expand(3, R, 1))
            logits = self.step()
            next_pos[:B] += live
            done = done | (tok == twn.eos_id)
            if (t + 1) % self.check_every == 0 and done.all():
                break

        # write_cot stops at the first step where every row is done: the longest row's length
        L = int(out_mask.sum(1).max())
        end = start + L
        # copies: the cache is reused by the next call, the returned State must outlive it
        kv = [(layer.keys[:B, :, :end].clone(), layer.values[:B, :, :end].clone()) for layer in self.cache.layers]
        return ids[:, :L], out_mask[:, :L], State(kv, mask[:B, :end].clone(), next_pos[:B])
