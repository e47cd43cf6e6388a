"""Readers for MMEB-V2 data on disk: image tasks, MMEB-train pairs and visual-document (BEIR) tasks.

One reader serves both the real benchmark and the project's mini world, which is written in the same
format. The formats follow the VLM2Vec repository (TIGER-AI-Lab/VLM2Vec):

- image tasks (eval): one parquet per task, columns `qry_inst, qry_text, qry_img_path, tgt_inst,
  tgt_text (list), tgt_img_path (list)`; each query ranks its own candidates and the gold one is
  index 0 (metric: hit@1). `qry_inst` / `tgt_inst` may be absent (MMEB v1 folds them into the text).
- training (MMEB-train): columns `qry, qry_image_path, pos_text, pos_image_path`, optionally
  `neg_text, neg_image_path` (empty strings when there is no negative) and `cot` (teacher CoT).
- visual documents: a BEIR-style directory with `queries`, `corpus` (page images) and graded
  `qrels` (metric: NDCG@5).

Any other column (the mini world's `difficulty`, `answer`, `scene`, ...) is kept as per-query
metadata and never shown to the model. Image paths are relative to an image root and come back
absolute. Texts carry MMEB's placeholder `<|image_1|>`; what the model embeds is an `Item` whose text
carries Qwen2-VL's / Qwen3-VL's `<|vision_start|><|image_pad|><|vision_end|>` instead (the collate
expands `<|image_pad|>` to the image's token count).

    >>> task = load_image_task("MMEB-V2/image-tasks/VOC2007.parquet", "MMEB-V2/images")
    >>> task[0].query
    Item(text='<|vision_start|><|image_pad|><|vision_end|> Represent the given image ...', image='/abs/...jpg')
    >>> task[0].candidates[0]  # the gold candidate
    >>> pairs = load_train("MMEB-train/A-OKVQA.parquet", "MMEB-train/images")
    >>> docs = load_visdoc("MMEB-V2/visdoc/ViDoRe_arxivqa")  # docs.qrels[qid][cid] -> graded score

A malformed row raises a ValueError that names the file, the row and what is wrong. Pass a list as
`skipped` to leave such rows out instead: each one is appended to it as `(row, message)`. A file-level
problem (a missing column, an unreadable file) raises either way; duplicated rows warn and are kept.
"""

import csv
import json
import os
import warnings
from dataclasses import dataclass, field

import pyarrow.parquet as pq

MMEB_IMAGE = "<|image_1|>"  # MMEB's placeholder (Phi-3-V's), where the image goes in a text
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
QWEN_IMAGE = VISION_START + IMAGE_PAD + VISION_END  # Qwen2-VL's / Qwen3-VL's placeholder

IMAGE_TASK_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
IMAGE_TASK_OPTIONAL = ("qry_inst", "tgt_inst")
# Columns some exports use for the gold candidate's index; MMEB's convention (and twn's) is index 0.
GOLD_INDEX_COLUMNS = ("gold_index", "label")
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_OPTIONAL = ("neg_text", "neg_image_path", "cot")

# VLM2Vec's fixed instructions for ViDoRe / VisRAG: the BEIR files carry bare queries and pages.
VISDOC_QUERY_INST = "Find a document image that matches the given query:"
VISDOC_CORPUS_INST = "Understand the content of the provided document image."


@dataclass(frozen=True)
class Item:
    """What the model embeds: a text in the model's convention and at most one image (absolute path)."""

    text: str
    image: str | None = None


@dataclass
class EvalQuery:
    query: Item
    candidates: list[Item]  # candidates[0] is the gold one
    meta: dict = field(default_factory=dict)
    row: int = 0  # the row in its file, for error messages and skip reports


@dataclass
class TrainPair:
    query: Item
    pos: Item
    neg: Item | None = None
    cot: str | None = None  # teacher chain-of-thought, if the file has one
    meta: dict = field(default_factory=dict)
    row: int = 0


@dataclass
class VisDocTask:
    queries: list[Item]
    query_ids: list[str]
    corpus: list[Item]
    corpus_ids: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> corpus id -> graded relevance


# ----------------------------------------------------------------------------- text and items


def _clean(value) -> str:
    """A text cell as a stripped string; null cells (None) read as empty."""
    return "" if value is None else str(value).strip()


def _compose(inst, text) -> str:
    """Instruction and text joined by a single space, either may be empty."""
    return " ".join(part for part in (_clean(inst), _clean(text)) if part)


