"""Batches of `Item`s -> Qwen2-VL / Qwen3-VL model inputs, left padded.

This is the input side of every embedding forward (queries, candidates, documents) and of CoT
generation: text through the backbone's tokenizer, images through transformers' PIL-only Qwen2-VL
image processor. The stock `Qwen2VLProcessor` pulls in torchvision for its video part, and
torchvision breaks beside the CPU torch, so this small processor stands in for it.

    >>> processor = Processor.from_pretrained("weights/Qwen2-VL-2B-Instruct", max_pixels=448 * 448)
    >>> batch = processor([Item("<|vision_start|><|image_pad|><|vision_end|> what colour ?", "/abs/a.png"),
    ...                    Item("a red square")])
    >>> model(**batch)  # input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
    >>> cot_ids, cot_mask = processor.tokenize_continuation(["the square is red ."])
    >>> processor.decode(generated_ids)  # -> list of strings, each cut at the first eos

Works with real Qwen2-VL / Qwen3-VL directories and with the mini world's word-level tokenizer
(data/tokenizer.py); patch size, merge size and pixel bounds are read from the directory's
`preprocessor_config.json` (Qwen2-VL: 14 px patches, Qwen3-VL: 16 px).

Bad inputs get a ValueError that names the image path and what is wrong (missing, not an image,
truncated or corrupt, over MAX_IMAGE_PIXELS, an aspect ratio over 200:1), never a half-read batch.
Any PIL mode becomes RGB (see `to_rgb`); a huge image is decoded shrunk towards `max_pixels`; a text
longer than `max_text_tokens` is cut at the end, with a warning (image tokens are never cut).
"""

import json
import math
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.mmeb import IMAGE_PAD, VISION_END, VISION_START, Item


