"""The mini world: a synthetic visual world and MMEB-style retrieval tasks over it, easy and hard.

twn reproduces *Think When Needed* on a tiny Qwen2-VL, so it needs a benchmark where the paper's claims
are measurable: queries that one look answers (easy), queries that need composition (hard), and a
teacher chain of thought (CoT) that turns the composition into copying. This file generates that world
from a seed, in MMEB-V2's on-disk formats, with numpy, pillow and pyarrow only (no model code).

    python -m data.world --out data/world --seed 0        # 10-20 s on 2 cores (the time is printed)
    python data/world.py --out /tmp/w --train-scenes 200  # a small one
    python -m data.world --out data/world-lazy --lazy-teacher 0.6   # an imperfect teacher, to test RL
    >>> summary = generate("data/world", seed=0)          # what the main job calls

The world. A 112x112 image is a 4x4 grid of 28 px cells, one Qwen2-VL LLM token per cell (14 px
patches, 2x2 merge); rows a-d top to bottom, columns 1-4 left to right (`a1` top-left). Each object is
one of 8 colours x 4 shapes and fills most of its cell; a scene is 1-8 objects, at most one per cell.
Its canonical caption lists the objects in cell order, and every text is lowercase words from a small
closed vocabulary (`vocabulary()`) with punctuation as separate words.

A worked example: row 2 of eval/ColorVQA.parquet with seed 0 (the first hard query), and row 0 (the
first easy one).

         1             2              3              4
    a    .             .              .              .
    b    .             .              cyan circle    purple square
    c    .             .              red triangle   .
    d    red circle    .              .              .

    hard  qry_text  <|image_1|> represent the given image with the following question : what colour is
                    the object above the red triangle ?
          gold      cyan    (candidates: the other 7 colours, then 2 words of other answer types)
          cot       b3 cyan circle , b4 purple square , c3 red triangle , d1 red circle . the red triangle
                    is at c3 . above c3 is b3 . b3 is cyan . answer : cyan
    easy  qry_text  <|image_1|> ... question : what colour is the cross ?   (its own scene: one object)
          gold      blue
          cot       b2 blue cross . the cross is at b2 . b2 is blue . answer : blue

Every CoT first lists the objects (the look: the canonical caption), then makes each hop a short copy
step, then names the answer (`answer : X`). Relations mean the directly adjacent cell ("left of c3" is
c2). An easy VQA scene holds the asked object alone (`--easy-vqa-objects`), an easy grounding scene 1-3
objects, hard ones 3-8 with lures that share an attribute with the object asked about: an easy query is
answered by one look at a simple image, a hard one by finding an anchor among look-alikes and hopping
from it. Why one object: a one-pass embedding of 2-3 objects often binds the asked colour to another
object's shape or cell (no-think easy WhereVQA was right on 35/35 one-object scenes, 20/29 with two,
18/36 with three), and binding is what the CoT's listing does; an easy query should not need it.

The 8 tasks (each query tagged easy or hard, half each; the intended answer is drawn balanced first,
then a scene is built around it, so guessing stays at chance):
  ColorCLS  image -> most common colour. easy: one colour; hard: 5-7 objects, 2-3 colours, the winner
            only one ahead of the runner-up.
  CountCLS  image -> number word. easy: 1-3 objects; hard: 5-8 (4 is left out to keep the two apart).
  ColorVQA  easy "what colour is the circle ?" (the circle alone); hard "what colour is the object left
            of the blue triangle ?" (anchor unique by colour+shape, and another object shares one of its
            attributes, so naming it takes both words).
  ShapeVQA  easy "what shape is the red object ?" (alone); hard: a relation as above, or "what shape is
            the object with the same colour as the triangle ?" (exactly one other object has that colour).
  WhereVQA  -> cell name. easy "where is the red circle ?" (alone); hard "where is the object left of
            the blue triangle ?" (a relation as above; its CoT ends at the referent's cell).
  I2T       image -> caption. easy: 2-3 objects, distractors are other scenes' captions in colours the
            image lacks (one colour rules each out, no binding); hard: 5-7 objects, distractors are the
            gold caption with one colour, shape or cell changed.
  T2I       text -> image. easy "an image with a red circle" among 1-2 others (no other object, in it or in
            a distractor, is red or a circle: one attribute finds it, no binding); hard "an image
            with a red circle left of a blue square" (distractors hold both, never in that relation).
  Ground    image + phrase -> 56 px crop of a cell. easy "the red circle" (1-3 objects); hard "the
            object left of the red circle". Every candidate crop shows a different colour+shape.

Files under --out (parquet paths are relative to it: it is the image root):
  eval/<Task>.parquet  MMEB-V2 image-task columns `qry_inst, qry_text, qry_img_path, tgt_inst,
                       tgt_text (list), tgt_img_path (list)`, gold at index 0, plus metadata the model
                       never sees: `difficulty, answer, cot, scene` (scene: caption of the query image,
                       or of the gold image for T2I). What the model reads is `inst + " " + text`:
                       queries keep everything in qry_text (qry_inst is ""); text candidates are bare
                       labels (tgt_inst ""); image candidates have tgt_text "" and the instruction, with
                       its `<|image_1|>`, in tgt_inst.
  train/train.parquet  MMEB-train columns `qry, qry_image_path, pos_text, pos_image_path, neg_text,
                       neg_image_path` (one hard negative) plus `cot, task, difficulty, answer, scene`.
  pretrain.jsonl       {"image", "prompt", "completion", "kind", "difficulty"} on train scenes: kind
                       describe (`describe :` -> caption; crops -> `red circle`), direct (bare question
                       -> `answer : X`), think (bare question + ` think :` -> CoT).
  pretrain_eval.jsonl  the same on eval scenes, for reports only.
  images/{train,eval}/*.png, crops/{train,eval}/*.png, world.json (settings, vocabulary, counts, time).

Text candidates come from small answer vocabularies (8 colours, 4 shapes, 8 numbers, 16 cells): a list
is the gold, the other words of its type, then random words of the other types, so every query has
`n_candidates` distinct candidates (for ShapeVQA 6 of 10 are words of other types, easy to reject).

Train and eval draw from separate random streams, one per task; eval is drawn first (so it does not
depend on --train-scenes) and train rejects any scene graph eval uses. Each train row is one scene built
for its query (plus, for T2I, one negative image), so --train-scenes is also the number of train rows.
"""

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world's pieces and words

