"""Bad inputs get a clear answer, nothing is scored silently wrong, nothing finished is redone.

Every bad input is generated here (no binary fixtures) and fed through the reader (data/mmeb.py), the
collate (data/collate.py) and evaluate.py / train_sft.py, checking the error message or the skip count.
"""

import io
import json
import math
import os
import random
import shutil
import struct
import subprocess
import warnings
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

import evaluate
import model as twn_model
import runtime
from data.collate import Processor, open_image
from data.mmeb import QWEN_IMAGE, Item, load_image_task, load_visdoc
from data.tokenizer import build_word_tokenizer
from test_train import ROOT, sft

WORDS = ["red", "blue", "green", "what", "colour", "is", "the", "square", "?"]
CAP = 112 * 112  # max_pixels of the processor below: at most 8x8 patches = 16 LLM tokens per image


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    """A Processor as Processor.from_pretrained reads a backbone dir: 14 px patches, 56^2..112^2 pixels."""
    path = tmp_path_factory.mktemp("proc")
    build_word_tokenizer(WORDS).save_pretrained(path)
    config = dict(image_processor_type="Qwen2VLImageProcessor", patch_size=14, merge_size=2, temporal_patch_size=2,
                  min_pixels=56 * 56, max_pixels=CAP, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    return Processor.from_pretrained(str(path))


def save(path, image, fmt=None, **kw):
    image.save(path, fmt, **kw)
    return str(path)


def truncated(path, fmt="PNG"):
    """An image cut in half, as a failed download leaves it."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return str(path)


def png_header(path, width, height):
    """A PNG that claims a size but holds no pixels: the size check must come before any decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return str(path)


def text_file(path, text):
    path.write_text(text)
    return str(path)


def grid(proc, path, text=""):
    return proc([Item(f"{QWEN_IMAGE} {text}".strip(), path)])["image_grid_thw"].tolist()[0]


# ----------------------------------------------------------------------------- images: bad files


@pytest.mark.parametrize("make, problem", [
    (lambda d: str(d / "missing.png"), "image file not found"),
    (lambda d: truncated(d / "cut.png"), "unreadable image, truncated or corrupt"),
    (lambda d: truncated(d / "cut.jpg", "JPEG"), "unreadable image, truncated or corrupt"),
    (lambda d: text_file(d / "notes.png", "not an image"), "not an image file"),
    (lambda d: text_file(d / "empty.jpg", ""), "not an image file"),
    (lambda d: png_header(d / "bomb.png", 20_000, 20_000), "over twn's limit"),  # PIL's own bomb error
    (lambda d: png_header(d / "huge.png", 13_000, 13_000), "over twn's limit"),  # twn's limit, below PIL's
    (lambda d: save(d / "thin.png", Image.new("RGB", (402, 2))), "longer and thinner than 200:1"),
])
def test_bad_image_files_name_the_path_and_the_problem(proc, tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ValueError) as error:
        proc([Item("red"), Item(QWEN_IMAGE + " what colour", path)])
    assert path in str(error.value) and problem in str(error.value)
    assert proc.problem(Item(QWEN_IMAGE, path)) == str(error.value)
    assert proc.problem(Item(QWEN_IMAGE, save(tmp_path / "ok.png", Image.new("RGB", (8, 8))))) is None


# ----------------------------------------------------------------------------- images: modes


def pixel(path):
    return open_image(path).getpixel((0, 0))


def test_16_bit_greys_are_scaled_not_clipped_to_white(tmp_path):
    assert pixel(save(tmp_path / "a.png", Image.new("I;16", (4, 4), 128 * 257))) == (128, 128, 128)
    assert pixel(save(tmp_path / "b.tif", Image.new("I", (4, 4), 65535))) == (255, 255, 255)
    assert pixel(save(tmp_path / "c.tif", Image.new("I", (4, 4), 257 * 10))) == (10, 10, 10)
    ramp = Image.frombytes("I;16", (256, 1), bytes(b for v in range(0, 65536, 256) for b in struct.pack("<H", v)))
    grey = open_image(save(tmp_path / "ramp.png", ramp)).convert("L")
    assert 120 < sum(grey.tobytes()) / 256 < 135  # a ramp stays a ramp (clipped, it would be ~255)


def test_cmyk_and_palette_and_bilevel_become_rgb(tmp_path):
    assert pixel(save(tmp_path / "c.tif", Image.new("CMYK", (4, 4), (255, 0, 0, 0)))) == (0, 255, 255)
    assert pixel(save(tmp_path / "w.tif", Image.new("CMYK", (4, 4), (0, 0, 0, 0)))) == (255, 255, 255)
    assert pixel(save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 255)))) == (0, 0, 0)
    assert pixel(save(tmp_path / "one.png", Image.new("1", (4, 4), 1))) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert pixel(save(tmp_path / "p.png", palette)) == (0, 0, 255)


