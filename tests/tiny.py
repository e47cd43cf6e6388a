"""Tiny random Qwen2-VL / Qwen3-VL backbones and hand-made batches for the model tests (no download)."""

import torch

import model as twn_model

# token ids of the tiny vocabulary: specials first, then plain "words" 8..VOCAB-1
PAD, EOS, VSTART, VEND, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5
VOCAB = 48
THINK = [8, 9]


def tiny_backbone(model_type="qwen2_vl", seed=0):
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    if model_type == "qwen2_vl":  # head_dim 16: M-RoPE sections sum to 8
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64)
    else:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = twn_model.build_config(model_type, text, vision)
    config.image_token_id, config.video_token_id = IMAGE, VIDEO
    config.vision_start_token_id, config.vision_end_token_id = VSTART, VEND
    return twn_model.AutoModelForImageTextToText.from_config(config).eval()


def tiny_twn(model_type="qwen2_vl", seed=0, **cfg):
    backbone = tiny_backbone(model_type, seed)
    return twn_model.TWN(backbone, twn_model.TWNConfig(r=4, alpha=8.0, **cfg), pad_id=PAD, eos_id=EOS, think_ids=THINK)


def randomize_adapters(twn, seed=1):
    """Give every LoRA B a random value (B = 0 would make every adapter equal the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twn.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_batch(twn, rows, seed=0):
    """rows: list of (image_hw or None, n_text_tokens) -> a left-padded collated batch, as data/collate makes.

    image_hw is in merged tokens (h, w), e.g. (2, 2) = a 2x2 grid of LLM image tokens.
    """
    g = torch.Generator().manual_seed(seed)
    vis = twn.backbone.config.vision_config
    patch_dim = 3 * vis.temporal_patch_size * vis.patch_size ** 2
    seqs, types, grids, pixels = [], [], [], []
    for hw, n_text in rows:
        ids = []
        if hw is not None:
            h, w = hw
            ids += [VSTART] + [IMAGE] * (h * w) + [VEND]
            grids.append([1, 2 * h, 2 * w])
            pixels.append(torch.randn(4 * h * w, patch_dim, generator=g))
        ids += torch.randint(10, VOCAB, (n_text,), generator=g).tolist()
        seqs.append(ids)
        types.append([1 if t == IMAGE else 0 for t in ids])
    T = max(map(len, seqs))
    pad = lambda x, v: [v] * (T - len(x)) + x  # left padding
    batch = dict(
        input_ids=torch.tensor([pad(s, PAD) for s in seqs]),
        attention_mask=torch.tensor([pad([1] * len(s), 0) for s in seqs]),
        mm_token_type_ids=torch.tensor([pad(t, 0) for t in types]),
    )
    if grids:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch


def random_cot(B, lengths, seed=0):
    """Right-padded CoT ids ending in EOS: (B, L) ids, (B, L) mask."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((B, L), PAD)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n - 1] = torch.randint(10, VOCAB, (n - 1,), generator=g)
        ids[b, n - 1] = EOS
        mask[b, :n] = 1
    return ids, mask