def _model_text(where: str, text: str, has_image: bool) -> str:
    """MMEB text -> model text: `<|image_1|>` becomes Qwen's vision placeholder.

    An item with an image but no placeholder gets one in front (MMEB image candidates often have
    empty text); a placeholder without an image is an error, since the collate could not fill it.
    """
    if IMAGE_PAD in text:
        raise ValueError(f"{where}: text already contains {IMAGE_PAD}; MMEB texts mark images with {MMEB_IMAGE}")
    count = text.count(MMEB_IMAGE)
    if count > 1:
        raise ValueError(f"{where}: text has {count} {MMEB_IMAGE} placeholders, an item holds at most one image")
    if count == 1 and not has_image:
        raise ValueError(f"{where}: text has {MMEB_IMAGE} but the row gives no image path")
    if has_image and count == 0:
        text = f"{MMEB_IMAGE} {text}".strip()
    return text.replace(MMEB_IMAGE, QWEN_IMAGE)


def _image_path(where: str, path, image_root: str) -> str | None:
    """Absolute path of an image cell, None for an empty cell; the file must exist."""
    path = _clean(path)
    if not path:
        return None
    path = os.path.abspath(os.path.join(image_root, path))
    if not os.path.exists(path):  # cheap check here beats a crash mid-evaluation
        raise ValueError(f"{where}: image file not found: {path}")
    return path


def _item(where: str, text: str, image_cell, image_root: str) -> Item:
    image = _image_path(where, image_cell, image_root)
    if not text and image is None:
        raise ValueError(f"{where}: empty item (no text and no image)")
    return Item(_model_text(where, text, image is not None), image)


# ----------------------------------------------------------------------------- reading files


def _read_rows(path: str) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of a .parquet, .jsonl or .tsv file."""
    if path.endswith(".parquet"):
        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {line_no}: not valid JSON ({e})") from e
        return list(dict.fromkeys(key for row in rows for key in row)), rows
    if path.endswith(".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = list(reader)
        return list(reader.fieldnames or []), rows
    raise ValueError(f"{path}: unsupported file type (expected .parquet, .jsonl or .tsv)")


def _require_columns(path: str, columns: list[str], required) -> None:
    for name in required:
        if name not in columns:
            raise ValueError(f"{path}: missing column '{name}' (has: {', '.join(columns)})")


def _pick_column(columns: list[str], variants: tuple[str, ...]) -> str | None:
    """The first of `variants` that `columns` has, None if it has none."""
    return next((name for name in variants if name in columns), None)


def _meta(row: dict, known: tuple[str, ...]) -> dict:
    return {key: value for key, value in row.items() if key not in known}


def _as_list(where: str, name: str, value) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: column '{name}' holds {type(value).__name__}, expected a list")
    return list(value)


def _parse_rows(path: str, rows: list[dict], parse, skipped: list | None) -> list:
    """[parse(where, i, row)] over the rows; a row whose parse raises ValueError is re-raised, or, when
    `skipped` is a list, left out and recorded there as (row, message)."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(parse(f"{path}: row {i}", i, row))
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append((i, str(e)))
    return out