def load_image_processor(
    backbone_dir: str, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen2VLImageProcessorPil:
    """The image processor described by `backbone_dir/preprocessor_config.json`.

    `min_pixels` / `max_pixels` override the file's bounds: `max_pixels` caps the tokens per image
    (one token per (patch * merge)^2 pixels), which keeps a huge image from blowing up memory.
    """
    path = os.path.join(backbone_dir, "preprocessor_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)

    def setting(name: str):
        if name not in config:
            raise ValueError(f"{path}: missing '{name}'")
        return config[name]

    # Qwen2-VL files say min_pixels / max_pixels, Qwen3-VL files say size.shortest_edge / longest_edge.
    size = config.get("size") or {}
    min_pixels = min_pixels or config.get("min_pixels") or size.get("shortest_edge")
    max_pixels = max_pixels or config.get("max_pixels") or size.get("longest_edge")
    if min_pixels is None or max_pixels is None:
        raise ValueError(f"{path}: missing min_pixels/max_pixels (or size.shortest_edge/longest_edge)")
    # A cap below the file's minimum wins: the caller asked for at most that many pixels.
    min_pixels = min(min_pixels, max_pixels)

    # subtle: pass `size`, not min_pixels= / max_pixels=; in transformers 5.17 those two kwargs are
    # written into the class-level default `size` dict, leaking into every later instance.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=setting("patch_size"),
        temporal_patch_size=setting("temporal_patch_size"),
        merge_size=setting("merge_size"),
        image_mean=setting("image_mean"),
        image_std=setting("image_std"),
    )


# Decompression bombs: a small file can decode to gigapixels. PIL warns above its own global limit
# (~89 M pixels) and refuses above twice that; twn refuses above this limit instead, with the path in
# the message, and leaves PIL's global alone. 12,000^2 RGB is ~430 MB decoded (a JPEG far less: `draft`).
MAX_IMAGE_PIXELS = 12_000 * 12_000
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses anything longer and thinner


def open_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image, upright (phone photos are stored sideways with an EXIF rotation flag).

    With `max_pixels` (the processor's cap), an image of more than 4x that many pixels is decoded
    shrunk by an integer factor (JPEG: inside the decoder, `Image.draft`; other formats: a box filter,
    `Image.reduce`), keeping at least twice the final size per side for the processor's own resize.
    Any problem is a ValueError that names the path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, against our limit
            image = Image.open(path)  # reads the header only
    except FileNotFoundError as e:
        raise ValueError(f"{path}: image file not found") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{path}: not an image file (PIL cannot identify its format)") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: over twn's limit of {MAX_IMAGE_PIXELS} pixels (data/collate.MAX_IMAGE_PIXELS)") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"{path}: unreadable image header, truncated or corrupt ({type(e).__name__}: {e})") from e
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{path}: {width}x{height} px is over twn's limit of {MAX_IMAGE_PIXELS} pixels "
                             "(data/collate.MAX_IMAGE_PIXELS, a guard against decompression bombs)")
        factor = shrink_factor(width, height, max_pixels)
        try:
            if factor > 1:
                image.draft(None, (width // factor, height // factor))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            # PIL reports a cut-off download as OSError("image file is truncated"), other damage variously
            raise ValueError(f"{path}: unreadable image, truncated or corrupt ({type(e).__name__}: {e})") from e
    # formats without draft (PNG, ...): the rest of the factor as a box filter (pixel counts: EXIF may rotate)
    rest = math.isqrt(rgb.width * rgb.height // max((width // factor) * (height // factor), 1))
    return rgb.reduce(rest) if rest > 1 else rgb


def shrink_factor(width: int, height: int, max_pixels: int | None) -> int:
    """How much smaller a huge image may be decoded: >= 2x the final size per side, short side >= 64 px.

    subtle: smart_resize's output depends on the aspect ratio only once an image is over max_pixels,
    so decoding smaller changes the token grid only when integer rounding nudges that ratio.
    """
    if not max_pixels:
        return 1
    return max(1, min(math.isqrt(width * height // (4 * max_pixels)), min(width, height) // 64))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB.

    - 16-bit greys ("I;16*", and "I", read as 16-bit data as PNG/TIFF greys are) are scaled by 255/65535:
      PIL's own convert clips them, which turns most 16-bit scans white.
    - Transparency (RGBA, LA, PA, or a palette / colour key with a `transparency` entry) is composited
      on WHITE, as Qwen-VL's own utilities do: transparent logos, charts and documents are drawn to be
      seen on a white page, and their black text would vanish on black.
    - Everything else (CMYK, palette, bilevel, YCbCr, ...) through PIL's convert.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image).astype(np.float64).clip(0, 65535) / 257  # 0..65535 -> 0..255
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class Processor:
    """Tokenizer + image processor: turns `Item`s into the tensors Qwen2-VL's forward takes.

    `max_text_tokens` caps the text part of each item (image tokens do not count and are never cut):
    a longer text keeps its first `max_text_tokens` tokens, with a warning saying how many were dropped.
    """

    def __init__(self, tokenizer, image_processor: Qwen2VLImageProcessorPil, max_text_tokens: int = 512):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = max_text_tokens
        self.merge_size = image_processor.merge_size
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.pad_id is None or self.eos_id is None:
            raise ValueError("the tokenizer needs a pad token and an eos token")
        self.image_token_id = self._token_id(IMAGE_PAD)
        self.vision_start_id = self._token_id(VISION_START)
        self.vision_end_id = self._token_id(VISION_END)

    @classmethod
    def from_pretrained(
        cls, backbone_dir: str, min_pixels: int | None = None, max_pixels: int | None = None,
        max_text_tokens: int = 512,
    ) -> "Processor":
        tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        return cls(tokenizer, load_image_processor(backbone_dir, min_pixels, max_pixels), max_text_tokens)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token")
        return token_id

    # ------------------------------------------------------------------------- model inputs

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        """Left-padded input_ids / attention_mask / mm_token_type_ids, plus pixel_values and
        image_grid_thw when some item has an image."""
        batch = {}
        images = [self._open(item.image) for item in items if item.image is not None]
        tokens_per_image = []
        if images:
            vision = self.image_processor(images, return_tensors="pt")
            batch["pixel_values"] = vision["pixel_values"]  # (sum of t*h*w over images, C*t_patch*p*p)
            batch["image_grid_thw"] = vision["image_grid_thw"]  # (num_images, 3), in batch order
            # The vision tower merges merge_size x merge_size patches into one LLM token.
            tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()

        counts = iter(tokens_per_image)
        rows = []
        for i, item in enumerate(items):
            ids = self._truncate(item, self.tokenizer(item.text, add_special_tokens=False)["input_ids"])
            ids = self._expand_image(i, ids, next(counts) if item.image is not None else None)
            if not ids:
                raise ValueError(f"item {i} has no tokens (empty text and no image)")
            rows.append(ids)
        batch.update(self._left_pad(rows))
        return batch

    def problem(self, item: Item) -> str | None:
        """Why `item` cannot be collated (its image, its placeholder, no tokens), or None if it can."""
        try:
            self([item])
        except ValueError as e:
            return str(e)
        return None

    def _open(self, path: str) -> Image.Image:
        image = open_image(path, self.image_processor.size["longest_edge"])
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise ValueError(f"{path}: {image.width}x{image.height} px is longer and thinner than "
                             f"{MAX_ASPECT_RATIO}:1, which Qwen2-VL's image processor refuses")
        return image

    def _truncate(self, item: Item, ids: list[int]) -> list[int]:
        """The item's ids with at most max_text_tokens text tokens: the rest of the text is dropped
        from the end, the vision placeholder tokens are always kept."""
        vision = (self.image_token_id, self.vision_start_id, self.vision_end_id)
        text = [k for k, t in enumerate(ids) if t not in vision]
        if len(text) <= self.max_text_tokens:
            return ids
        drop = set(text[self.max_text_tokens :])
        warnings.warn(
            f"text of {len(text)} tokens cut to max_text_tokens={self.max_text_tokens} "
            f"({len(drop)} tokens dropped): {item.text[:60]!r}...",
            stacklevel=3,
        )
        return [t for k, t in enumerate(ids) if k not in drop]

    def _expand_image(self, i: int, ids: list[int], num_tokens: int | None) -> list[int]:
        """Replace the item's single `<|image_pad|>` by one copy per LLM image token (None: no image)."""
        expected = 0 if num_tokens is None else 1
        found = ids.count(self.image_token_id)
        if found != expected:
            has = "no image" if num_tokens is None else "an image"
            raise ValueError(f"item {i} has {has} but its text has {found} {IMAGE_PAD} (expected {expected})")
        if num_tokens is None:
            return ids
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * num_tokens + ids[at + 1 :]

    def _left_pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        # subtle: LEFT padding. The last position of every row is then a real token, so last-token
        # pooling reads column -1 and generation appends CoT tokens right after each input.
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, width - len(row) :] = 1
        # mm_token_type_ids: 1 on image tokens, 0 elsewhere (2 would be video). transformers 5.x
        # needs it beside image_grid_thw to build M-RoPE positions (get_rope_index).
        mm_token_type_ids = (input_ids == self.image_token_id).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}

    # ------------------------------------------------------------------------- CoT text

    def tokenize_continuation(self, texts: list[str], add_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of texts appended after an input (teacher CoTs): (B, L) right padded, and the mask.

        No special tokens are added except the eos at the end, which teaches the reasoner to stop.
        Each text is tokenized on its own, so no merge crosses the boundary with the input.
        """
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        if add_eos:
            rows = [row + [self.eos_id] for row in rows]
        width = max((len(row) for row in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """Texts of generated ids, each cut at its first eos: a (B, L) tensor or ragged lists of ids."""
        texts = []
        for row in (ids.tolist() if torch.is_tensor(ids) else ids):
            row = list(row)
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