def test_transparency_is_composited_on_white(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    image = open_image(save(tmp_path / "p.png", p, transparency=0))  # index 0 (red) is transparent
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 0)) == (0, 0, 255)
    assert pixel(save(tmp_path / "clear.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))) == (255, 255, 255)
    assert pixel(save(tmp_path / "solid.png", Image.new("RGBA", (4, 4), (255, 0, 0, 255)))) == (255, 0, 0)
    assert pixel(save(tmp_path / "half.png", Image.new("LA", (4, 4), (0, 128)))) == (127, 127, 127)


# ----------------------------------------------------------------------------- images: sizes


def test_one_pixel_image_is_upscaled_to_min_pixels(proc, tmp_path):
    assert grid(proc, save(tmp_path / "dot.png", Image.new("RGB", (1, 1), "red"))) == [1, 4, 4]  # 56x56 px


def test_huge_jpeg_is_decoded_small_and_upright(proc, tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 10,000 wide x 5,000 high, shown 5,000 wide x 10,000 high
    path = save(tmp_path / "huge.jpg", Image.new("RGB", (10_000, 5_000), "red"), "JPEG", exif=exif, quality=50)
    asked = []
    draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: asked.append(size) or draft(self, mode, size))
    image = open_image(path, CAP)
    assert asked and asked[0][0] < 10_000 // 8 < 2_000  # the decoder itself was asked for a small image
    assert image.height > image.width and image.width * image.height < 100 * CAP
    assert grid(proc, path) == [1, 10, 4]  # upright, capped by max_pixels: 140 x 56 px, as from the full image


def test_big_png_shrunk_before_the_processor_gives_the_same_grid(proc, tmp_path):
    path = save(tmp_path / "big.png", Image.new("RGB", (2_000, 1_500), "blue"))
    small = open_image(path, CAP)
    assert small.size == (286, 215)  # reduced 7x by a box filter, still >= 2x the final size per side
    full = proc.image_processor([open_image(path)], return_tensors="pt")["image_grid_thw"].tolist()[0]
    assert grid(proc, path) == full


# ----------------------------------------------------------------------------- text


def test_long_text_is_cut_with_a_warning_and_image_tokens_are_kept(tmp_path, proc):
    long = Processor(proc.tokenizer, proc.image_processor, max_text_tokens=20)
    path = save(tmp_path / "a.png", Image.new("RGB", (56, 56)))
    with pytest.warns(UserWarning, match=r"text of 31 tokens cut to max_text_tokens=20 \(11 tokens dropped\)"):
        batch = long([Item(QWEN_IMAGE + " red" * 30 + " ?", path)])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(long.image_token_id) == 4 and ids[0] == long.vision_start_id
    assert len(ids) == 4 + 2 + 20 and ids[-1] == long.tokenizer.get_vocab()["red"]  # the end was cut
    assert long([Item("red " * 20)])["input_ids"].shape == (1, 20)  # at the limit: nothing cut, no warning


def test_empty_query_names_file_and_row(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"qry_text": ["red", "  "], "qry_img_path": ["", ""], "tgt_text": [["a"], ["b"]],
                             "tgt_img_path": [[""], [""]]}), path)
    with pytest.raises(ValueError, match=r"t\.parquet: row 1, query: empty item"):
        load_image_task(path, str(tmp_path))