def _warn_duplicates(path: str, keys: list) -> None:
    """Warn (and keep them) when rows repeat: a duplicate usually means a faulty export."""
    first_seen, duplicates = {}, []
    for i, key in enumerate(keys):
        if key in first_seen:
            duplicates.append((i, first_seen[key]))
        else:
            first_seen[key] = i
    if duplicates:
        i, j = duplicates[0]
        warnings.warn(
            f"{path}: {len(duplicates)} duplicated rows (e.g. row {i} repeats row {j}); keeping them",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- image tasks


def _candidates(where: str, row: dict, image_root: str) -> list[Item]:
    texts = _as_list(where, "tgt_text", row.get("tgt_text"))
    images = _as_list(where, "tgt_img_path", row.get("tgt_img_path"))
    if not texts and not images:
        raise ValueError(f"{where}: empty candidate list")
    if len(texts) != len(images):
        raise ValueError(f"{where}: tgt_text has {len(texts)} entries but tgt_img_path has {len(images)}")
    inst = row.get("tgt_inst")
    return [
        _item(f"{where}, candidate {j}", _compose(inst, text), image, image_root)
        for j, (text, image) in enumerate(zip(texts, images))
    ]


def _check_gold_index(where: str, row: dict) -> None:
    for name in GOLD_INDEX_COLUMNS:
        value = row.get(name)
        # an integer index only: some exports keep a class name ("dog") in `label`, which is metadata
        if isinstance(value, int) and not isinstance(value, bool) and value != 0:
            raise ValueError(f"{where}: {name} is {value}, but the gold candidate must come first (index 0, "
                             "MMEB's convention): reorder tgt_text / tgt_img_path")


def load_image_task(parquet_path: str, image_root: str, skipped: list | None = None) -> list[EvalQuery]:
    """One MMEB image task: every query with its own candidate list (gold first)."""
    columns, rows = _read_rows(parquet_path)
    _require_columns(parquet_path, columns, IMAGE_TASK_COLUMNS)
    known = IMAGE_TASK_COLUMNS + IMAGE_TASK_OPTIONAL

    def parse(where, i, row):
        _check_gold_index(where, row)
        text = _compose(row.get("qry_inst"), row.get("qry_text"))  # .get: a .jsonl row may lack a key
        query = _item(f"{where}, query", text, row.get("qry_img_path"), image_root)
        return EvalQuery(query, _candidates(where, row, image_root), _meta(row, known), row=i)

    queries = _parse_rows(parquet_path, rows, parse, skipped)
    _warn_duplicates(parquet_path, [(q.query, tuple(q.candidates)) for q in queries])
    return queries


# ----------------------------------------------------------------------------- training pairs


def load_train(parquet_path: str, image_root: str, skipped: list | None = None) -> list[TrainPair]:
    """MMEB-train pairs (query, positive, optional hard negative, optional teacher CoT)."""
    columns, rows = _read_rows(parquet_path)
    _require_columns(parquet_path, columns, TRAIN_COLUMNS)
    known = TRAIN_COLUMNS + TRAIN_OPTIONAL

    def parse(where, i, row):
        query = _item(f"{where}, query", _clean(row.get("qry")), row.get("qry_image_path"), image_root)
        pos = _item(f"{where}, pos", _clean(row.get("pos_text")), row.get("pos_image_path"), image_root)
        neg_text, neg_image = _clean(row.get("neg_text")), row.get("neg_image_path")
        neg = _item(f"{where}, neg", neg_text, neg_image, image_root) if neg_text or _clean(neg_image) else None
        cot = _clean(row.get("cot")) or None
        return TrainPair(query, pos, neg, cot, _meta(row, known), row=i)

    pairs = _parse_rows(parquet_path, rows, parse, skipped)
    _warn_duplicates(parquet_path, [(p.query, p.pos, p.neg) for p in pairs])
    return pairs


# ----------------------------------------------------------------------------- visual documents (BEIR)


def _find_part(directory: str, name: str, extensions: tuple[str, ...]) -> str:
    """`<name>.<ext>`, or the single such file inside `<name>/` (BEIR keeps `qrels/test.tsv`)."""
    for ext in extensions:
        path = os.path.join(directory, name + ext)
        if os.path.isfile(path):
            return path
    folder = os.path.join(directory, name)
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(extensions))
        if len(files) == 1:
            return os.path.join(folder, files[0])
        if len(files) > 1:
            raise ValueError(f"{folder}: expected one {name} file, found {', '.join(files)}")
    raise ValueError(f"{directory}: no {name} file (looked for {name}{{{','.join(extensions)}}} and {name}/*)")


def _id_column(path: str, columns: list[str], variants: tuple[str, ...]) -> str:
    name = _pick_column(columns, variants)
    if name is None:
        raise ValueError(f"{path}: missing id column (one of {', '.join(variants)}; has: {', '.join(columns)})")
    return name


def _row_id(where: str, row: dict, column: str, seen: set) -> str:
    # subtle: ids are compared as strings; parquet may store them as ints while qrels.tsv gives text.
    value = _clean(row.get(column))
    if not value:
        raise ValueError(f"{where}: empty '{column}'")
    if value in seen:
        raise ValueError(f"{where}: duplicated id '{value}'")
    return value


def _read_queries(directory: str, inst: str, skipped: list | None) -> tuple[list[Item], list[str]]:
    path = _find_part(directory, "queries", (".jsonl", ".parquet"))
    columns, rows = _read_rows(path)
    id_column = _id_column(path, columns, ("query-id", "_id"))
    text_column = _pick_column(columns, ("query", "text"))
    if text_column is None:
        raise ValueError(f"{path}: missing column 'query' (or 'text')")
    seen = set()

    def parse(where, i, row):
        qid = _row_id(where, row, id_column, seen)
        text = _clean(row.get(text_column))
        if not text:
            raise ValueError(f"{where}: empty '{text_column}'")
        item = _item(where, _compose(inst, text), None, directory)
        seen.add(qid)
        return qid, item

    parsed = _parse_rows(path, rows, parse, skipped)
    return [item for _, item in parsed], [qid for qid, _ in parsed]