SIZE, CELL, CROP = 112, 28, 56  # image, grid cell (= one Qwen2-VL LLM token), upscaled crop
PNG = dict(compress_level=1)  # flat colours: files as small as at the default level 6, written ~30 % faster
BACKGROUND = (20, 20, 20)
ROWS, COLS = "abcd", "1234"
CELLS = [r + c for r in ROWS for c in COLS]  # a1 a2 ... d4: reading order, the caption's order
RGB = {"red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (240, 230, 40), "green": (30, 170, 50),
       "cyan": (40, 220, 230), "blue": (40, 80, 250), "purple": (160, 60, 220), "white": (245, 245, 245)}
COLOURS = list(RGB)
SHAPES = ["circle", "square", "triangle", "cross"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
KINDS = [(c, s) for c in COLOURS for s in SHAPES]
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (d row, d col)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DIFFICULTIES = ("easy", "hard")
VERSION = 2  # raised whenever the same settings write another world; train_sft.py rewrites an older data/world
EASY_VQA_OBJECTS = 1  # an easy VQA scene holds 1..this many objects (`python -m data.world --easy-vqa-objects`)
IMAGE = "<|image_1|>"  # MMEB's image placeholder; a special token, not a word of the vocabulary

TARGET_IMAGE = "represent the given image"
TARGET_CROP = "represent the given cropped image of the object"
# words of the questions, prompts and CoTs that are not names of colours, shapes, numbers or cells
GLUE = "what colour shape where is the object objects with same as at also answer think describe how many " \
       "are there in most common an a image : . , ?"


def number(n):
    return NUMBERS[n - 1]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def shuffled(rng, seq):
    return [seq[i] for i in rng.permutation(len(seq))]


def balanced(rng, values, n):
    """n values that cycle through `values` in fresh random orders: each is (almost) equally common."""
    out = []
    while len(out) < n:
        out += shuffled(rng, values)
    return out[:n]


# -----------------------------------------------------------------------------
# scenes: scene graphs, captions, and building blocks for planting a question's answer


class Obj(NamedTuple):
    cell: str
    colour: str
    shape: str


def scene_of(objs):
    """The canonical scene graph: objects sorted in cell order, so equal scenes compare equal."""
    return tuple(sorted(objs, key=lambda o: CELLS.index(o.cell)))


def caption(scene):
    return " , ".join(f"{o.cell} {o.colour} {o.shape}" for o in scene)


def parse_caption(text):
    """The objects of a caption; chunks that are not `cell colour shape` (a model's slips) are skipped."""
    objs = []
    for chunk in text.split(","):
        words = chunk.split()
        if len(words) == 3 and words[0] in CELLS and words[1] in RGB and words[2] in SHAPES:
            objs.append(Obj(*words))
    return objs


def random_kind(rng, allow=lambda kind: True):
    while True:
        kind = pick(rng, KINDS)
        if allow(kind):
            return kind


def random_kinds(rng, n, allow=lambda kind: True):
    return [random_kind(rng, allow) for _ in range(n)]


def scatter(rng, kinds, taken=()):
    """Each (colour, shape) in its own random cell, avoiding the cells of the objects in `taken`."""
    free = [c for c in CELLS if c not in {o.cell for o in taken}]
    return [Obj(cell, *kind) for cell, kind in zip(shuffled(rng, free), kinds)]


def find(scene, colour=None, shape=None):
    return [o for o in scene if colour in (None, o.colour) and shape in (None, o.shape)]


def neighbour(cell, relation):
    """The cell that is `relation` `cell`: neighbour("b2", "right of") == "b3"; None off the grid."""
    dr, dc = RELATIONS[relation]
    r, c = ROWS.index(cell[0]) + dr, COLS.index(cell[1]) + dc
    return ROWS[r] + COLS[c] if 0 <= r < len(ROWS) and 0 <= c < len(COLS) else None


def related(rng, colour=None, shape=None, ref_cell=None):
    """A 4-7 object scene with an anchor unique by colour+shape and a referent in the cell `relation` it.

    The referent gets the given colour / shape / cell. A lure shares the anchor's colour or its shape,
    so finding the anchor takes both words of its name."""
    while True:
        anchor = random_kind(rng)
        target = (colour or pick(rng, COLOURS), shape or pick(rng, SHAPES))
        if target != anchor:
            break
    if ref_cell:  # the anchor sits where the inverse relation leads from the referent's cell
        relation = pick(rng, [r for r in RELATIONS if neighbour(ref_cell, INVERSE[r])])
        cell = neighbour(ref_cell, INVERSE[relation])
    else:
        relation = pick(rng, list(RELATIONS))
        cell = pick(rng, [c for c in CELLS if neighbour(c, relation)])
    fixed = [Obj(cell, *anchor), Obj(neighbour(cell, relation), *target)]
    lure = random_kind(rng, lambda k: k != anchor and (k[0] == anchor[0] or k[1] == anchor[1]))
    rest = [lure] + random_kinds(rng, int(rng.integers(1, 5)), lambda k: k != anchor)
    return scene_of(fixed + scatter(rng, rest, taken=fixed)), fixed[0], relation, fixed[1]


def same_colour(rng, shape=None):
    """A 3-7 object scene whose only `key.shape` shares its colour with exactly one other object, `ref`."""
    colour = pick(rng, COLOURS)
    ref = Obj(pick(rng, CELLS), colour, shape or pick(rng, SHAPES))
    key = scatter(rng, [(colour, pick(rng, [s for s in SHAPES if s != ref.shape]))], taken=[ref])[0]
    rest = random_kinds(rng, int(rng.integers(1, 6)), lambda k: k[0] != colour and k[1] != key.shape)
    return scene_of([ref, key] + scatter(rng, rest, taken=[ref, key])), key, ref


def one_edit(rng, scene):
    """The scene with one object's colour, shape or cell changed: a caption that is almost right."""
    i = int(rng.integers(len(scene)))
    o, what = scene[i], pick(rng, ["colour", "shape", "cell"])
    if what == "colour":
        new = o._replace(colour=pick(rng, [c for c in COLOURS if c != o.colour]))
    elif what == "shape":
        new = o._replace(shape=pick(rng, [s for s in SHAPES if s != o.shape]))
    else:
        new = o._replace(cell=pick(rng, [c for c in CELLS if c not in {x.cell for x in scene}]))
    return scene_of(scene[:i] + (new,) + scene[i + 1:])


def distinct(make, k, exclude):
    """k different values from make(), none of them in `exclude`."""
    seen, out = list(exclude), []
    while len(out) < k:
        value = make()
        if value not in seen:
            seen.append(value)
            out.append(value)
    return out


# -----------------------------------------------------------------------------
# the teacher's chain of thought: look (list the objects), hop (copy steps), answer


def cot(*steps, answer):
    return " . ".join([*steps, f"answer : {answer}"])


def say(obj, what="colour shape"):
    """Read the asked attribute(s) of the object at a cell: `c1 is blue`, `c1 is triangle`, `c1 is blue triangle`."""
    return f"{obj.cell} is " + " ".join(getattr(obj, w) for w in what.split())


def hop(anchor, relation, ref, what=None):
    """Find the anchor, step to the referent's cell, read what is asked there (nothing: the cell is the answer)."""
    steps = [f"the {anchor.colour} {anchor.shape} is at {anchor.cell}", f"{relation} {anchor.cell} is {ref.cell}"]
    return steps + [say(ref, what)] if what else steps


def match(key, ref):
    return [f"the {key.shape} is at {key.cell}", say(key, "colour"), f"{key.colour} is also at {ref.cell}"]


# -----------------------------------------------------------------------------
# queries: one maker per task, (rng, difficulty, intended answer, n candidates) -> Query


class SceneImage(NamedTuple):  # an image candidate: the whole scene
    scene: tuple


class CropImage(NamedTuple):  # an image candidate: one object's cell, cut from the scene's image
    scene: tuple
    obj: Obj


@dataclass
class Query:
    scene: tuple | None  # what the query image shows; None for the text-only T2I query
    text: str  # what follows the task's instruction in the query ("" where MMEB has no question)
    prompt: str  # the bare question, for pretraining (no MMEB instruction)
    answer: str
    cot: str
    candidates: list  # gold first: str (text), SceneImage or CropImage


ANSWER_TYPES = [COLOURS, SHAPES, NUMBERS, CELLS]


def labels(rng, gold, n):
    """gold, the other words of its answer type, then words of the other types: n distinct labels."""
    own = next(words for words in ANSWER_TYPES if gold in words)
    rest = [w for words in ANSWER_TYPES if words is not own for w in words]
    return [gold] + (shuffled(rng, [w for w in own if w != gold]) + shuffled(rng, rest))[:n - 1]


def color_cls(rng, difficulty, colour, n_cand):
    if difficulty == "easy":
        colours = [colour] * int(rng.integers(3, 8))
    else:
        colours = majority(rng, colour, int(rng.integers(5, 8)))
    scene = scene_of(scatter(rng, [(c, pick(rng, SHAPES)) for c in colours]))
    groups = {}  # colour -> its cells, colours in order of first appearance
    for o in scene:
        groups.setdefault(o.colour, []).append(o.cell)
    steps = [f"{c} {' '.join(cells)} {number(len(cells))}" for c, cells in groups.items()]
    return Query(scene, "", "what is the most common colour ?", colour, cot(caption(scene), *steps, answer=colour),
                 labels(rng, colour, n_cand))


def majority(rng, colour, n):
    """n colours from 2-3 distinct ones where `colour` wins by exactly one: a count, not a glance."""
    others = [c for c in COLOURS if c != colour]
    while True:
        palette = [colour] + shuffled(rng, others)[:int(rng.integers(1, 3))]
        colours = [pick(rng, palette) for _ in range(n)]
        counts = sorted((colours.count(c) for c in set(colours)), reverse=True)
        if len(counts) > 1 and colours.count(colour) == counts[0] == counts[1] + 1:
            return colours


def count_cls(rng, difficulty, n, n_cand):
    scene = scene_of(scatter(rng, random_kinds(rng, n)))
    # a numbered listing: the count is a copy of the last index
    look = " , ".join(f"{number(i + 1)} {o.cell} {o.colour} {o.shape}" for i, o in enumerate(scene))
    return Query(scene, "", "how many objects are there ?", number(n), cot(look, answer=number(n)),
                 labels(rng, number(n), n_cand))


def color_vqa(rng, difficulty, colour, n_cand):
    if difficulty == "easy":
        shape = pick(rng, SHAPES)
        rest = random_kinds(rng, int(rng.integers(0, EASY_VQA_OBJECTS)), lambda k: k[1] != shape)
        scene = scene_of(scatter(rng, [(colour, shape)] + rest))
        (ref,) = find(scene, shape=shape)
        question, steps = f"what colour is the {shape} ?", [f"the {shape} is at {ref.cell}", say(ref, "colour")]
    else:
        scene, anchor, relation, ref = related(rng, colour=colour)
        question = f"what colour is the object {relation} the {anchor.colour} {anchor.shape} ?"
        steps = hop(anchor, relation, ref, "colour")
    return Query(scene, question, question, colour, cot(caption(scene), *steps, answer=colour),
                 labels(rng, colour, n_cand))


def shape_vqa(rng, difficulty, shape, n_cand):
    if difficulty == "easy":
        colour = pick(rng, COLOURS)
        rest = random_kinds(rng, int(rng.integers(0, EASY_VQA_OBJECTS)), lambda k: k[0] != colour)
        scene = scene_of(scatter(rng, [(colour, shape)] + rest))
        (ref,) = find(scene, colour=colour)
        question = f"what shape is the {colour} object ?"
        steps = [f"the {colour} object is at {ref.cell}", say(ref, "shape")]
    elif rng.random() < 0.5:
        scene, anchor, relation, ref = related(rng, shape=shape)
        question = f"what shape is the object {relation} the {anchor.colour} {anchor.shape} ?"
        steps = hop(anchor, relation, ref, "shape")
    else:
        scene, key, ref = same_colour(rng, shape=shape)
        question = f"what shape is the object with the same colour as the {key.shape} ?"
        steps = match(key, ref) + [say(ref, "shape")]
    return Query(scene, question, question, shape, cot(caption(scene), *steps, answer=shape),
                 labels(rng, shape, n_cand))


def where_vqa(rng, difficulty, cell, n_cand):
    if difficulty == "easy":
        ref = Obj(cell, *random_kind(rng))
        colour, shape = ref.colour, ref.shape
        rest = random_kinds(rng, int(rng.integers(0, EASY_VQA_OBJECTS)), lambda k: k[0] != colour and k[1] != shape)
        scene = scene_of([ref] + scatter(rng, rest, taken=[ref]))
        question, steps = f"where is the {colour} {shape} ?", [f"the {colour} {shape} is at {cell}"]
    else:
        scene, anchor, relation, ref = related(rng, ref_cell=cell)
        question = f"where is the object {relation} the {anchor.colour} {anchor.shape} ?"
        steps = hop(anchor, relation, ref)
    return Query(scene, question, question, cell, cot(caption(scene), *steps, answer=cell),
                 labels(rng, cell, n_cand))


def i2t(rng, difficulty, n, n_cand):
    scene = scene_of(scatter(rng, random_kinds(rng, n)))
    gold = caption(scene)
    if difficulty == "easy":
        # no distractor has any of the image's colours: one look at a colour rules it out, as in easy T2I
        colours = {o.colour for o in scene}
        unlike = lambda k: k[0] not in colours
        other = lambda: caption(scene_of(scatter(rng, random_kinds(rng, int(rng.integers(2, 4)), unlike))))
    else:
        other = lambda: caption(one_edit(rng, scene))
    return Query(scene, "", "what is in the image ?", gold, cot(gold, answer=gold),
                 [gold] + distinct(other, n_cand - 1, exclude=[gold]))


def t2i(rng, difficulty, kind, n_cand):
    """A text-only query; its CoT and answer can only restate what the image must show."""
    name = f"{kind[0]} {kind[1]}"
    if difficulty == "easy":
        # the only one of its colour and of its shape, and no distractor has either: one look suffices
        unlike = lambda k: k[0] != kind[0] and k[1] != kind[1]
        gold = scene_of(scatter(rng, [kind] + random_kinds(rng, int(rng.integers(1, 3)), unlike)))
        without = lambda: scene_of(scatter(rng, random_kinds(rng, int(rng.integers(2, 4)), unlike)))
        negatives = distinct(without, n_cand - 1, exclude=[gold])
        text, answer, steps = f"an image with a {name}", name, [name]
    else:
        other, relation = random_kind(rng, lambda k: k != kind), pick(rng, list(RELATIONS))
        other_name = f"{other[0]} {other[1]}"
        # "a red circle left of a blue square": the circle is in the cell left of the square
        b_cell = pick(rng, [c for c in CELLS if neighbour(c, relation)])
        pair = [Obj(neighbour(b_cell, relation), *kind), Obj(b_cell, *other)]
        fill = lambda k: random_kinds(rng, k, lambda x: x not in (kind, other))
        gold = scene_of(pair + scatter(rng, fill(int(rng.integers(1, 6))), taken=pair))
        negatives = distinct(lambda: apart(rng, kind, other, relation, fill), n_cand - 1, exclude=[gold])
        text, answer = f"an image with a {name} {relation} a {other_name}", f"{name} {relation} {other_name}"
        steps = [f"{name} , {other_name}", f"{other_name} is {INVERSE[relation]} {name}"]
    return Query(None, text, text, answer, cot(*steps, answer=answer),
                 [SceneImage(gold)] + [SceneImage(s) for s in negatives])


def apart(rng, kind, other, relation, fill):
    """A scene with one `kind` and one `other`, the first not `relation` the second."""
    while True:
        a, b = scatter(rng, [kind, other])
        if a.cell != neighbour(b.cell, relation):
            return scene_of([a, b] + scatter(rng, fill(int(rng.integers(1, 6))), taken=[a, b]))


def ground(rng, difficulty, kind, n_cand):
    colour, shape = kind
    if difficulty == "easy":
        scene = scene_of(scatter(rng, [kind] + random_kinds(rng, int(rng.integers(0, 3)), lambda k: k != kind)))
        (ref,) = find(scene, colour, shape)
        phrase, steps = f"the {colour} {shape}", [f"the {colour} {shape} is at {ref.cell}"]
    else:
        scene, anchor, relation, ref = related(rng, colour, shape)
        phrase = f"the object {relation} the {anchor.colour} {anchor.shape}"
        steps = hop(anchor, relation, ref, "colour shape")
    answer = f"{colour} {shape}"
    return Query(scene, phrase, f"what is {phrase} ?", answer, cot(caption(scene), *steps, answer=answer),
                 [CropImage(scene, ref)] + crop_distractors(rng, scene, kind, n_cand - 1))


def crop_distractors(rng, scene, kind, k):
    """Crops of the image's other objects (the hardest negatives), then of filler scenes' objects;
    each shows a colour+shape no other candidate shows, so no two candidates look alike."""
    pool, out, shown = [(scene, o) for o in shuffled(rng, scene)], [], {kind}
    while len(out) < k:
        if not pool:
            filler = scene_of(scatter(rng, random_kinds(rng, 7)))
            pool = [(filler, o) for o in filler]
        source, o = pool.pop(0)
        if (o.colour, o.shape) not in shown:
            shown.add((o.colour, o.shape))
            out.append(CropImage(source, o))
    return out


@dataclass(frozen=True)
class Task:
    make: Callable  # (rng, difficulty, goal, n_candidates) -> Query
    goals: dict  # difficulty -> the values the intended answer is balanced over
    instruction: str  # MMEB-style query instruction
    meta: str  # MMEB meta-task: CLS, VQA, RET or GRD


TASKS = {
    "ColorCLS": Task(color_cls, dict(easy=COLOURS, hard=COLOURS),
                     "represent the given image for classification by its most common colour", "CLS"),
    "CountCLS": Task(count_cls, dict(easy=[1, 2, 3], hard=[5, 6, 7, 8]),
                     "represent the given image for classification by the number of objects", "CLS"),
    "ColorVQA": Task(color_vqa, dict(easy=COLOURS, hard=COLOURS),
                     "represent the given image with the following question :", "VQA"),
    "ShapeVQA": Task(shape_vqa, dict(easy=SHAPES, hard=SHAPES),
                     "represent the given image with the following question :", "VQA"),
    "WhereVQA": Task(where_vqa, dict(easy=CELLS, hard=CELLS),
                     "represent the given image with the following question :", "VQA"),
    "I2T": Task(i2t, dict(easy=[2, 3], hard=[5, 6, 7]), "find a caption describing the given image", "RET"),
    "T2I": Task(t2i, dict(easy=KINDS, hard=KINDS), "find an image that matches the given caption :", "RET"),
    "Ground": Task(ground, dict(easy=KINDS, hard=KINDS),
                   "select the portion of the image that isolates the object labeled as :", "GRD"),
}


def vocabulary():
    """Every word the generator can emit (`<|image_1|>` aside), sorted."""
    texts = [GLUE, TARGET_IMAGE, TARGET_CROP, *COLOURS, *SHAPES, *NUMBERS, *CELLS, *RELATIONS,
             *(task.instruction for task in TASKS.values())]
    return sorted(set(" ".join(texts).split()))


def join(*parts):
    return " ".join(p for p in parts if p)


def query_text(task, query):
    return join(IMAGE if query.scene else "", TASKS[task].instruction, query.text)


def target_instruction(candidate):
    if isinstance(candidate, SceneImage):
        return join(IMAGE, TARGET_IMAGE)
    return join(IMAGE, TARGET_CROP) if isinstance(candidate, CropImage) else ""


# -----------------------------------------------------------------------------
# drawing and writing: a Split owns a random stream, the scenes it has used, and its files


def render(scene):
    """The scene as a 112x112 image; each shape is 24 px, centred in its 28 px cell.

    Centred and unjittered on purpose: each cell is exactly one Qwen2-VL LLM token (2x2 patches of
    14 px), so every patch sees one fixed quadrant of a shape. With 20-24 px shapes jittered by +-2 px
    a 2.3 M-parameter model learned colours and cells in 2,400 steps but stayed at chance on shapes.
    """
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    size = 24
    for o in scene:
        top, left = ROWS.index(o.cell[0]) * CELL, COLS.index(o.cell[1]) * CELL
        x0, y0 = left + (CELL - size) // 2, top + (CELL - size) // 2
        x1, y1, fill = x0 + size - 1, y0 + size - 1, RGB[o.colour]  # PIL boxes include their far edge
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:  # cross: a plus sign with bars a third of its size thick
            t0, t1 = x0 + size // 3, x0 + size - size // 3 - 1
            u0, u1 = y0 + size // 3, y0 + size - size // 3 - 1
            draw.rectangle([t0, y0, t1, y1], fill=fill)
            draw.rectangle([x0, u0, x1, u1], fill=fill)
    return image


STREAMS = {"train": 0, "eval": 1}  # separate random streams per split, from one seed


class Split:
    """One side of the train/eval divide: its own random stream, the scenes it used, the files it wrote."""

    def __init__(self, name, out, seed, forbidden=frozenset()):
        self.name, self.out, self.seed, self.forbidden = name, out, seed, forbidden
        self.rng = np.random.default_rng([seed, STREAMS[name]])  # the split's own draws (the train rows' order)
        self.captions = set()  # every scene graph this split has shown (query images and image candidates)
        self.described = []  # (path, what it shows) of every image and crop written: pretraining's `describe`
        self.n_images = 0
        for part in ("images", "crops"):
            (out / part / name).mkdir(parents=True, exist_ok=True)

    def queries(self, task, n, n_cand):
        """n queries of one task, half easy (the odd one out is easy) and half hard, answers balanced.

        Each task draws from its own stream, so changing how one task is made leaves the others as they were."""
        spec, rng = TASKS[task], np.random.default_rng([self.seed, STREAMS[self.name], *task.encode()])
        for difficulty, k in zip(DIFFICULTIES, (n - n // 2, n // 2)):
            for goal in balanced(rng, spec.goals[difficulty], k):
                query = spec.make(rng, difficulty, goal, n_cand)
                while not self.admit(query):
                    query = spec.make(rng, difficulty, goal, n_cand)
                yield difficulty, query

    def admit(self, query):
        """Keep the query unless one of its scenes belongs to the other split."""
        scenes = [c.scene for c in query.candidates if not isinstance(c, str)]
        scenes += [query.scene] if query.scene else []
        if any(caption(s) in self.forbidden for s in scenes):
            return False
        self.captions.update(caption(s) for s in scenes)
        return True

    def files(self, query):
        """Write the query's images and crops: (query image path or "", [(text, image path)] per candidate).

        Every query writes its own image files (a scene graph that recurs in another row gets its own
        file); within a query a crop is cut from the very image the query shows."""
        drawn = {}  # scene -> (path, image)

        def image(scene):
            if scene not in drawn:
                path = f"images/{self.name}/{self.n_images:06d}.png"
                drawn[scene] = path, render(scene)
                drawn[scene][1].save(self.out / path, **PNG)
                self.n_images += 1
                self.described.append((path, caption(scene)))
            return drawn[scene]

        def target(candidate):
            if isinstance(candidate, str):
                return candidate, ""
            if isinstance(candidate, SceneImage):
                return "", image(candidate.scene)[0]
            return "", self.crop(*image(candidate.scene), candidate.obj)

        return image(query.scene)[0] if query.scene else "", [target(c) for c in query.candidates]

    def crop(self, source, image, obj):
        """The object's 28 px cell of `image` (saved at `source`), upscaled (nearest) to 56 px."""
        top, left = ROWS.index(obj.cell[0]) * CELL, COLS.index(obj.cell[1]) * CELL
        path = f"crops/{self.name}/{Path(source).stem}_{obj.cell}.png"
        crop = image.crop((left, top, left + CELL, top + CELL)).resize((CROP, CROP), Image.NEAREST)
        crop.save(self.out / path, **PNG)
        self.described.append((path, f"{obj.colour} {obj.shape}"))
        return path


# -----------------------------------------------------------------------------
# the on-disk formats

EVAL_SCHEMA = pa.schema([("qry_inst", pa.string()), ("qry_text", pa.string()), ("qry_img_path", pa.string()),
                         ("tgt_inst", pa.string()), ("tgt_text", pa.list_(pa.string())),
                         ("tgt_img_path", pa.list_(pa.string())), ("difficulty", pa.string()),
                         ("answer", pa.string()), ("cot", pa.string()), ("scene", pa.string())])
TRAIN_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path",
    "cot", "task", "difficulty", "answer", "scene")])


