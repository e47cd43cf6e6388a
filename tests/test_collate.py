"""data/tokenizer.py and data/collate.py: round trips, left padding, image token expansion, and the
contract that matters: a tiny random Qwen2VLForConditionalGeneration runs on a collated batch."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.collate import Processor
from data.mmeb import QWEN_IMAGE, Item
from data.tokenizer import build_word_tokenizer

WORDS = ["what colour is the square ?", "red blue green", "top-left", "it is ."]
QWEN2_VL_MEAN = [0.48145466, 0.4578275, 0.40821073]
QWEN2_VL_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture
def backbone_dir(tmp_path):
    """A backbone directory as Processor.from_pretrained reads it: tokenizer files + preprocessor_config.json."""
    build_word_tokenizer(WORDS).save_pretrained(tmp_path)
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112 * 4,
        "image_mean": QWEN2_VL_MEAN,
        "image_std": QWEN2_VL_STD,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return tmp_path


def save_image(path, width, height):
    Image.new("RGB", (width, height), "red").save(path)
    return str(path)


# ----------------------------------------------------------------------------- tokenizer


def test_word_tokenizer_round_trip(tmp_path):
    tok = build_word_tokenizer(WORDS)
    text = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|> what colour ?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vocab = tok.get_vocab()
    expected = [vocab[t] for t in ["<|vision_start|>", "<|image_pad|>", "<|image_pad|>", "<|vision_end|>"]]
    assert ids == expected + [vocab["what"], vocab["colour"], vocab["?"]]

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sentence = "What colour is the top-left square? <|im_start|>it is red.<|im_end|>"
    assert loaded(sentence)["input_ids"] == tok(sentence)["input_ids"]
    assert loaded.get_vocab() == vocab
    assert (loaded.pad_token, loaded.eos_token) == ("<|endoftext|>", "<|im_end|>")


def test_word_tokenizer_specials_are_single_ids():
    tok = build_word_tokenizer(WORDS)
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]:
        assert tok.tokenize(token) == [token]
        assert token in tok.all_special_tokens
    assert tok.tokenize("Top-left?") == ["top", "-", "left", "?"]
    assert tok.convert_ids_to_tokens(tok("purple")["input_ids"]) == ["<unk>"]


# ----------------------------------------------------------------------------- collate


def test_mixed_batch(backbone_dir, tmp_path):
    processor = Processor.from_pretrained(str(backbone_dir))
    small = save_image(tmp_path / "small.png", 56, 56)  # grid 1x4x4 -> 4 LLM tokens
    wide = save_image(tmp_path / "wide.png", 112, 84)  # grid 1x6x8 -> 12 LLM tokens
    items = [
        Item(QWEN_IMAGE + " what colour ?", small),
        Item("what colour is the square ?"),
        Item(QWEN_IMAGE, wide),
    ]
    batch = processor(items)

    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]  # images in batch order
    assert batch["pixel_values"].shape == (16 + 48, 3 * 2 * 14 * 14)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [4, 0, 12]
    assert torch.equal(types, (ids == processor.image_token_id).long())

    # left padding: every row ends in a real token, padding only at the front
    lengths = [1 + 4 + 1 + 3, 6, 1 + 12 + 1]
    assert mask.sum(1).tolist() == lengths
    assert mask[:, -1].tolist() == [1, 1, 1]
    for row, n in enumerate(lengths):
        assert mask[row, : ids.shape[1] - n].sum() == 0
        assert (ids[row, : ids.shape[1] - n] == processor.pad_id).all()
    first = ids[0, ids.shape[1] - lengths[0] :].tolist()
    assert first[0] == processor.vision_start_id and first[5] == processor.vision_end_id

    text_only = processor([Item("what colour ?")])
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only


def image_tokens(processor, item):
    return int((processor([item])["input_ids"] == processor.image_token_id).sum())


def test_max_pixels_caps_image_tokens(backbone_dir, tmp_path):
    class_default = dict(Qwen2VLImageProcessorPil.size)
    big = Item(QWEN_IMAGE, save_image(tmp_path / "big.png", 1000, 1000))
    assert image_tokens(Processor.from_pretrained(str(backbone_dir)), big) == 112 * 112 * 4 // 28**2
    assert image_tokens(Processor.from_pretrained(str(backbone_dir), max_pixels=56 * 56), big) == 4
    assert Qwen2VLImageProcessorPil.size == class_default  # the override did not leak into the class


def test_qwen3_vl_style_config(backbone_dir, tmp_path):
    """Qwen3-VL files give 16 px patches and bounds as size.shortest_edge / longest_edge."""
    config = json.loads((backbone_dir / "preprocessor_config.json").read_text())
    del config["min_pixels"], config["max_pixels"]
    config.update(patch_size=16, size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
    (backbone_dir / "preprocessor_config.json").write_text(json.dumps(config))
    processor = Processor.from_pretrained(str(backbone_dir))
    assert image_tokens(processor, Item(QWEN_IMAGE, save_image(tmp_path / "a.png", 64, 64))) == 4  # 32 px/token
    assert image_tokens(processor, Item(QWEN_IMAGE, save_image(tmp_path / "b.png", 999, 999))) == 16


def test_image_token_mismatch_is_an_error(backbone_dir, tmp_path):
    processor = Processor.from_pretrained(str(backbone_dir))
    with pytest.raises(ValueError, match="item 0 has an image but its text has 0 <|image_pad|>"):
        processor([Item("what colour ?", save_image(tmp_path / "a.png", 56, 56))])
    with pytest.raises(ValueError, match="item 1 has no image but its text has 1"):
        processor([Item("red"), Item(QWEN_IMAGE)])


def test_exif_orientation_is_applied(backbone_dir, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": stored 112 wide x 56 high, shown 56 wide x 112 high
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (112, 56), "red").save(path, exif=exif)
    batch = Processor.from_pretrained(str(backbone_dir))([Item(QWEN_IMAGE, str(path))])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 4]]  # (t, h, w) of the upright image


def test_continuation_and_decode(backbone_dir):
    processor = Processor.from_pretrained(str(backbone_dir))
    ids, mask = processor.tokenize_continuation(["it is red .", "red"])
    assert ids.shape == mask.shape == (2, 5)
    assert ids[0, -1] == processor.eos_id and ids[1, 1] == processor.eos_id  # right padded, eos last
    assert mask.sum(1).tolist() == [5, 2] and (ids[1, 2:] == processor.pad_id).all()
    assert processor.decode(ids) == ["it is red .", "red"]

    no_eos, _ = processor.tokenize_continuation(["red"], add_eos=False)
    assert no_eos.tolist() == [[processor.tokenizer.get_vocab()["red"]]]
    generated = torch.tensor([ids[0].tolist() + [processor.tokenizer.get_vocab()["blue"]]])
    assert processor.decode(generated) == ["it is red ."]  # stops at eos


def test_tiny_qwen2_vl_forward_on_collated_batch(backbone_dir, tmp_path):
    """The contract: the collated batch is exactly what Qwen2VLForConditionalGeneration takes."""
    processor = Processor.from_pretrained(str(backbone_dir))
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=processor.pad_id,
            # head_dim 16: the temporal/height/width M-RoPE sections sum to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=processor.image_token_id,
        video_token_id=processor.tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=processor.vision_start_id,
        vision_end_token_id=processor.vision_end_id,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    items = [
        Item(QWEN_IMAGE + " what colour ?", save_image(tmp_path / "small.png", 56, 56)),
        Item("what colour is the square ?"),
        Item(QWEN_IMAGE, save_image(tmp_path / "wide.png", 112, 84)),
    ]
    batch = processor(items)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(out.logits[batch["attention_mask"].bool()]).all()

    # Padding and batching change nothing: each row's last-token logits equal the row run alone.
    for row, item in enumerate(items):
        with torch.no_grad():
            alone = model(**processor([item])).logits[0, -1]
        torch.testing.assert_close(out.logits[row, -1], alone, rtol=1e-4, atol=1e-5)


def test_decode_takes_ragged_rows_and_cuts_at_eos(backbone_dir):
    proc = Processor.from_pretrained(backbone_dir)
    ids = proc.tokenizer("red blue", add_special_tokens=False)["input_ids"]
    texts = proc.decode([ids + [proc.eos_id, ids[0]], ids[:1]])
    assert texts == ["red blue", "red"]