def _corpus_image_cell(where: str, column: str, value):
    if value is not None and not isinstance(value, str):
        # HF exports embed images as {"bytes", "path"} structs; we only read files on disk.
        raise ValueError(f"{where}: column '{column}' holds {type(value).__name__}, expected an image path")
    return value


def _read_corpus(directory: str, image_root: str, inst: str, skipped: list | None) -> tuple[list[Item], list[str]]:
    path = _find_part(directory, "corpus", (".jsonl", ".parquet"))
    columns, rows = _read_rows(path)
    id_column = _id_column(path, columns, ("corpus-id", "_id"))
    image_column = _pick_column(columns, ("image_path", "image"))
    text_column = _pick_column(columns, ("text",))
    if image_column is None and text_column is None:
        raise ValueError(f"{path}: missing column 'image_path' (or 'image', or 'text' for text pages)")
    seen = set()

    def parse(where, i, row):
        cid = _row_id(where, row, id_column, seen)
        image = _corpus_image_cell(where, image_column, row.get(image_column)) if image_column else None
        text = row.get(text_column) if text_column else ""
        item = _item(where, _compose(inst, text), image, image_root)
        seen.add(cid)
        return cid, item

    parsed = _parse_rows(path, rows, parse, skipped)
    return [item for _, item in parsed], [cid for cid, _ in parsed]


def _read_qrels(
    directory: str, query_ids: list[str], corpus_ids: list[str], skipped: list | None
) -> tuple[dict[str, dict[str, int]], set[str]]:
    """qrels[qid][cid] -> grade, and the query ids that lost a qrels row to `skipped` (their relevant
    pages are incomplete, so they cannot be scored right)."""
    path = _find_part(directory, "qrels", (".tsv", ".parquet", ".jsonl"))
    columns, rows = _read_rows(path)
    _require_columns(path, columns, ("query-id", "corpus-id", "score"))
    known_queries, known_corpus = set(query_ids), set(corpus_ids)

    def parse(where, i, row):
        qid, cid = _clean(row.get("query-id")), _clean(row.get("corpus-id"))
        if qid not in known_queries:
            raise ValueError(f"{where}: query-id '{qid}' is not in the queries file")
        if cid not in known_corpus:
            raise ValueError(f"{where}: corpus-id '{cid}' is not in the corpus file")
        try:
            score = int(float(row.get("score")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: score {row.get('score')!r} is not a number") from e
        return qid, cid, score

    lost = [] if skipped is not None else None
    qrels: dict[str, dict[str, int]] = {}
    for qid, cid, score in _parse_rows(path, rows, parse, lost):
        qrels.setdefault(qid, {})[cid] = score
    if lost:
        skipped += lost
    broken = {_clean(rows[i].get("query-id")) for i, _ in lost or []} & known_queries
    return qrels, broken


def load_visdoc(
    directory: str,
    image_root: str | None = None,
    query_inst: str = VISDOC_QUERY_INST,
    corpus_inst: str = VISDOC_CORPUS_INST,
    skipped: list | None = None,
) -> VisDocTask:
    """A BEIR-style visual-document task: queries, the shared corpus of pages, graded qrels.

    Accepted layouts: `queries.{jsonl,parquet}` with `query-id`/`_id` and `query`/`text`;
    `corpus.{jsonl,parquet}` with `corpus-id`/`_id` and `image_path`/`image` (a path) or `text`;
    `qrels.{tsv,parquet,jsonl}` (or one file in `qrels/`) with `query-id, corpus-id, score`.
    Relative image paths resolve against `image_root` (default: the task directory). The
    instructions default to VLM2Vec's; pass "" for none. With `skipped`, a bad page is left out of
    the corpus, and so is every query whose qrels lose a row to it (or to any other bad qrels row).
    """
    image_root = directory if image_root is None else image_root
    queries, query_ids = _read_queries(directory, query_inst, skipped)
    corpus, corpus_ids = _read_corpus(directory, image_root, corpus_inst, skipped)
    qrels, broken = _read_qrels(directory, query_ids, corpus_ids, skipped)
    for qid in sorted(broken):
        skipped.append((None, f"{directory}: query '{qid}' left out: one of its qrels rows was skipped"))
        qrels.pop(qid, None)
    keep = [k for k, qid in enumerate(query_ids) if qid not in broken]
    return VisDocTask([queries[k] for k in keep], [query_ids[k] for k in keep], corpus, corpus_ids, qrels)