def eval_row(task, difficulty, query, image, targets):
    texts, paths = zip(*targets)
    gold = query.candidates[0]
    return dict(qry_inst="", qry_text=query_text(task, query), qry_img_path=image,
                tgt_inst=target_instruction(gold), tgt_text=list(texts), tgt_img_path=list(paths),
                difficulty=difficulty, answer=query.answer, cot=query.cot, scene=caption(query.scene or gold.scene))


def train_row(task, difficulty, query, image, targets):
    (pos_text, pos_path), (neg_text, neg_path) = targets[:2]
    inst = target_instruction(query.candidates[0])  # MMEB-train keeps an image target's instruction in its text
    return dict(qry=query_text(task, query), qry_image_path=image, pos_text=join(inst, pos_text),
                pos_image_path=pos_path, neg_text=join(inst, neg_text), neg_image_path=neg_path, cot=query.cot,
                task=task, difficulty=difficulty, answer=query.answer,
                scene=caption(query.scene or query.candidates[0].scene))


def pretrain_lines(difficulty, query, image):
    """The bare question answered directly, and the same question answered by thinking first."""
    return [dict(image=image, prompt=query.prompt, completion=f"answer : {query.answer}", kind="direct",
                 difficulty=difficulty),
            dict(image=image, prompt=f"{query.prompt} think :", completion=query.cot, kind="think",
                 difficulty=difficulty)]


