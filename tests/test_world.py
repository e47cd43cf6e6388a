"""data/world.py: formats, determinism, splits, vocabulary, and every answer against a reference solver.

The reference solver below reads the canonical caption and the question text and answers from scratch
(its own grid arithmetic, no code from data/world.py), so a wrong plant, a non-unique referent or an
off-by-one relation in the generator shows up as a mismatch.
"""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import world

SMALL = dict(train_scenes=60, eval_queries=20, n_candidates=10)
TEXT_TASKS = ["ColorCLS", "CountCLS", "ColorVQA", "ShapeVQA", "WhereVQA", "I2T"]
IMAGE_TASKS = ["T2I", "Ground"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    world.generate(path, seed=0, **SMALL)
    return path


def read(out, task):
    return pq.read_table(out / "eval" / f"{task}.parquet").to_pylist()


def train_rows(out):
    return pq.read_table(out / "train" / "train.parquet").to_pylist()


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}  # world.json holds a time


# -----------------------------------------------------------------------------
# the reference solver


def objects(caption):
    """{cell: (colour, shape)} from a canonical caption."""
    return {cell: (colour, shape) for cell, colour, shape in (chunk.split() for chunk in caption.split(" , "))}


def shift(cell, relation):
    dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[relation]
    row, col = chr(ord(cell[0]) + dr), chr(ord(cell[1]) + dc)
    return row + col if row in "abcd" and col in "1234" else None


def only(cells):
    assert len(cells) == 1, f"referent not unique: {cells}"
    return cells[0]


def cells_with(objs, colour=None, shape=None):
    return [c for c, (col, sh) in objs.items() if colour in (None, col) and shape in (None, sh)]


REL = r"(left of|right of|above|below)"


def referent(objs, phrase):
    """The cell a noun phrase names."""
    if m := re.fullmatch(rf"the object {REL} the (\w+) (\w+)", phrase):
        cell = shift(only(cells_with(objs, m[2], m[3])), m[1])
        assert cell in objs
        return cell
    if m := re.fullmatch(r"the object with the same colour as the (\w+)", phrase):
        key = only(cells_with(objs, shape=m[1]))
        return only([c for c in cells_with(objs, colour=objs[key][0]) if c != key])
    if m := re.fullmatch(r"the (\w+) object", phrase):
        return only(cells_with(objs, colour=m[1]))
    if m := re.fullmatch(r"the (\w+) (\w+)", phrase):
        return only(cells_with(objs, m[1], m[2]))
    return only(cells_with(objs, shape=re.fullmatch(r"the (\w+)", phrase)[1]))


def solve(task, qry_text, caption):
    objs = objects(caption)
    if task == "ColorCLS":
        (top, n), *rest = Counter(colour for colour, _ in objs.values()).most_common()
        assert not rest or rest[0][1] < n
        return top
    if task == "CountCLS":
        return world.NUMBERS[len(objs) - 1]
    if task == "I2T":
        return caption
    if task == "Ground":
        return " ".join(objs[referent(objs, qry_text.split(" labeled as : ")[1])])
    m = re.fullmatch(r"(what colour is|what shape is|where is) (.*) \?", qry_text.split(" question : ")[1])
    cell = referent(objs, m[2])
    return {"what colour is": objs[cell][0], "what shape is": objs[cell][1], "where is": cell}[m[1]]


def matches(text, caption):
    """Whether a scene fits a T2I caption."""
    objs = objects(caption)
    if m := re.fullmatch(rf"an image with a (\w+) (\w+) {REL} a (\w+) (\w+)", text):
        return any(shift(b, m[3]) == a for a in cells_with(objs, m[1], m[2]) for b in cells_with(objs, m[4], m[5]))
    m = re.fullmatch(r"an image with a (\w+) (\w+)", text)
    return bool(cells_with(objs, m[1], m[2]))


# -----------------------------------------------------------------------------
# formats


def test_eval_and_train_schemas(out):
    s = pa.string()
    eval_schema = pa.schema([("qry_inst", s), ("qry_text", s), ("qry_img_path", s), ("tgt_inst", s),
                             ("tgt_text", pa.list_(s)), ("tgt_img_path", pa.list_(s)), ("difficulty", s),
                             ("answer", s), ("cot", s), ("scene", s)])
    for task in world.TASKS:
        assert pq.read_schema(out / "eval" / f"{task}.parquet").remove_metadata() == eval_schema
    train_names = ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path",
                   "cot", "task", "difficulty", "answer", "scene"]
    assert pq.read_schema(out / "train" / "train.parquet").remove_metadata() == pa.schema([(n, s) for n in train_names])
    assert sorted(p.name for p in (out / "eval").iterdir()) == sorted(f"{t}.parquet" for t in world.TASKS)


