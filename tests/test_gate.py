"""gate.py: labels on a hand-built case, a separable fit, thresholds; adaptive inference at the extremes."""

import pytest
import torch

import gate as gate_lib
import model as twn_model
import runtime
from data.collate import Processor
from data.mmeb import load_image_task
from evaluate import Embedder


def test_win_labels_on_a_hand_built_case():
    # 3 queries x 4 targets; positives at columns 0, 1, 2
    s0 = torch.tensor([[0.9, 0.1, 0.2, 0.3],    # positive first without thinking
                       [0.5, 0.4, 0.6, 0.1],    # positive third
                       [0.1, 0.2, 0.3, 0.4]])   # positive second... (0.4 above it)
    s1 = torch.tensor([[0.9, 0.1, 0.2, 0.3],    # still first: a tie is not a win
                       [0.1, 0.9, 0.2, 0.3],    # now first: a win
                       [0.1, 0.2, 0.3, 0.9]])   # drops to second... still one above: tie
    pos = torch.tensor([0, 1, 2])
    r0, r1 = gate_lib.ranks(s0, pos), gate_lib.ranks(s1, pos)
    assert r0.tolist() == [0, 2, 1] and r1.tolist() == [0, 0, 1]
    assert gate_lib.win_labels(r0, r1).tolist() == [0.0, 1.0, 0.0]
    # below the top, moving up is not a win: place 5 -> 2 stays a miss at top 1, becomes a hit at top 3
    far0, far1 = torch.tensor([5, 5, 1]), torch.tensor([2, 5, 0])
    assert gate_lib.win_labels(far0, far1).tolist() == [0.0, 0.0, 1.0]
    assert gate_lib.win_labels(far0, far1, top=3).tolist() == [1.0, 0.0, 1.0]


def test_gate_fits_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] > 0.8).float()  # a minority class, ~20 %
    gate = gate_lib.Gate(16)
    gate_lib.fit(gate, x, y)
    assert ((gate.prob(x) >= 0.5).float() == y).float().mean() > 0.97


def test_threshold_maximises_score_and_meets_a_budget():
    # four kinds of query, ten of each (so that one kind is more than noise)
    probs = torch.tensor([0.1, 0.2, 0.8, 0.9]).repeat_interleave(10)
    hit0 = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat_interleave(10)
    hit1 = torch.tensor([0.0, 1.0, 1.0, 1.0]).repeat_interleave(10)
    t = gate_lib.pick_threshold(probs, hit0, hit1)
    assert t == pytest.approx(0.8)  # think on the two confident ones: score 1.0; 0.2 also scores 1.0 but thinks more
    assert gate_lib.pick_threshold(probs, hit0, hit1, budget=0.25) > 0.8
    assert gate_lib.pick_threshold(probs, hit0, hit1, budget=0.0) == 1.0


def test_threshold_prefers_less_thinking_when_the_score_is_the_same_within_noise():
    # 100 queries: thinking helps the 20 the gate is surest about, and one it is unsure about (prob 0.30)
    probs = torch.linspace(0, 1, 100)
    hit0, hit1 = torch.ones(100), torch.ones(100)
    hit0[80:] = 0
    hit0[30] = 0
    t = gate_lib.pick_threshold(probs, hit0, hit1)
    # the best score (1.0) needs thinking on 70 % of queries; 0.99 with 20 % is the same within noise
    assert t == pytest.approx(probs[80].item())
    hit0[30:80] = 0  # now thinking helps on every query from 0.3 up: each one left out is a real loss
    assert gate_lib.pick_threshold(probs, hit0, hit1) == pytest.approx(probs[31].item())  # one query is noise


def test_adaptive_at_threshold_0_is_always_think_and_at_1_never(small_world, small_backbone):
    torch.manual_seed(0)
    proc = Processor.from_pretrained(small_backbone)
    twn = twn_model.from_pretrained(small_backbone, twn_model.TWNConfig(r=4), tokenizer=proc.tokenizer, device="cpu")
    with torch.no_grad():  # adapters that do something
        for n, p in twn.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    twn.eval()
    items = [q.query for q in load_image_task(f"{small_world}/eval/ColorVQA.parquet", small_world)[:6]]
    rt = runtime.setup("cpu")
    gate = gate_lib.Gate(twn.queries.shape[1])
    run = lambda modes: Embedder(twn, proc, rt, 4, 6, gate).queries(items, modes)
    always, never = run(["think"]), run(["nothink"])
    gate.threshold.fill_(0.0)
    for a, b in zip(run(["adaptive"]), always):
        torch.testing.assert_close(a["adaptive"], b["think"], rtol=1e-4, atol=1e-5)
        assert a["tokens"] == b["tokens"] > 0
    gate.threshold.fill_(1.0)
    for a, b in zip(run(["adaptive"]), never):
        assert torch.equal(a["adaptive"], b["nothink"]) and a["tokens"] == 0
    # in between: the routed rows decode as a smaller batch and still get their own think embedding
    gate.threshold.fill_(gate.prob(torch.stack([o["state"] for o in never])).median().item())
    mixed = run(["adaptive"])
    assert 0 < sum(o["thought"] for o in mixed) < len(items)
    for a, t, n in zip(mixed, always, never):
        torch.testing.assert_close(a["adaptive"], t["think"] if a["thought"] else n["nothink"], rtol=1e-4, atol=1e-5)


def test_global_cache_keeps_one_column_per_content(tmp_path):
    """Two paths to the same picture are one target (else they tie, and rounding ranks them); a text
    and an image, or two different pictures, stay apart."""
    import evaluate
    from data.mmeb import Item

    a, twin, other = tmp_path / "a.png", tmp_path / "twin.png", tmp_path / "other.png"
    a.write_bytes(b"picture one")
    twin.write_bytes(b"picture one")
    other.write_bytes(b"picture two")

    class Pair:
        def __init__(self, pos, neg=None):
            self.pos, self.neg = pos, neg

    class Emb:
        def targets(self, items):
            self.seen = items
            return torch.arange(len(items), dtype=torch.float32)[:, None]

    img = lambda path, text="represent the given image": Item(text, str(path))
    pairs = [Pair(img(a), Item("red")), Pair(img(twin), img(other)), Pair(Item("red")), Pair(img(a, "another text"))]
    emb = Emb()
    targets, column, cache = evaluate.global_cache(emb, pairs)
    assert len(targets) == len(cache) == len(emb.seen) == 4  # a (= twin), "red", other, a with another text
    assert column[(img(twin).text, str(twin))] == column[(img(a).text, str(a))] == 0
    assert len({column[(t.text, t.image)] for t in (img(a), Item("red"), img(other), img(a, "another text"))}) == 4


def test_a_fit_does_not_depend_on_the_random_state_before_it():
    """train_sft.py fits the gate after a whole run, or right away when a finished run is resumed."""
    g = torch.Generator().manual_seed(0)
    states, labels = torch.randn(64, 8, generator=g), (torch.rand(64, generator=g) > 0.7).float()
    fitted = []
    for before in (1, 2):
        torch.manual_seed(before)
        gate = gate_lib.Gate(8)  # its initial weights come from the global state
        torch.randn(100)
        gate_lib.fit(gate, states, labels, steps=5, seed=3)
        fitted.append(gate.prob(states))
    torch.testing.assert_close(fitted[0], fitted[1])