def reading_drill(rng, forbidden=frozenset()):
    """A text-only pretraining row that drills the lookups every VQA and grounding CoT makes.

    The question, ` think :` and the CoT's listing are given; the hops and the answer are to be written:
        prompt      what colour is the square ? think : b1 blue square , c3 red circle .
        completion  the square is at b1 . b1 is blue . answer : blue
    A real MLLM learned to look things up in its own context from a vast text corpus; the tiny backbone
    does not get that from the world's 9,000 training scenes (its lookup step stayed near chance:
    `data.backbone.lookup_accuracy`), so it reads fresh random scenes, as many as it needs. No image: it
    learns to *read* here, and to see from the image rows. A scene in `forbidden` (eval's) is drawn again.
    """
    while True:
        task = TASKS[pick(rng, ["ColorVQA", "ShapeVQA", "WhereVQA", "Ground"])]
        difficulty = pick(rng, DIFFICULTIES)
        query = task.make(rng, difficulty, pick(rng, task.goals[difficulty]), 10)
        if caption(query.scene) not in forbidden:
            break
    look, hops = query.cot.split(" . ", 1)
    return dict(image=None, prompt=f"{query.prompt} think : {look} .", completion=hops, kind="read",
                difficulty=difficulty)


def describe_lines(split):
    return [dict(image=path, prompt="describe :", completion=shows, kind="describe", difficulty="")
            for path, shows in split.described]