def test_same_seed_same_bytes_other_seed_other_bytes_eval_independent_of_train(out, tmp_path):
    world.generate(tmp_path / "again", seed=0, **SMALL)
    assert file_hashes(tmp_path / "again") == file_hashes(out)
    world.generate(tmp_path / "less", seed=0, **dict(SMALL, train_scenes=16))
    assert all(file_hashes(tmp_path / "less")[f"eval/{t}.parquet"] == file_hashes(out)[f"eval/{t}.parquet"]
               for t in world.TASKS)  # eval does not depend on the train size
    world.generate(tmp_path / "other", seed=1, **SMALL)
    assert (pq.read_table(tmp_path / "other" / "eval" / "ColorVQA.parquet").column("scene").to_pylist()
            != pq.read_table(out / "eval" / "ColorVQA.parquet").column("scene").to_pylist())


def test_candidates_gold_first_distinct_and_typed(out):
    for task in world.TASKS:
        for row in read(out, task):
            candidates = list(zip(row["tgt_text"], row["tgt_img_path"]))
            assert len(candidates) == SMALL["n_candidates"] == len(set(candidates))
            assert row["qry_inst"] == ""
            if task in TEXT_TASKS:
                assert row["tgt_inst"] == "" and all(t and not p for t, p in candidates)
            else:
                assert row["tgt_inst"].startswith("<|image_1|> ") and all(p and not t for t, p in candidates)
            assert row["qry_text"].startswith("<|image_1|> ") == (task != "T2I") == bool(row["qry_img_path"])


def test_queries_split_into_easy_and_hard(out):
    for task in world.TASKS:
        assert Counter(r["difficulty"] for r in read(out, task)) == {"easy": 10, "hard": 10}
    counts = Counter((r["task"], r["difficulty"]) for r in train_rows(out))
    assert sum(counts.values()) == SMALL["train_scenes"]
    assert all(counts[t, d] >= 3 for t in world.TASKS for d in world.DIFFICULTIES)


def test_images_exist_with_the_right_sizes(out):
    paths = [(r["qry_img_path"], 112) for t in world.TASKS for r in read(out, t) if r["qry_img_path"]]
    paths += [(p, 56 if t == "Ground" else 112) for t in IMAGE_TASKS for r in read(out, t) for p in r["tgt_img_path"]]
    paths += [(r[k], 56 if r["task"] == "Ground" and k != "qry_image_path" else 112)
              for r in train_rows(out) for k in ("qry_image_path", "pos_image_path", "neg_image_path") if r[k]]
    paths += [(line["image"], 56 if "crops/" in line["image"] else 112)
              for line in jsonl(out / "pretrain.jsonl") if line["image"]]
    for path, size in paths:
        assert Image.open(out / path).size == (size, size), path
    assert (out / "images" / "train").is_dir() and (out / "crops" / "eval").is_dir()


def test_every_text_is_in_the_closed_vocabulary(out):
    vocab = set(world.vocabulary())
    keys = ("qry_text", "tgt_inst", "answer", "cot", "scene")
    texts = [r[k] for t in world.TASKS for r in read(out, t) for k in keys]
    texts += [x for t in world.TASKS for r in read(out, t) for x in r["tgt_text"]]
    texts += [r[k] for r in train_rows(out) for k in ("qry", "pos_text", "neg_text", "cot", "answer", "scene")]
    texts += [line[k] for name in ("pretrain.jsonl", "pretrain_eval.jsonl") for line in jsonl(out / name)
              for k in ("prompt", "completion")]
    used = {w for text in texts for w in text.replace("<|image_1|>", " ").split()}
    assert used <= vocab, used - vocab
    assert json.loads((out / "world.json").read_text())["vocabulary"] == world.vocabulary()


def test_pretrain_covers_perception_direct_and_think(out):
    lines = jsonl(out / "pretrain.jsonl")
    kinds = Counter(line["kind"] for line in lines)
    assert kinds["direct"] == kinds["think"] == SMALL["train_scenes"] and kinds["describe"] > SMALL["train_scenes"]
    assert all(not line["image"] or "/train/" in line["image"] for line in lines)
    assert any(line["completion"].count(" ") == 1 for line in lines if "crops/" in line["image"])  # "red circle"
    think = [line for line in lines if line["kind"] == "think"]
    assert all(line["prompt"].endswith(" think :") for line in think)


# -----------------------------------------------------------------------------
# the world's content


def test_train_and_eval_share_no_scene(out):
    eval_scenes = {r["scene"] for t in world.TASKS for r in read(out, t)}
    train_scenes = {r["scene"] for r in train_rows(out)}
    train_scenes |= {line["completion"] for line in jsonl(out / "pretrain.jsonl")
                     if line["kind"] == "describe" and line["image"].startswith("images/")}
    assert eval_scenes and train_scenes and not eval_scenes & train_scenes


