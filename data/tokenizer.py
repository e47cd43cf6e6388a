"""A word-level tokenizer over a closed vocabulary, with Qwen2-VL's special tokens.

The mini world trains a tiny Qwen2-VL-shaped model from scratch, so it needs a tokenizer of its own.
Word-level rather than byte-level BPE keeps chains of thought short: BPE trained on a small corpus
splits "top-left" into 3 pieces, here it is "top", "-", "left" and each word is one id. The special
tokens are the ones Qwen2-VL / Qwen3-VL use, so everything downstream (data/collate.py, the model's
`image_token_id`) works unchanged with the real Qwen tokenizers.

The result is a `transformers` fast tokenizer; `save_pretrained(dir)` writes files that
`AutoTokenizer.from_pretrained(dir)` loads back with the same ids.

    >>> tok = build_word_tokenizer(["what colour ?", "red", "top-left"])
    >>> tok.tokenize("<|vision_start|><|image_pad|><|vision_end|> What colour?")
    ['<|vision_start|>', '<|image_pad|>', '<|vision_end|>', 'what', 'colour', '?']
    >>> tok.save_pretrained("out/tok")  # later: AutoTokenizer.from_pretrained("out/tok")
"""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
UNK = "<unk>"
EOS = "<|im_end|>"
# The order fixes the ids (pad 0, eos 1, vision start 2, vision end 3, image 4, video 5, ...);
# the words come after them.
SPECIAL_TOKENS = [
    PAD,
    EOS,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    UNK,
]


def _normalizer() -> normalizers.Normalizer:
    # Lowercase so "Red" and "red" share an id; special tokens are added tokens and bypass this.
    return normalizers.Lowercase()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace splits into runs of word characters / runs of punctuation; Punctuation then
    # isolates every punctuation character, so "?!" is two tokens and "top-left" is three.
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])


def _pieces(text: str) -> list[str]:
    """The word-level pieces the tokenizer will cut `text` into."""
    normalized = _normalizer().normalize_str(text)
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(normalized)]


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary is the special tokens plus every piece of `words`.

    `words` may hold whole phrases: each is normalized and pre-tokenized exactly as inputs will be,
    so the vocabulary can never contain an entry the tokenizer would not produce. Unknown words
    map to `<unk>`.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for text in words:
        for piece in _pieces(text):
            vocab.setdefault(piece, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    # subtle: the special tokens must be registered as special *added* tokens; otherwise the
    # pre-tokenizer would cut "<|image_pad|>" at its punctuation into "<", "|", "image_pad", ...
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, EOS)],
    )