# ----------------------------------------------------------------------------- fuzz through the collate


def random_image(rng, path):
    mode = rng.choice(["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
    size = tuple(max(1, int(math.exp(rng.uniform(0, math.log(3000))))) for _ in range(2))
    image = Image.new(mode, size)
    fmt = {"I": "TIFF", "F": "TIFF", "CMYK": "TIFF", "YCbCr": "JPEG"}.get(mode, "PNG")
    image.save(path, fmt, **({"transparency": 0} if mode == "P" else {}))
    if rng.random() < 0.1:  # now and then a damaged file
        path.write_bytes(path.read_bytes()[: rng.randrange(1, max(2, path.stat().st_size))])
    return str(path), mode, size


def test_fuzz_sizes_modes_and_text_lengths_never_crash_without_a_clear_message(proc, tmp_path):
    rng = random.Random(0)
    short = Processor(proc.tokenizer, proc.image_processor, max_text_tokens=64)
    seen = {"ok": 0, "error": 0}
    for i in range(80):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 1, 5, 63, 64, 65, 300])))
        path = mode = size = None
        if rng.random() < 0.8:
            path, mode, size = random_image(rng, tmp_path / f"{i}.img")
            text = f"{QWEN_IMAGE} {text}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # truncation warnings are expected here
                batch = short([Item(text, path)])
        except ValueError as e:
            assert (path and path in str(e)) or "no tokens" in str(e), (mode, size, str(e))
            seen["error"] += 1
            continue
        ids = batch["input_ids"][0]
        n_image = int((ids == short.image_token_id).sum())
        assert n_image == (int(batch["image_grid_thw"].prod()) // 4 if path else 0)
        assert len(ids) - n_image - (2 if path else 0) <= 64
        assert batch["pixel_values"].isfinite().all() if path else True
        seen["ok"] += 1
    assert seen["ok"] > 40 and seen["error"] > 5  # both paths were exercised


# ----------------------------------------------------------------------------- schema and skip mode in the readers


def test_gold_index_other_than_zero_is_an_error(tmp_path):
    columns = {"qry_text": ["a", "b"], "qry_img_path": ["", ""], "tgt_text": [["x", "y"], ["x", "y"]],
               "tgt_img_path": [["", ""], ["", ""]]}
    path = str(tmp_path / "gold.parquet")
    pq.write_table(pa.table({**columns, "gold_index": [0, 1]}), path)
    with pytest.raises(ValueError, match=r"gold\.parquet: row 1: gold_index is 1, but the gold candidate must come first"):
        load_image_task(path, str(tmp_path))
    pq.write_table(pa.table({**columns, "label": ["dog", "cat"]}), path)  # a class name is metadata
    assert [q.meta["label"] for q in load_image_task(path, str(tmp_path))] == ["dog", "cat"]


def test_readers_skip_bad_rows_with_their_problems(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({
        "qry_text": ["ok", "", "ok", "ok", "ok"], "qry_img_path": ["", "", "", "", "gone.png"],
        "tgt_text": [["a"], ["a"], [], ["a", "b"], ["a"]], "tgt_img_path": [[""], [""], [], [""], [""]],
    }), path)
    skipped = []
    assert [q.row for q in load_image_task(path, str(tmp_path), skipped)] == [0]
    assert [row for row, _ in skipped] == [1, 2, 3, 4]
    problems = " | ".join(message for _, message in skipped)
    for expected in ("row 1, query: empty item", "row 2: empty candidate list",
                     "row 3: tgt_text has 2 entries but tgt_img_path has 1", "row 4, query: image file not found"):
        assert expected in problems


def test_visdoc_skips_a_bad_page_and_the_queries_it_is_relevant_to(tmp_path):
    save(tmp_path / "p1.png", Image.new("RGB", (8, 8)))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": "red"}) + "\n" for q in ("q1", "q2")))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "image": "p1.png"}) + "\n"
                                           + json.dumps({"_id": "d2", "image": "gone.png"}) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: row 1: image file not found"):
        load_visdoc(str(tmp_path))
    skipped = []
    docs = load_visdoc(str(tmp_path), skipped=skipped)
    assert docs.query_ids == ["q1"] and docs.corpus_ids == ["d1"] and docs.qrels == {"q1": {"d1": 1}}
    assert len(skipped) == 3 and "query 'q2' left out" in skipped[-1][1]


# ----------------------------------------------------------------------------- evaluate.py: fail, skip, resume


@pytest.fixture(scope="module")
def model_dir(small_backbone, tmp_path_factory):
    """An untrained TWN (adapters at B = 0) saved as train_sft.py saves one: enough to run evaluate.py."""
    out = str(tmp_path_factory.mktemp("model"))
    twn = twn_model.from_pretrained(small_backbone, twn_model.TWNConfig(r=4, alpha=8.0), device="cpu")
    twn.save(out, extra={"sft": {"backbone": small_backbone}})
    return out


def bad_eval_data(small_world, root):
    """eval/Bad.parquet: T2I rows broken in every way a reader or the collate can see; eval/Corrupt.parquet:
    only a truncated candidate image, which nothing finds before its batch is collated."""
    rows = pq.read_table(os.path.join(small_world, "eval", "T2I.parquet")).to_pylist()[:7]
    for row in rows:
        row["gold_index"] = 0
    cut, notes = truncated(root / "cut.png"), root / "notes.png"
    notes.write_text("not an image")
    rows[1]["tgt_img_path"] = [rows[1]["tgt_img_path"][0], cut] + rows[1]["tgt_img_path"][2:]  # collate
    rows[2]["tgt_img_path"] = ["gone.png"] + rows[2]["tgt_img_path"][1:]  # reader: missing file
    rows[3]["qry_text"] = ""  # reader: empty query
    rows[4]["qry_text"], rows[4]["qry_img_path"] = "<|image_1|> " + rows[4]["qry_text"], str(notes)  # collate
    rows[5]["gold_index"] = 1  # reader: gold not first
    (root / "eval").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "eval" / "Bad.parquet")
    pq.write_table(pa.Table.from_pylist([rows[0], rows[1]]), root / "eval" / "Corrupt.parquet")
    return str(root), cut