def test_answers_agree_with_the_reference_solver(out):
    for task in TEXT_TASKS + ["Ground"]:
        for row in read(out, task):
            assert solve(task, row["qry_text"], row["scene"]) == row["answer"], (task, row["qry_text"], row["scene"])
    for row in read(out, "T2I"):
        assert matches(row["qry_text"].split(" caption : ")[1], row["scene"])
    for row in train_rows(out):
        if row["task"] != "T2I":
            assert solve(row["task"], row["qry"], row["scene"]) == row["answer"], row


def test_difficulty_means_what_it_says(out):
    for row in read(out, "ColorCLS"):
        colours = len({c for c, _ in objects(row["scene"]).values()})
        assert (colours == 1) == (row["difficulty"] == "easy")
    for task, easy, hard in [("CountCLS", {1, 2, 3}, {5, 6, 7, 8}), ("I2T", {2, 3}, {5, 6, 7})]:
        for row in read(out, task):
            assert len(objects(row["scene"])) in (easy if row["difficulty"] == "easy" else hard)
    for task in ["ColorVQA", "ShapeVQA", "WhereVQA", "Ground"]:
        for row in read(out, task):
            composed = re.search(rf"{REL} the|same colour", row["qry_text"]) is not None
            assert composed == (row["difficulty"] == "hard")


def test_cot_lists_then_names_the_gold_answer(out):
    for task in world.TASKS:
        for row in read(out, task):
            assert row["cot"].endswith(f"answer : {row['answer']}") and len(row["cot"].split()) <= 60
            assert world.TASKS[task].instruction not in row["cot"]
            if task in TEXT_TASKS:
                assert row["answer"] == row["tgt_text"][0]
            if task not in ("T2I", "CountCLS"):
                assert row["cot"].startswith(row["scene"] + " . ")  # the look comes first


def test_easy_scenes_are_simple_and_hard_ones_crowded(out):
    for task, most in (("ColorVQA", 1), ("ShapeVQA", 1), ("WhereVQA", 1), ("Ground", 3)):
        for row in read(out, task):
            n = len(world.parse_caption(row["scene"]))
            assert n <= most if row["difficulty"] == "easy" else n >= 3


def test_easy_t2i_needs_one_attribute_not_a_binding():
    """An easy T2I gold is the only image with anything of its colour or its shape: no binding to do."""
    rng = np.random.default_rng(0)
    for kind in world.KINDS:
        query = world.t2i(rng, "easy", kind, 10)
        gold, *negatives = [c.scene for c in query.candidates]
        assert [(o.colour, o.shape) for o in gold if o.colour == kind[0] or o.shape == kind[1]] == [kind]
        assert all(o.colour != kind[0] and o.shape != kind[1] for scene in negatives for o in scene)
        assert {len(s) for s in [gold] + negatives} <= {2, 3}


def test_world_json_records_the_generator_version(out, tmp_path):
    """train_sft.py rewrites a default world written by an older generator; it reads the version from here."""
    assert world.version_of(out) == world.VERSION
    assert world.version_of(tmp_path) is None
    summary = json.loads((out / "world.json").read_text())
    del summary["version"]
    (tmp_path / "world.json").write_text(json.dumps(summary))
    assert world.version_of(tmp_path) == 1 < world.VERSION


def test_easy_i2t_distractors_share_no_colour_with_the_image(out):
    """Easy I2T: one look at any colour in the image rules every wrong caption out; hard ones differ by one edit."""
    for row in read(out, "I2T"):
        gold, *negatives = [objects(caption) for caption in row["tgt_text"]]
        colours = {colour for colour, _ in gold.values()}
        if row["difficulty"] == "easy":
            assert all(colour not in colours for scene in negatives for colour, _ in scene.values()), row["qry_text"]
        else:
            assert any(colour in colours for scene in negatives for colour, _ in scene.values())


def test_easy_vqa_objects_sets_the_crowd_of_easy_vqa_scenes_only(out, tmp_path, monkeypatch):
    monkeypatch.setattr(world, "EASY_VQA_OBJECTS", 3)
    world.generate(tmp_path / "crowd", seed=0, **SMALL)
    for task in ("ColorVQA", "ShapeVQA", "WhereVQA"):
        counts = {d: [len(world.parse_caption(r["scene"])) for r in read(tmp_path / "crowd", task) if r["difficulty"] == d]
                  for d in ("easy", "hard")}
        assert set(counts["easy"]) == {1, 2, 3} and min(counts["hard"]) >= 3
        assert {len(world.parse_caption(r["scene"])) for r in read(out, task) if r["difficulty"] == "easy"} == {1}
    for task in ("ColorCLS", "CountCLS", "I2T", "T2I", "Ground"):  # each task has its own random stream
        assert read(tmp_path / "crowd", task) == read(out, task), task
    recorded = lambda root: json.loads((root / "world.json").read_text())["easy_vqa_objects"]
    assert (recorded(tmp_path / "crowd"), recorded(out)) == (3, 1)  # world.json says how the world was made


