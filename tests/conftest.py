import os
import sys

# tests import the project's top-level modules (model.py, lora.py, ...) and tests/tiny.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import pytest


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small mini world (the real generator, fewer rows) shared by the training and eval tests."""
    from data import world
    out = tmp_path_factory.mktemp("world")
    world.generate(out, seed=0, train_scenes=96, eval_queries=16)
    return str(out)


@pytest.fixture(scope="session")
def small_backbone(small_world, tmp_path_factory):
    """A randomly initialised backbone directory with the tiny backbone's architecture and tokenizer."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    from data import backbone
    torch.manual_seed(0)
    tok, config = backbone.make_tokenizer_and_config(small_world)
    out = str(tmp_path_factory.mktemp("backbone") / "tiny")
    backbone.save_backbone(Qwen2VLForConditionalGeneration(config), tok, out)
    return out
