"""decode.FastDecoder against the reference loop TWN.write_cot: same tokens, same State, same think embedding."""

import pytest
import torch

import decode
import model as twn_model
from tiny import EOS, make_batch, randomize_adapters, tiny_twn

ROWS = [((2, 2), 5), ((3, 2), 2), (None, 7), ((1, 1), 3)]  # mixed image sizes, a text-only row, left padding


def setup(model_type, seed=0):
    twn = tiny_twn(model_type, seed=seed)
    randomize_adapters(twn, seed=seed + 1)
    with torch.no_grad():
        enc = twn.encode(make_batch(twn, ROWS, seed=seed))
    return twn, enc


def assert_same_state(a, b):
    assert len(a.kv) == len(b.kv)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.next_pos, b.next_pos)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_greedy_equals_write_cot_token_for_token(model_type):
    twn, enc = setup(model_type)
    ref = twn.write_cot(enc, max_new_tokens=12)
    fast = decode.FastDecoder(twn)(enc, max_new_tokens=12)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert_same_state(fast[2], ref[2])
    e_ref = twn.think_embed(enc, 12)[0]
    e_fast = twn.think_embed(enc, 12, decode=decode.FastDecoder(twn))[0]
    torch.testing.assert_close(e_fast, e_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_sampled_equals_write_cot_with_the_same_generator(model_type):
    twn, enc = setup(model_type, seed=2)
    ref = twn.write_cot(enc, 16, temperature=1.0, generator=torch.Generator().manual_seed(7))
    fast = decode.FastDecoder(twn)(enc, 16, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert_same_state(fast[2], ref[2])
    other = decode.FastDecoder(twn)(enc, 16, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other[0], fast[0])  # the seed matters: it is really sampling


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "heads inner"])
def test_grouped_attention_equals_transformers_sdpa(L, layout, monkeypatch):
    """The decoder's attention (query heads folded onto their K/V head) against transformers' own, which
    copies K/V per query head: random inputs, a padded mask, one query row (a decode step) and several.
    The memory layout of SDPA's output is its kernel's choice: CUDA's memory-efficient kernel writes
    (B, L, H, D) and returns it transposed, which a `.view` cannot regroup ("heads inner" mimics it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if layout == "heads inner":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))

    class Layer:  # what the attention functions read from the module
        num_key_value_groups, training, is_causal = 3, False, True

    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 6, 9, 8
    q, k, v = (torch.randn(b, h, n, D, generator=g) for b, h, n in [(B, H, L), (B, 2, S), (B, 2, S)])
    mask = torch.rand(B, 1, L, S, generator=g) > 0.3
    mask[..., -1] = True  # every query row sees at least one slot
    ref, _ = sdpa_attention_forward(Layer(), q, k, v, mask, scaling=0.3)
    out, _ = decode.grouped_attention(Layer(), q, k, v, mask, scaling=0.3)
    assert out.shape == ref.shape == (B, L, H, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, 0], out[:, :, 3])  # heads of different groups differ: not a broadcast


def test_the_decoder_attends_through_grouped_attention_and_puts_the_setting_back():
    twn, enc = setup("qwen2_vl")
    seen = []
    real = decode.grouped_attention

    def spy(module, query, *a, **k):
        seen.append(query.shape[2])
        return real(module, query, *a, **k)

    from transformers import AttentionInterface
    AttentionInterface.register("twn_grouped_sdpa", spy)
    try:
        out = decode.FastDecoder(twn)(enc, 5)
        plain = decode.FastDecoder(twn, grouped=False)(enc, 5)
    finally:
        AttentionInterface.register("twn_grouped_sdpa", real)
    layers = twn.backbone.config.text_config.num_hidden_layers
    assert seen.count(2) == layers and seen.count(1) == 5 * layers  # the think prompt, then 5 steps; not `plain`
    assert twn.lm.config._attn_implementation == "sdpa"
    assert torch.equal(out[0], plain[0])


def test_the_fused_decoder_follows_an_adapter_that_trained_between_calls():
    twn, enc = setup("qwen2_vl", seed=4)
    fused, live = decode.FastDecoder(twn), decode.FastDecoder(twn, fuse=False)
    assert torch.equal(fused(enc, 12)[0], twn.write_cot(enc, 12)[0])
    randomize_adapters(twn, seed=9)  # an RL step changed the reason adapter: the next call must see it
    ref = twn.write_cot(enc, 12)[0]
    assert torch.equal(fused(enc, 12)[0], ref) and torch.equal(live(enc, 12)[0], ref)


def test_rows_stop_at_eos_independently():
    twn, enc = setup("qwen2_vl")
    twn.eos_id = 12  # an ordinary word, sampled now and then at temperature 2: rows end at different steps
    gen = lambda: torch.Generator().manual_seed(3)
    ref = twn.write_cot(enc, 40, temperature=2.0, generator=gen())
    ids, mask, after = decode.FastDecoder(twn, check_every=5)(enc, 40, temperature=2.0, generator=gen())
    assert torch.equal(ids, ref[0]) and torch.equal(mask, ref[1])
    assert torch.equal(after.next_pos, ref[2].next_pos)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1, "rows should finish at different steps for this test to mean anything"
    assert ids.shape[1] == max(lengths)  # the batch stops when its longest row stops
    for b, n in enumerate(lengths):
        assert mask[b, :n].all() and not mask[b, n:].any()  # live tokens first, then masked pads
        assert (ids[b, :n - 1] != twn.eos_id).all()
        assert ids[b, n - 1] == twn.eos_id or n == 40  # a row stops at its eos (or at the budget)
        assert (ids[b, n:] == twn.pad_id).all()


def test_a_gathered_sub_batch_and_a_reused_cache_give_the_same_rows():
    """Adaptive inference decodes only the rows the gate picks (State.select); the decoder keeps its cache."""
    twn, enc = setup("qwen2_vl")
    dec = decode.FastDecoder(twn)
    full = dec(enc, 10)
    rows = torch.tensor([0, 2, 3])  # three rows: the cache has capacity 4, one filler row decodes pads
    sub = dec(enc.select(rows), 10)
    ref = twn.write_cot(enc.select(rows), 10)
    assert dec.rows == 4
    assert torch.equal(sub[0], ref[0]) and torch.equal(sub[1], ref[1])
    assert_same_state(sub[2], ref[2])
    # the same rows decoded in the full batch (greedy) are the same tokens, up to the batch's length
    n = sub[0].shape[1]
    assert torch.equal(full[0][rows][:, :n], sub[0])
    # the State returned by the first call was copied out: later calls do not overwrite it
    again = twn.write_cot(enc, 10)
    assert_same_state(full[2], again[2])


def embedder(twn, batch_size, think_pattern, fast=True):
    """evaluate.Embedder over make_batch inputs, with a gate that thinks on `think_pattern` (a bool per row
    of each batch) and, if fast, a FastDecoder that records the rows of each decode in `.decoded`."""
    import contextlib
    import evaluate
    import runtime

    class Spy(decode.FastDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.decoded = []

        def __call__(self, enc, *a, **k):
            self.decoded.append(enc.mask.shape[0])
            return super().__call__(enc, *a, **k)

    class Proc:  # the collator, reduced to what Embedder uses
        def __call__(self, rows):
            return make_batch(twn, rows)

        def decode(self, seqs):
            return [" ".join(map(str, s)) for s in seqs]

    class Gate:
        def decide(self, pooled):
            return torch.tensor(think_pattern)

    rt = runtime.Runtime(0, 1, torch.device("cpu"), contextlib.nullcontext)
    return evaluate.Embedder(twn, Proc(), rt, batch_size, 8, Gate(), decoder=Spy(twn) if fast else None)


def test_embedder_decodes_only_the_gated_rows_through_the_fast_decoder():
    twn, _ = setup("qwen2_vl")
    pattern = [False, True, False, True]  # think on rows 1 and 3
    ref = embedder(twn, 4, pattern, fast=False).queries(ROWS, ["nothink", "adaptive"])
    fast = embedder(twn, 4, pattern)
    outs = fast.queries(ROWS, ["nothink", "adaptive"])
    assert fast.decoder.decoded == [2]  # a dense sub-batch of the two gated rows
    for r, f in zip(ref, outs):
        assert r["thought"] == f["thought"] and r["cot"] == f["cot"] and r["tokens"] == f["tokens"]
        torch.testing.assert_close(f["adaptive"], r["adaptive"], rtol=1e-5, atol=1e-6)


def test_embedder_pools_the_thinking_rows_of_several_batches_into_one_decode():
    twn, _ = setup("qwen2_vl")
    rows = ROWS + ROWS[:2]  # three batches of two: inputs of different lengths in every batch
    emb = embedder(twn, 2, [False, True])  # think on the second row of each batch
    outs = emb.queries(rows, ["nothink", "adaptive"])
    assert emb.decoder.decoded == [2, 1]  # batches 1 and 2 pooled into one full decode; batch 3's row at the end
    for b in range(3):  # each batch on its own, its thinking row decoded alone
        with torch.no_grad():
            enc = twn.encode(make_batch(twn, rows[2 * b:2 * b + 2]))
            e0 = twn.embed(enc)[1]
            e1, ids, mask = twn.think_embed(enc.select(torch.tensor([1])), 8)
        skip, think = outs[2 * b], outs[2 * b + 1]
        assert not skip["thought"] and think["thought"]
        torch.testing.assert_close(skip["adaptive"], e0[0])
        torch.testing.assert_close(think["adaptive"], e1[0], rtol=1e-4, atol=1e-5)  # alone == pooled with others
        assert think["tokens"] == int(mask.sum())
        assert think["cot"] == " ".join(map(str, ids[0][mask[0].bool()].tolist()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu.sh runs this there)")
@pytest.mark.parametrize("mode", ["graph", "reduce-overhead"])
def test_cuda_graph_decoders_equal_write_cot(mode):
    twn = tiny_twn("qwen2_vl").cuda()  # fp32 on the GPU: tokens must match the reference loop exactly
    randomize_adapters(twn)
    with torch.no_grad():
        enc = twn.encode({k: v.cuda() for k, v in make_batch(twn, ROWS).items()})
    dec = decode.FastDecoder(twn, mode=mode)
    for rows in (None, torch.tensor([0, 2, 3], device="cuda"), torch.tensor([1], device="cuda")):
        e = enc if rows is None else enc.select(rows)  # the graph of the first call serves every later one
        ref = twn.write_cot(e, 12)
        out = dec(e, 12)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert_same_state(out[2], ref[2])
    gen = lambda: torch.Generator("cuda").manual_seed(5)
    ref = twn.write_cot(enc, 12, temperature=1.0, generator=gen())
    out = dec(enc, 12, temperature=1.0, generator=gen())
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_graph_mode_needs_cuda():
    twn, enc = setup("qwen2_vl")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        decode.FastDecoder(twn, mode="graph")(enc, 4)