def run_eval(capsys, model_dir, *args):
    results = evaluate.main(["--model", model_dir, "--modes", "nothink", "--batch-size", "4", *map(str, args)])
    return results, capsys.readouterr().out


def test_evaluate_fails_on_the_first_bad_row_naming_file_row_and_problem(small_world, model_dir, tmp_path, capsys):
    data, cut = bad_eval_data(small_world, tmp_path)
    common = ["--data", data, "--image-root", small_world, "--out", tmp_path / "out"]
    with pytest.raises(ValueError, match=r"Bad\.parquet: row 2, candidate 0: image file not found"):
        run_eval(capsys, model_dir, *common, "--task", "Bad")
    with pytest.raises(ValueError) as error:  # found only when its batch is collated: still names the row
        run_eval(capsys, model_dir, *common, "--task", "Corrupt")
    assert f"Corrupt.parquet: row 1, candidate 1: {cut}: unreadable image, truncated or corrupt" in str(error.value)


def test_evaluate_skips_bad_rows_counts_them_and_resumes(small_world, model_dir, tmp_path, capsys):
    data, cut = bad_eval_data(small_world, tmp_path)
    out = tmp_path / "out"
    common = ["--data", data, "--image-root", small_world, "--out", out, "--task", "Bad", "--on-error", "skip"]
    results, log = run_eval(capsys, model_dir, *common)
    r = results["Bad"]
    assert r["all"]["n"] == 2 and r["all"]["skipped"] == 5 and results["overall"]["all"]["skipped"] == 5
    assert [s["row"] for s in r["skipped"]] == [2, 3, 5, 1, 4]  # reader first, then the collate
    problems = [s["problem"] for s in r["skipped"]]
    assert "row 1, candidate 1: " + cut in problems[3] and "row 4, query: " in problems[4] and "not an image" in problems[4]
    assert "skip" in log.splitlines()[0] and "Bad: 5 rows skipped" in log
    saved = json.loads((out / "results.json").read_text())["tasks"]["Bad"]
    assert saved["all"]["skipped"] == 5 and len(saved["skipped"]) == 5
    assert json.loads((out / "nothink" / "Bad_score.json").read_text())["num_pred"] == 2

    again, log = run_eval(capsys, model_dir, *common)
    assert "Bad: scored before, reusing" in log and again["Bad"] == r
    _, log = run_eval(capsys, model_dir, *common, "--limit", 3)  # other settings: not the same result
    assert "reusing" not in log