def write_jsonl(lines, path):
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def lazy(cot_text):
    """The teacher skipping its steps: the look and the answer, without the hops between them.

    `b1 blue square . the square is at b1 . b1 is blue . answer : blue` -> `b1 blue square . answer : blue`.
    The answer stays right; what is lost is the worked lookup a small student needs to get it right."""
    steps = cot_text.split(" . ")
    return " . ".join([steps[0], steps[-1]]) if len(steps) > 2 else cot_text


def version_of(out_dir):
    """The VERSION that wrote the world in out_dir: None if there is none, 1 if written before versions."""
    path = Path(out_dir) / "world.json"
    return json.loads(path.read_text()).get("version", 1) if path.exists() else None


def generate(out_dir, seed=0, train_scenes=9000, eval_queries=200, n_candidates=10, lazy_teacher=0.0):
    """Write the world under out_dir (its own subfolders are replaced) and return world.json's summary.

    lazy_teacher: the fraction of train rows whose CoT skips its hops (`lazy`), an imperfect teacher for
    testing RL (train_rl.py); the images, queries, eval files and pretraining text do not change."""
    if not 10 <= n_candidates <= len(KINDS):
        raise ValueError(f"n_candidates must be 10..{len(KINDS)} (Ground shows {len(KINDS)} kinds), got {n_candidates}")
    if not 0 <= lazy_teacher <= 1:
        raise ValueError(f"lazy_teacher is a fraction of train rows, 0..1, got {lazy_teacher}")
    start = time.perf_counter()
    out = Path(out_dir)
    for part in ("images", "crops", "eval", "train"):
        shutil.rmtree(out / part, ignore_errors=True)
    (out / "eval").mkdir(parents=True)
    (out / "train").mkdir()
    counts = {"eval": {}, "train": {}}

    # eval first, so it is the same whatever --train-scenes is; train then avoids eval's scene graphs
    ev, eval_lines = Split("eval", out, seed), []
    for task in TASKS:
        rows = []
        for difficulty, query in ev.queries(task, eval_queries, n_candidates):
            image, targets = ev.files(query)
            rows.append(eval_row(task, difficulty, query, image, targets))
            eval_lines += pretrain_lines(difficulty, query, image)
        # easy and hard interleaved, so the first N rows (evaluate.py --limit N) are a fair sample
        rows = shuffled(np.random.default_rng([seed, len(task), sum(map(ord, task))]), rows)
        pq.write_table(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), out / "eval" / f"{task}.parquet")
        counts["eval"][task] = {d: sum(r["difficulty"] == d for r in rows) for d in DIFFICULTIES}
    write_jsonl(describe_lines(ev) + eval_lines, out / "pretrain_eval.jsonl")

    tr, rows, lines = Split("train", out, seed, forbidden=ev.captions), [], []
    per_task = [train_scenes // len(TASKS) + (i < train_scenes % len(TASKS)) for i in range(len(TASKS))]
    for task, n in zip(TASKS, per_task):
        for difficulty, query in tr.queries(task, n, 2):  # two candidates: the positive and one hard negative
            image, targets = tr.files(query)
            rows.append(train_row(task, difficulty, query, image, targets))
            lines += pretrain_lines(difficulty, query, image)
        counts["train"][task] = {d: sum(r["task"] == task and r["difficulty"] == d for r in rows) for d in DIFFICULTIES}
    rows = shuffled(tr.rng, rows)
    skip = np.random.default_rng([seed, 1, 2, 3]).random(len(rows)) < lazy_teacher  # its own stream: rows stay put
    cots = [lazy(r["cot"]) if s else r["cot"] for r, s in zip(rows, skip)]
    lazy_rows = sum(c != r["cot"] for c, r in zip(cots, rows))
    rows = [dict(r, cot=c) for r, c in zip(rows, cots)]
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA), out / "train" / "train.parquet")
    lines = describe_lines(tr) + lines
    write_jsonl(lines, out / "pretrain.jsonl")
    summary = dict(version=VERSION, seed=seed, train_scenes=train_scenes, eval_queries=eval_queries, n_candidates=n_candidates,
                   easy_vqa_objects=EASY_VQA_OBJECTS, lazy_teacher=lazy_teacher, lazy_rows=lazy_rows,
                   tasks=list(TASKS), meta_tasks={n: t.meta for n, t in TASKS.items()}, vocabulary=vocabulary(), counts=counts,
                   images={s.name: s.n_images for s in (tr, ev)},
                   crops={s.name: len(s.described) - s.n_images for s in (tr, ev)}, pretrain_lines=len(lines),
                   seconds=round(time.perf_counter() - start, 1))
    (out / "world.json").write_text(json.dumps(summary, indent=1))
    return summary


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Generate the mini world: images, MMEB-style tasks, pretraining text.")
    parser.add_argument("--out", default="data/world", help="output directory; also the image root of the parquets")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--train-scenes", type=int, default=9000, help="train scenes, one train query each")
    parser.add_argument("--eval-queries", type=int, default=200, help="eval queries per task, half easy, half hard")
    parser.add_argument("--candidates", type=int, default=10, help="candidates per eval query, gold first (>= 10)")
    parser.add_argument("--easy-vqa-objects", type=int, default=EASY_VQA_OBJECTS, help="most objects in an easy "
                        "VQA scene (1: the asked object alone)")
    parser.add_argument("--lazy-teacher", type=float, default=0.0, help="fraction of train CoTs that skip their "
                        "hops (an imperfect teacher, for the RL experiment); 0: every CoT worked out")
    args = parser.parse_args()
    EASY_VQA_OBJECTS = args.easy_vqa_objects
    s = generate(args.out, args.seed, args.train_scenes, args.eval_queries, args.candidates, args.lazy_teacher)
    print(f"wrote {args.out}: {sum(sum(c.values()) for c in s['counts']['train'].values())} train rows, "
          f"{sum(sum(c.values()) for c in s['counts']['eval'].values())} eval queries, "
          f"{s['images']['train'] + s['images']['eval']} images, {s['crops']['train'] + s['crops']['eval']} crops, "
          f"{s['pretrain_lines']} pretrain lines in {s['seconds']} s")