def test_answers_are_balanced(out):
    for task, values in [("ColorCLS", world.COLOURS), ("ColorVQA", world.COLOURS), ("ShapeVQA", world.SHAPES)]:
        for difficulty in world.DIFFICULTIES:
            counts = Counter(r["answer"] for r in read(out, task) if r["difficulty"] == difficulty)
            assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1
    counts = Counter((r["difficulty"], r["answer"]) for r in read(out, "CountCLS"))
    assert {a for d, a in counts if d == "easy"} == {"one", "two", "three"}
    assert {a for d, a in counts if d == "hard"} == {"five", "six", "seven", "eight"}


def test_image_distractors_never_fit_the_query():
    rng = np.random.default_rng(0)
    for difficulty in world.DIFFICULTIES:
        for kind in world.KINDS:
            query = world.t2i(rng, difficulty, kind, 10)
            fits = [matches(query.text, world.caption(c.scene)) for c in query.candidates]
            assert fits == [True] + [False] * 9
            query = world.ground(rng, difficulty, kind, 10)
            shown = [(c.obj.colour, c.obj.shape) for c in query.candidates]
            assert shown[0] == kind and len(set(shown)) == 10
            if len(query.scene) > 1:  # the image's own other objects come first (an easy scene may have none)
                assert query.candidates[1].scene == query.scene


def test_parse_caption_round_trips_and_skips_slips():
    scene = world.scene_of([world.Obj("c2", "white", "cross"), world.Obj("a1", "red", "circle")])
    assert world.caption(scene) == "a1 red circle , c2 white cross"
    assert world.parse_caption(world.caption(scene)) == list(scene)
    assert world.parse_caption("a1 red circle , e9 red circle , b2 blue") == [world.Obj("a1", "red", "circle")]


def test_rejects_too_few_candidates(tmp_path):
    with pytest.raises(ValueError):
        world.generate(tmp_path, n_candidates=5)


def test_reading_drills_give_the_listing_and_ask_for_the_hops():
    rng = np.random.default_rng(0)
    rows = [world.reading_drill(rng) for _ in range(200)]
    listing = lambda row: row["prompt"].split(" think : ")[1].removesuffix(" .")
    for row in rows:
        assert row["image"] is None and row["prompt"].endswith(" .") and " think : " in row["prompt"]
        objs = world.parse_caption(listing(row))
        assert world.caption(objs) == listing(row)
        assert objs and row["completion"].split(" . ")[-1].startswith("answer : ")
        # the first hop names the cell of the object the question asks about: one object in the listing
        named, cell = re.match(r"the (.+) is at (\w\d)", row["completion"]).groups()
        words = [w for w in named.split() if w != "object"]
        assert [o.cell for o in objs if all(w in (o.colour, o.shape) for w in words)] == [cell]
    assert {r["difficulty"] for r in rows} == {"easy", "hard"}
    # a scene in `forbidden` is never drilled on
    forbidden = {listing(r) for r in rows}
    again = [world.reading_drill(np.random.default_rng(0), forbidden) for _ in range(20)]
    assert all(listing(r) not in forbidden for r in again)


def test_a_lazy_teacher_skips_the_hops_of_train_cots_and_changes_nothing_else(out, tmp_path):
    world.generate(tmp_path / "lazy", seed=0, **SMALL, lazy_teacher=0.5)
    before, after = file_hashes(out), file_hashes(tmp_path / "lazy")
    changed = sorted(k for k in before if before[k] != after.get(k)) + sorted(set(after) - set(before))
    assert changed == ["train/train.parquet"]  # images, eval and pretraining text untouched (world.json: not hashed)
    exact, lazy = train_rows(out), train_rows(tmp_path / "lazy")
    assert [{**r, "cot": ""} for r in exact] == [{**r, "cot": ""} for r in lazy]
    skipped = [(e["cot"], s["cot"]) for e, s in zip(exact, lazy) if e["cot"] != s["cot"]]
    has_hops = sum(len(r["cot"].split(" . ")) > 2 for r in exact)
    assert 0.3 * has_hops < len(skipped) < 0.7 * has_hops
    assert json.loads((tmp_path / "lazy" / "world.json").read_text())["lazy_rows"] == len(skipped)
    for e, s in skipped:  # the look and the (right) answer survive, the hops between them do not
        steps = e.split(" . ")
        assert s == f"{steps[0]} . {steps[-1]}" and len(steps) > 2
    assert world.lazy("b1 blue square . the square is at b1 . b1 is blue . answer : blue") == \
        "b1 blue square . answer : blue"
    with pytest.raises(ValueError, match="lazy_teacher"):
        world.generate(tmp_path / "bad", lazy_teacher=1.5)