def test_evaluate_resumes_task_by_task_and_overwrite_redoes(small_world, model_dir, tmp_path, capsys):
    common = ["--data", small_world, "--out", tmp_path / "out", "--task", "ColorVQA,ShapeVQA", "--limit", 3]
    first, log = run_eval(capsys, model_dir, *common)
    assert "reusing" not in log
    os.remove(tmp_path / "out" / "ShapeVQA_summary.json")  # as if killed before ShapeVQA was finished
    second, log = run_eval(capsys, model_dir, *common)
    assert "ColorVQA: scored before, reusing" in log and "ShapeVQA: scored before" not in log
    assert second["ColorVQA"] == first["ColorVQA"]
    assert second["ShapeVQA"]["all"]["nothink"] == first["ShapeVQA"]["all"]["nothink"]
    _, log = run_eval(capsys, model_dir, *common, "--overwrite")
    assert "reusing" not in log


def test_evaluate_never_reuses_a_result_of_other_data_or_another_model(small_world, small_backbone, model_dir, tmp_path, capsys):
    """Same task name, same --out: a result is stale once the task file or the model's weights changed."""
    model = str(shutil.copytree(model_dir, tmp_path / "model"))
    data = tmp_path / "other"
    (data / "eval").mkdir(parents=True)
    rows = pq.read_table(os.path.join(small_world, "eval", "ColorVQA.parquet")).to_pylist()
    pq.write_table(pa.Table.from_pylist(rows[3:6]), data / "eval" / "ColorVQA.parquet")
    common = ["--out", tmp_path / "out", "--task", "ColorVQA", "--limit", 3]
    run_eval(capsys, model, "--data", small_world, *common)
    _, log = run_eval(capsys, model, "--data", small_world, *common)
    assert "ColorVQA: scored before, reusing" in log  # nothing changed: reused
    _, log = run_eval(capsys, model, "--data", data, "--image-root", small_world, *common)
    assert "reusing" not in log  # another world's ColorVQA
    _, log = run_eval(capsys, model, "--data", data, "--image-root", small_world, *common)
    assert "ColorVQA: scored before, reusing" in log
    twn = twn_model.from_pretrained(small_backbone, twn_model.read_config(model), device="cpu")
    twn.save(model, extra={"sft": {"backbone": small_backbone}})  # weights rewritten: as if retrained
    _, log = run_eval(capsys, model, "--data", data, "--image-root", small_world, *common)
    assert "reusing" not in log


# ----------------------------------------------------------------------------- training data


def bad_train_data(small_world, root):
    rows = pq.read_table(os.path.join(small_world, "train", "train.parquet")).to_pylist()[:18]
    rows[3]["pos_image_path"] = "gone.png"  # reader
    rows[7]["qry_image_path"] = truncated(root / "cut.png")  # collate
    rows[7]["qry"] = "<|image_1|> " + rows[7]["qry"].replace("<|image_1|>", "").strip()
    (root / "train").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "train" / "train.parquet")
    return str(root), [str(root / "train" / "train.parquet")]


