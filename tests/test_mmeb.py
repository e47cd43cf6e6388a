"""data/mmeb.py against files written by hand in MMEB's exact schemas (tiny PNGs, no download)."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.mmeb import QWEN_IMAGE, Item, load_image_task, load_train, load_visdoc


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "task").mkdir(parents=True)
    for name, colour in [("a.png", "red"), ("b.png", "blue"), ("c.png", "green")]:
        Image.new("RGB", (8, 8), colour).save(root / "task" / name)
    return str(root)


def write_parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def image_task_columns(**overrides):
    columns = {
        "qry_inst": ["<|image_1|>\nRepresent the given image for classification:", ""],
        "qry_text": ["", "which colour is the square ?"],
        "qry_img_path": ["task/a.png", ""],
        "tgt_inst": ["", "Represent the given image:"],
        "tgt_text": [["red", "blue"], ["", "", ""]],
        "tgt_img_path": [["", ""], ["task/a.png", "task/b.png", "task/c.png"]],
        "difficulty": ["easy", "hard"],
        "answer": ["red", "red"],
    }
    columns.update(overrides)
    return columns


def abs_image(image_root, name):
    return os.path.abspath(os.path.join(image_root, "task", name))


# ----------------------------------------------------------------------------- image tasks


def test_image_task(tmp_path, image_root):
    path = write_parquet(tmp_path / "task.parquet", image_task_columns())
    queries = load_image_task(path, image_root)
    assert len(queries) == 2

    q0, q1 = queries
    # the placeholder sits in qry_inst; instruction and (empty) text join with a single space
    expected_text = QWEN_IMAGE + "\nRepresent the given image for classification:"
    assert q0.query == Item(expected_text, abs_image(image_root, "a.png"))
    assert q0.candidates == [Item("red"), Item("blue")]  # gold first
    assert q0.meta == {"difficulty": "easy", "answer": "red"}

    # text-only query; image candidates with empty text get the placeholder in front of tgt_inst
    assert q1.query == Item("which colour is the square ?")
    assert q1.candidates[2] == Item(QWEN_IMAGE + " Represent the given image:", abs_image(image_root, "c.png"))
    assert q1.meta["difficulty"] == "hard"


def test_image_task_without_instruction_columns(tmp_path, image_root):
    """MMEB v1 files fold the instruction into qry_text / tgt_text."""
    columns = image_task_columns()
    del columns["qry_inst"], columns["tgt_inst"]
    columns["qry_text"] = ["<|image_1|> what is this ?", "a question"]
    queries = load_image_task(write_parquet(tmp_path / "v1.parquet", columns), image_root)
    assert queries[0].query.text == QWEN_IMAGE + " what is this ?"
    assert queries[1].candidates[0] == Item(QWEN_IMAGE, abs_image(image_root, "a.png"))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"tgt_text": [["red", "blue"], []], "tgt_img_path": [["", ""], []]}, "row 1: empty candidate list"),
        ({"tgt_img_path": [["", ""], ["task/a.png"]]}, "row 1: tgt_text has 3 entries but tgt_img_path has 1"),
        ({"qry_img_path": ["task/missing.png", ""]}, "row 0, query: image file not found: "),
        ({"tgt_img_path": [["", ""], ["task/a.png", "task/b.png", "nope.png"]]}, "row 1, candidate 2: image file"),
        ({"qry_img_path": ["", ""]}, "row 0, query: text has <|image_1|> but the row gives no image path"),
        ({"qry_text": ["", "<|image_pad|> hi"]}, "row 1, query: text already contains <|image_pad|>"),
    ],
)
def test_image_task_bad_rows(tmp_path, image_root, overrides, expected):
    path = write_parquet(tmp_path / "bad.parquet", image_task_columns(**overrides))
    with pytest.raises(ValueError) as error:
        load_image_task(path, image_root)
    assert path in str(error.value) and expected in str(error.value)


def test_image_task_missing_column(tmp_path, image_root):
    columns = image_task_columns()
    del columns["tgt_img_path"]
    path = write_parquet(tmp_path / "nocol.parquet", columns)
    with pytest.raises(ValueError, match="missing column 'tgt_img_path'") as error:
        load_image_task(path, image_root)
    assert path in str(error.value)


def test_image_task_duplicates_warn_and_keep(tmp_path, image_root):
    columns = {name: [values[1], values[1]] for name, values in image_task_columns().items()}
    path = write_parquet(tmp_path / "dup.parquet", columns)
    with pytest.warns(UserWarning, match="1 duplicated rows .*row 1 repeats row 0"):
        assert len(load_image_task(path, image_root)) == 2


# ----------------------------------------------------------------------------- training pairs


def test_train(tmp_path, image_root):
    path = write_parquet(
        tmp_path / "train.parquet",
        {
            "qry": ["<|image_1|>\nRepresent the given image with the following question: what colour ?", "a cat"],
            "qry_image_path": ["task/a.png", ""],
            "pos_text": ["red", ""],
            "pos_image_path": ["", "task/b.png"],
            "neg_text": ["blue", ""],
            "neg_image_path": ["", ""],
            "cot": ["the square is red .", ""],
            "scene": [3, 4],
        },
    )
    first, second = load_train(path, image_root)
    assert first.query.text.startswith(QWEN_IMAGE + "\nRepresent")
    assert first.query.image == abs_image(image_root, "a.png")
    assert (first.pos, first.neg) == (Item("red"), Item("blue"))
    assert (first.cot, first.meta) == ("the square is red .", {"scene": 3})
    assert second.pos == Item(QWEN_IMAGE, abs_image(image_root, "b.png"))
    assert second.neg is None and second.cot is None


def test_train_errors(tmp_path, image_root):
    columns = {"qry": ["q"], "qry_image_path": [""], "pos_text": ["p"]}
    path = write_parquet(tmp_path / "nopos.parquet", columns)
    with pytest.raises(ValueError, match="missing column 'pos_image_path'"):
        load_train(path, image_root)

    path = write_parquet(tmp_path / "empty.parquet", {**columns, "qry": [""], "pos_image_path": [""]})
    with pytest.raises(ValueError, match=r"empty\.parquet: row 0, query: empty item"):
        load_train(path, image_root)


# ----------------------------------------------------------------------------- visual documents


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_visdoc_beir_jsonl(tmp_path, image_root):
    task = tmp_path / "vidore"
    (task / "qrels").mkdir(parents=True)
    write_jsonl(task / "queries.jsonl", [{"_id": "q1", "text": "red chart"}, {"_id": "q2", "text": "blue table"}])
    write_jsonl(
        task / "corpus.jsonl", [{"_id": "d1", "image": "task/a.png"}, {"_id": "d2", "image": "task/b.png"}],
    )
    (task / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td2\t1\n")

    docs = load_visdoc(str(task), image_root)
    assert docs.query_ids == ["q1", "q2"] and docs.corpus_ids == ["d1", "d2"]
    assert docs.queries[0] == Item("Find a document image that matches the given query: red chart")
    assert docs.corpus[1] == Item(
        QWEN_IMAGE + " Understand the content of the provided document image.", abs_image(image_root, "b.png")
    )
    assert docs.qrels == {"q1": {"d1": 2, "d2": 1}, "q2": {"d2": 1}}


def test_visdoc_parquet_ids_as_ints(tmp_path):
    """HF-style parquet names (query-id / corpus-id / query / image_path); int ids match tsv/str ids."""
    task = tmp_path / "visrag"
    (task / "pages").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(task / "pages" / "p7.png")
    write_parquet(task / "queries.parquet", {"query-id": [1], "query": ["total revenue ?"], "language": ["en"]})
    write_parquet(task / "corpus.parquet", {"corpus-id": [7], "image_path": ["pages/p7.png"]})
    write_parquet(task / "qrels.parquet", {"query-id": ["1"], "corpus-id": [7], "score": [1]})

    docs = load_visdoc(str(task), query_inst="", corpus_inst="")
    assert docs.queries == [Item("total revenue ?")]
    assert docs.corpus == [Item(QWEN_IMAGE, str(task / "pages" / "p7.png"))]
    assert docs.qrels == {"1": {"7": 1}}


def test_visdoc_errors(tmp_path, image_root):
    task = tmp_path / "bad"
    task.mkdir()
    with pytest.raises(ValueError, match="no queries file"):
        load_visdoc(str(task), image_root)

    write_jsonl(task / "queries.jsonl", [{"_id": "q1", "text": "x"}])
    corpus = [{"_id": "d1", "image": "task/a.png"}, {"_id": "d2", "image": "task/zz.png"}]
    write_jsonl(task / "corpus.jsonl", corpus)
    (task / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: row 1: image file not found: .*zz\.png"):
        load_visdoc(str(task), image_root)

    write_jsonl(task / "corpus.jsonl", [{"_id": "d1", "image": "task/a.png"}])
    (task / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"qrels\.tsv: row 1: corpus-id 'd9' is not in the corpus file"):
        load_visdoc(str(task), image_root)

    write_jsonl(task / "corpus.jsonl", [{"_id": "d1", "pixels": "?"}])
    with pytest.raises(ValueError, match=r"corpus\.jsonl: missing column 'image_path'"):
        load_visdoc(str(task), image_root)
