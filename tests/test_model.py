"""lora.py and model.py against references: the base layer, the plain HF model, one full forward."""

import json

import pytest
import torch
import torch.nn.functional as F

import lora
import model as twn_model
from tiny import EOS, THINK, make_batch, random_cot, randomize_adapters, tiny_backbone, tiny_twn

ROWS = [((2, 2), 5), ((3, 2), 2), (None, 7), ((1, 1), 3)]  # mixed image sizes, a text-only row, left padding


# --- lora.py ------------------------------------------------------------------------------------

def test_lora_with_zero_B_equals_base_layer():
    base = torch.nn.Linear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(base.state_dict())
    switch = lora.AdapterSwitch(["reason", "embed"])
    layer = lora.LoRALinear(base, switch, lora.LoRAConfig(r=4, alpha=8))
    x = torch.randn(3, 16)
    with switch.use("embed"):
        assert torch.equal(layer(x), ref(x))
    assert layer.lora_A["embed"].weight.abs().sum() > 0  # A is Kaiming, not zero


def test_lora_merged_equals_unmerged_and_adapters_differ():
    switch = lora.AdapterSwitch(["reason", "embed"])
    layer = lora.LoRALinear(torch.nn.Linear(16, 8), switch, lora.LoRAConfig(r=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B["reason"].weight)
    torch.nn.init.normal_(layer.lora_B["embed"].weight)
    x = torch.randn(5, 16)
    with switch.use("reason"):
        unmerged = layer(x)
    with switch.use("embed"):
        assert not torch.allclose(layer(x), unmerged)
    layer.merge("reason")
    with switch.use("reason"):
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with switch.use("embed"), pytest.raises(RuntimeError, match="merged"):
        layer(x)
    layer.unmerge()
    with switch.use("reason"):
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_fused_copy_equals_the_live_adapter_follows_it_and_refuses_gradients():
    switch = lora.AdapterSwitch(["reason", "embed"])
    layer = lora.LoRALinear(torch.nn.Linear(16, 8), switch, lora.LoRAConfig(r=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B["reason"].weight)
    x = torch.randn(3, 5, 16)
    layer.fuse("reason")
    with torch.no_grad():
        with switch.use("reason"):
            live = layer(x)
        with switch.use("reason", fused=True):
            torch.testing.assert_close(layer(x), live, rtol=1e-5, atol=1e-5)
        copy = layer.fused["reason"]
        layer.lora_B["reason"].weight.mul_(-1)  # the adapter trains (RL): a stale copy is now wrong ...
        with switch.use("reason"):
            live = layer(x)
        with switch.use("reason", fused=True):
            assert not torch.allclose(layer(x), live, atol=1e-3)
        layer.fuse("reason")  # ... until it is refreshed, in place (a CUDA graph keeps reading the same memory)
        assert layer.fused["reason"] is copy
        with switch.use("reason", fused=True):
            torch.testing.assert_close(layer(x), live, rtol=1e-5, atol=1e-5)
    with switch.use("reason", fused=True), pytest.raises(RuntimeError, match="no gradient"):
        layer(x)  # training through the copy would silently train nothing
    with switch.use("embed"):
        assert layer(x).requires_grad  # the other adapter is live as before
    layer.double()  # the model moved (dtype here; a device alike): the copy follows it, not stays behind
    layer.fuse("reason")
    with torch.no_grad(), switch.use("reason", fused=True):
        assert layer(x.double()).dtype == torch.float64
    layer.merge("embed")
    with pytest.raises(RuntimeError, match="merged"):
        layer.fuse("reason")  # a copy of W + embed's update + reason's update would be neither adapter


def test_inject_fails_loudly_on_a_target_that_matches_nothing():
    with pytest.raises(ValueError, match="c_attn"):
        lora.inject(tiny_backbone(), cfg=lora.LoRAConfig(targets=("q_proj", "c_attn")))


def test_inject_skips_the_vision_tower_by_default():
    backbone = tiny_backbone()
    lora.inject(backbone, cfg=lora.LoRAConfig(r=2))
    names = [n for n, _ in lora.lora_layers(backbone)]
    assert names and not any(".visual." in n for n in names)
    assert len(names) == 7 * backbone.config.text_config.num_hidden_layers


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_adapters_off_equals_plain_hf_model(model_type):
    twn = tiny_twn(model_type)
    randomize_adapters(twn)
    plain = tiny_backbone(model_type)  # same seed: same base weights, never injected
    batch = make_batch(twn, ROWS)
    with twn.adapters.use(None):
        ours = twn.backbone.model(**batch).last_hidden_state
    ref = plain.model(**batch).last_hidden_state
    torch.testing.assert_close(ours, ref)
    with twn.adapters.use("embed"):
        assert not torch.allclose(twn.backbone.model(**batch).last_hidden_state, ref)


# --- single encode == full recompute --------------------------------------------------------------

def full_forward_embedding(twn, batch, b, extra_ids, adapter="embed"):
    """Reference: ONE forward over [input row b unpadded, extra_ids, K queries], positions from get_rope_index."""
    keep = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][keep]
    types = batch["mm_token_type_ids"][b][keep]
    image_kw = {}
    if (types == 1).any():
        has_image = [(batch["mm_token_type_ids"][i] == 1).any().item() for i in range(b + 1)]
        k = sum(has_image) - 1  # this row's image index
        grids = batch["image_grid_thw"]
        start = int(grids[:k].prod(-1).sum())
        image_kw = dict(pixel_values=batch["pixel_values"][start:start + int(grids[k].prod())],
                        image_grid_thw=grids[k:k + 1])
    K = twn.cfg.num_queries
    full_ids = torch.cat([ids, extra_ids, torch.full((K,), 10)])
    full_types = torch.cat([types, torch.zeros(len(extra_ids) + K, dtype=types.dtype)])
    pos, _ = twn.backbone.model.get_rope_index(full_ids[None], full_types[None], image_kw.get("image_grid_thw"))
    embeds = twn.token_embeds(full_ids[None]).clone()
    embeds[0, -K:] = twn.queries
    with twn.adapters.use(adapter):
        out = twn.backbone.model(inputs_embeds=embeds, position_ids=pos, mm_token_type_ids=full_types[None], **image_kw)
    return F.normalize(out.last_hidden_state[0, -K:].mean(0), dim=-1)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_cached_nothink_and_think_embeddings_equal_one_full_forward(model_type):
    twn = tiny_twn(model_type)
    randomize_adapters(twn)
    # a single full forward runs one adapter over every token, so give both adapters the same weights;
    # the cached path still switches adapters between segments and must land on the same numbers
    with torch.no_grad():
        for _, layer in lora.lora_layers(twn.backbone):
            layer.lora_A["reason"].weight.copy_(layer.lora_A["embed"].weight)
            layer.lora_B["reason"].weight.copy_(layer.lora_B["embed"].weight)
    batch = make_batch(twn, ROWS)
    cot_ids, cot_mask = random_cot(len(ROWS), [4, 6, 2, 5])
    with torch.no_grad():
        out = twn(batch, cot_ids, cot_mask)
    for b in range(len(ROWS)):
        e0 = full_forward_embedding(twn, batch, b, torch.tensor([], dtype=torch.long))
        torch.testing.assert_close(out["e0"][b], e0, rtol=1e-4, atol=1e-5)
        cot = cot_ids[b][cot_mask[b].bool()]
        e1 = full_forward_embedding(twn, batch, b, torch.cat([torch.tensor(THINK), cot]))
        torch.testing.assert_close(out["e1"][b], e1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_queries_in_the_input_forward_equal_a_second_pass(model_type):
    """encode_embed (the queries appended to the input's forward) against encode then embed (a second
    pass over the cache): the same input KV, the same e0, the same gradients to the adapter and queries."""
    twn = tiny_twn(model_type)
    randomize_adapters(twn)
    batch = make_batch(twn, ROWS)
    one, pooled1, e1 = twn.encode_embed(batch)
    two = twn.encode(batch)
    pooled2, e2 = twn.embed(two)
    assert one.length == two.length == batch["input_ids"].shape[1]  # the queries' KV is not in the State
    for (k1, v1), (k2, v2) in zip(one.kv, two.kv):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    assert torch.equal(one.next_pos, two.next_pos) and torch.equal(one.mask, two.mask)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-6)
    weights = torch.randn(e1.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for e in (e1, e2):
        twn.zero_grad(set_to_none=True)
        (e * weights).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in twn.trainable_parameters("embed")])
    assert grads[0][-1].abs().sum() > 0  # the queries learn through the one-pass path
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_generated_cot_embedding_equals_teacher_forced_on_the_same_tokens():
    """write_cot appends one masked token per step; the result must equal feeding the CoT at once."""
    twn = tiny_twn()
    randomize_adapters(twn)
    batch = make_batch(twn, ROWS)
    with torch.no_grad():
        enc = twn.encode(batch)
        e1, ids, mask = twn.think_embed(enc, max_new_tokens=6)
        out = twn(batch, ids, mask)
    torch.testing.assert_close(e1, out["e1"], rtol=1e-4, atol=1e-5)
    # the mask is a prefix of ones that stops right after a row's eos
    n = mask.sum(1)
    assert torch.equal(mask, (torch.arange(mask.shape[1])[None] < n[:, None]).long())
    for b in range(len(ROWS)):
        eos = (ids[b] == EOS).nonzero()
        assert n[b] == (eos[0, 0] + 1 if len(eos) else mask.shape[1])