def test_training_pairs_fail_or_skip(small_world, tmp_path, proc):
    data, files = bad_train_data(small_world, tmp_path)
    with pytest.raises(ValueError, match=r"train\.parquet: row 3, pos: image file not found"):
        runtime.load_pairs(files, small_world, proc, "fail")
    pairs, dropped = runtime.load_pairs(files, small_world, proc, "skip")
    assert len(pairs) == 16 and [p.row for p in pairs if p.row in (3, 7)] == []
    assert "row 3, pos: image file not found" in dropped[0] and "row 7, query: " in dropped[1] and "truncated" in dropped[1]


def test_train_sft_on_error_skip_drops_bad_pairs_and_trains(small_world, small_backbone, tmp_path):
    data, _ = bad_train_data(small_world, tmp_path)
    log = sft(data, small_backbone, tmp_path / "m", "--steps", 1, "--image-root", small_world, "--on-error", "skip")
    assert "--on-error skip: dropped 2 bad training pairs" in log and "row 3, pos: image file not found" in log
    assert (tmp_path / "m" / "twn.json").exists()


# ----------------------------------------------------------------------------- NaN / inf steps


def test_bad_step_guard_skips_non_finite_steps_and_stops_after_n_in_a_row():
    guard = runtime.BadStepGuard(limit=3)
    assert guard.ok(1.0, torch.tensor(2.0))
    assert not guard.ok(1.0, torch.tensor(float("nan")))
    assert not guard.ok(float("inf"), 0.5)
    assert guard.ok(0.1, 0.2) and guard.in_a_row == 0 and guard.total == 2  # a good step resets the run
    assert not guard.ok(float("nan")) and not guard.ok(-float("inf"))
    with pytest.raises(RuntimeError, match="3 steps in a row had a NaN/inf loss or gradient norm"):
        guard.ok(torch.tensor(float("nan")))


def test_bad_step_guard_keeps_bad_gradients_out_of_the_weights():
    """The way the training scripts use it: a NaN step leaves the parameters and AdamW's state as they were."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    guard = runtime.BadStepGuard(limit=5)
    for scale in (1.0, float("nan"), 1.0):
        opt.zero_grad(set_to_none=True)
        loss = (w * scale).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
        if guard.ok(loss.item(), norm):
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
    assert torch.isfinite(w).all() and opt.state[w]["step"] == 2


# ----------------------------------------------------------------------------- untrusted files


def test_no_pickle_loading_and_no_remote_code_anywhere():
    needles = ("torch." + "load(", "trust_remote" + "_code", "pickle." + "load")
    # the project's own files: what git tracks, not a virtual environment that happens to sit inside
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "model.py" in files
    for name in files:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for needle in needles:
            assert needle not in text or "weights_only=True" in text, f"{name}: {needle}"


def test_model_files_are_checked_before_use(small_backbone, model_dir, tmp_path):
    twn = twn_model.from_pretrained(small_backbone, twn_model.TWNConfig(r=4, alpha=8.0), device="cpu")
    (tmp_path / "embedding").mkdir()
    queries = tmp_path / "embedding" / "queries.safetensors"
    for part in ("reasoning", "embedding"):
        os.makedirs(tmp_path / part, exist_ok=True)
        for name in os.listdir(os.path.join(model_dir, part)):
            (tmp_path / part / name).write_bytes(open(os.path.join(model_dir, part, name), "rb").read())
    from safetensors.torch import save_file
    save_file({"q": twn.queries.detach().clone()}, str(queries))
    with pytest.raises(ValueError, match="expected one tensor 'queries', found \\['q'\\]"):
        twn.load(str(tmp_path))
    queries.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=f"{queries}: not a readable safetensors file"):
        twn.load(str(tmp_path))
    with pytest.raises(ValueError, match="unknown TWNConfig keys"):
        twn_model.TWNConfig.from_dict({"r": 4, "run_this": "rm -rf /"})

    pickled = tmp_path / "pickled"  # a backbone shipped as a pickle (.bin) is refused, not unpickled
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(small_backbone, "config.json")).read())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OSError, match="safetensors"):
        twn_model.from_pretrained(str(pickled), device="cpu")