# --- the detach --------------------------------------------------------------------------------------

def grads_after(twn, loss):
    twn.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    side = lambda which: [p.grad for p in twn.trainable_parameters(which)]
    nonzero = lambda gs: any(g is not None and g.abs().sum() > 0 for g in gs)
    return nonzero(side("reason")), nonzero(side("embed"))


@pytest.mark.parametrize("detach", [True, False])
def test_detach_keeps_each_loss_on_its_own_adapter(detach):
    twn = tiny_twn(detach=detach)
    randomize_adapters(twn)
    batch = make_batch(twn, ROWS)
    cot_ids, cot_mask = random_cot(len(ROWS), [4, 6, 2, 5])
    out = twn(batch, cot_ids, cot_mask)
    contrastive = (out["e1"] @ out["e0"].T).sum()
    reason_grad, embed_grad = grads_after(twn, contrastive)
    assert embed_grad and reason_grad == (not detach)
    reason_grad, embed_grad = grads_after(twn, out["cot_loss"])
    assert reason_grad and embed_grad == (not detach)


def test_chunked_cot_logprobs_equal_a_full_log_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    ref = torch.log_softmax(head(hidden), -1).gather(2, ids[..., None]).squeeze(-1) * mask
    got = twn_model.token_logprobs(head, hidden, ids, mask, chunk=5)  # 13 real tokens: chunks of 5, 5, 3
    torch.testing.assert_close(got, ref)
    assert (got[mask == 0] == 0).all()
    g_ref = torch.autograd.grad(ref.sum(), [hidden, head.weight])
    g_got = torch.autograd.grad(got.sum(), [hidden, head.weight])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_only_lora_and_queries_are_trainable():
    twn = tiny_twn()
    randomize_adapters(twn)
    trainable = {n for n, p in twn.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in twn.named_parameters() if ".lora_" in n} | {"queries"}
    out = twn(make_batch(twn, ROWS), *random_cot(len(ROWS), [3, 3, 3, 3]))
    (out["cot_loss"] + out["e1"].sum()).backward()
    assert all(p.grad is None for n, p in twn.named_parameters() if not p.requires_grad)


# --- files -------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_peft_layout(tmp_path):
    twn = tiny_twn()
    randomize_adapters(twn)
    twn.save(tmp_path)
    other = tiny_twn()
    other.load(tmp_path)
    for (n, p), (_, q) in zip(twn.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n
    assert twn_model.read_config(tmp_path) == twn.cfg

    lora.export_peft(twn.backbone, "reason", twn.cfg.lora(), tmp_path / "peft")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and "down_proj" in conf["target_modules"]


def test_fused_embed_serves_the_same_embeddings_refuses_training_and_follows_load(tmp_path):
    """TWN.fuse("embed"), evaluate.py's default: no-think and think embeddings as with the live adapter."""
    twn = tiny_twn()
    randomize_adapters(twn)
    batch = make_batch(twn, ROWS)
    cot_ids, cot_mask = random_cot(len(ROWS), [4, 6, 2, 5])
    with torch.no_grad():
        live = twn(batch, cot_ids, cot_mask)
        twn.fuse("embed")
        fused = twn(batch, cot_ids, cot_mask)
    for k in ("e0", "e1", "cot_loss"):
        torch.testing.assert_close(fused[k], live[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no gradient"):
        twn(batch, cot_ids, cot_mask)  # training through the fused copy would silently train nothing

    other = tiny_twn()
    randomize_adapters(other, seed=5)
    other.save(tmp_path)
    twn.load(tmp_path)  # new adapters: the fused copy must follow them
    with torch.no_grad():
        after = twn.embed_items(batch)
        twn.fused.clear()
        ref = twn.embed_items(batch)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, fused["e0"], atol=1e-3)


def test_config_json_is_validated():
    with pytest.raises(ValueError, match="unknown"):
        twn_model.TWNConfig.from_dict({"rank": 8})
    with pytest.raises(ValueError, match="must be int"):
        twn_model.TWNConfig.from_dict({"r": "8"})


def test_param_report_puts_qwen2_vl_2b_in_the_papers_range():
    rows = {name: pct for name, _, _, pct in twn_model.param_report(twn_model.TWNConfig())}
    assert 3.0 <= rows["Qwen2-VL-2B"] <= 5.0
