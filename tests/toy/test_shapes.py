"""Shapes-VQA: determinism, answers re-derived from the scene and from the pixels, unique and balanced
questions, disjoint splits, closed vocabulary, scoring."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from matvlm.toy import shapes as S


@pytest.fixture(scope="module")
def items():
    """600 train images, one question each: (image id, scene, [sample])."""
    return list(S.generate(600, seed=0, split="train"))


@pytest.fixture(scope="module")
def samples(items):
    return [s for _, _, ss in items for s in ss]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_and_pixels(tmp_path):
    a = S.write_dataset(tmp_path / "a", 40, seed=3, questions_per_image=2)
    b = S.write_dataset(tmp_path / "b", 40, seed=3, questions_per_image=2)
    assert a.read_bytes() == b.read_bytes()
    for rec in S.load_samples(a)[::7]:
        pa, pb = (np.asarray(Image.open(d / rec["image"])) for d in (a.parent, b.parent))
        assert pa.shape == (64, 64, 3) and np.array_equal(pa, pb)
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()


def test_different_seed_differs(tmp_path):
    a = S.write_dataset(tmp_path / "a", 40, seed=3)
    b = S.write_dataset(tmp_path / "b", 40, seed=4)
    assert a.read_bytes() != b.read_bytes()
    keys = lambda p: [json.dumps(r["scene"]) for r in S.load_samples(p)]
    assert sum(x != y for x, y in zip(keys(a), keys(b))) > 30


def test_scene_from_seed_is_deterministic():
    assert S.scene_from_seed(11) == S.scene_from_seed(11)
    assert len({S.scene_from_seed(i).key() for i in range(50)}) > 40


def test_record_is_llava_format(tmp_path):
    path = S.write_dataset(tmp_path, 3, seed=0)
    for rec in S.load_samples(path):
        assert (tmp_path / rec["image"]).is_file() and rec["image"] == f"images/{rec['id']}.png"
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": rec["answer"]}
        assert rec["qtype"] in S.QTYPES


# ----------------------------------------------------------------------------- answers

def test_answers_rederived_from_scene_and_question_text(samples):
    for s in samples:
        assert S.answer(s.scene, s.question) == s.answer, s
        assert S.parse(s.question).text() == s.question


def test_answers_rederived_from_json(tmp_path):
    for rec in S.load_samples(S.write_dataset(tmp_path, 200, seed=5)):
        scene = S.Scene.from_json(rec["scene"], rec["grid"])
        question = rec["conversations"][0]["value"]
        assert S.answer(scene, question) == rec["answer"], rec


def decode(img: Image.Image, grid: int) -> list[dict]:
    """Blobs read from the pixels alone: per non-empty cell its colour, kind, size, row and col."""
    a = np.asarray(img).astype(int)  # (H, W, 3)
    cell = a.shape[0] / grid
    palette = {tuple(v): k for k, v in S.COLORS.items()}
    blobs = []
    for r in range(grid):
        for c in range(grid):
            y0, x0 = round(r * cell), round(c * cell)
            block = a[y0:round((r + 1) * cell), x0:round((c + 1) * cell)]  # (h, w, 3)
            mask = (block != S.BACKGROUND).any(-1)  # (h, w)
            if not mask.any():
                continue
            colours = {tuple(p) for p in block[mask]}
            assert len(colours) == 1, f"cell {r},{c} mixes colours {colours}"
            ys, xs = np.nonzero(mask)
            h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
            assert ys.min() > 0 and xs.min() > 0 and ys.max() < mask.shape[0] - 1 and xs.max() < mask.shape[1] - 1
            fill = mask.sum() / (h * w)
            kind = "square" if fill > 0.97 else "circle" if fill > 0.7 else "triangle"
            blobs.append({"color": palette[colours.pop()], "kind": kind,
                          "size": "large" if w > 0.6 * cell else "small", "row": r, "col": c})
    return blobs


def pixel_answer(blobs: list[dict], question: str) -> str | None:
    """Colour, count and position answers computed from decoded blobs with the test's own parsing."""
    def select(words: str) -> list[dict]:
        ws = words.split()
        head = ws[-1].rstrip("s")
        return [b for b in blobs if (head == "object" or b["kind"] == head)
                and all(w in (b["color"], b["size"]) for w in ws[:-1])]

    if m := re.fullmatch(r"What color is the (.+)\?", question):
        (blob,) = select(m[1])
        return blob["color"]
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        return str(len(select(m[1])))
    if m := re.fullmatch(r"Where is the (.+) relative to the (.+)\?", question):
        (a,), (b,) = select(m[1]), select(m[2])
        if a["row"] == b["row"]:
            return "left" if a["col"] < b["col"] else "right"
        assert a["col"] == b["col"]
        return "above" if a["row"] < b["row"] else "below"
    return None


@pytest.mark.parametrize("image_size,grid", [(64, 3), (96, 3), (48, 3), (32, 2), (47, 3)])
def test_pixels_show_the_scene(image_size, grid):
    if image_size // grid < S.MIN_CELL:
        with pytest.raises(ValueError, match="expected >= 48"):
            S.ShapesConfig(image_size=image_size, grid=grid)
        return
    config = S.ShapesConfig(image_size=image_size, grid=grid)
    for _, scene, _ in S.generate(150, seed=1, split="train", config=config):
        blobs = decode(S.render(scene, image_size), grid)
        got = S.Scene(tuple(S.Shape(**b) for b in blobs), grid)
        assert got == scene, f"{image_size}px grid {grid}: drawn {scene.key()} read {got.key()}"


def test_colour_count_position_answers_from_pixels():
    config = S.ShapesConfig(qtypes=("color", "count", "position"), questions_per_image=3)
    checked = Counter()
    for _, scene, samples in S.generate(150, seed=2, split="train", config=config):
        blobs = decode(S.render(scene, config.image_size), config.grid)
        for s in samples:
            assert pixel_answer(blobs, s.question) == s.answer, (s.question, s.answer, blobs)
            checked[s.qtype] += 1
    assert checked == {"color": 150, "count": 150, "position": 150}


# ----------------------------------------------------------------------------- questions

def test_referred_shapes_are_unique(samples):
    for s in samples:
        q = S.parse(s.question)
        if q.qtype in ("color", "shape", "position"):
            for ref in (q.a, q.b) if q.qtype == "position" else (q.a,):
                assert sum(ref.matches(x) for x in s.scene.shapes) == 1, s


def test_ask_returns_none_when_nothing_is_unique():
    twins = S.Scene((S.Shape("circle", "red", "small", 0, 0), S.Shape("circle", "red", "small", 1, 1)))
    rng = random.Random(0)
    assert S.ask(twins, "color", rng) is None and S.ask(twins, "shape", rng) is None
    assert S.ask(twins, "position", rng) is None  # unreferable, and also diagonal
    assert S.ask(twins, "count", rng) is not None and S.ask(twins, "describe", rng) is not None
    assert S.answer(twins, "What color is the circle?") is None


def test_every_qtype_and_answer_appears_and_yes_no_is_balanced(samples):
    qtypes = Counter(s.qtype for s in samples)
    assert set(qtypes) == set(S.QTYPES) and min(qtypes.values()) > 60
    exist = Counter(s.answer for s in samples if s.qtype == "exist")
    assert 0.38 < exist["yes"] / sum(exist.values()) < 0.62, exist
    for qtype in ("color", "shape", "position"):
        assert {s.answer for s in samples if s.qtype == qtype} == set(S.ANSWERS[qtype]), qtype
    counts = Counter(s.answer for s in samples if s.qtype == "count")
    assert counts["0"] > 0 and counts["1"] > 0 and counts["2"] > 0


def test_describe_lists_every_shape_in_reading_order():
    scene = S.Scene((S.Shape("square", "blue", "small", 1, 1), S.Shape("circle", "red", "large", 0, 0)))
    assert S.describe(scene) == "A large red circle at the top left, a small blue square in the center."
    assert [S.cell_phrase(r, c) for r in range(3) for c in range(3)] == [
        "at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
        "at the bottom left", "at the bottom", "at the bottom right"]


def test_questions_per_image_share_the_image_and_split(tmp_path):
    recs = S.load_samples(S.write_dataset(tmp_path, 30, seed=0, split="test", questions_per_image=4))
    assert len(recs) == 120 and len({r["id"] for r in recs}) == 120
    by_image = {}
    for r in recs:
        by_image.setdefault(r["image"], []).append(r)
    assert len(by_image) == 30
    for image, rs in by_image.items():
        assert image.startswith("images/test-") and len({r["qtype"] for r in rs}) == 4
        assert all(S.scene_split(S.Scene.from_json(r["scene"])) == "test" for r in rs)


def test_bad_config_says_what_was_expected():
    with pytest.raises(ValueError, match="grid must be 2 or 3"):
        S.ShapesConfig(grid=4)
    with pytest.raises(ValueError, match="max_shapes"):
        S.ShapesConfig(max_shapes=10)
    with pytest.raises(ValueError, match="questions_per_image"):
        S.ShapesConfig(questions_per_image=7)
    with pytest.raises(ValueError, match="qtypes"):
        S.ShapesConfig(qtypes=("colour",))
    with pytest.raises(ValueError, match="split"):
        next(S.generate(1, 0, split="dev"))


# ----------------------------------------------------------------------------- splits

def test_splits_share_no_image_and_no_scene(tmp_path):
    paths = S.make_splits(tmp_path, n_train=300, n_test=100, seed=0, n_val=50)
    recs = {split: S.load_samples(p) for split, p in paths.items()}
    assert sorted(paths) == ["test", "train", "val"] and len(recs["train"]) == 300
    images = {split: {r["image"] for r in rs} for split, rs in recs.items()}
    scenes = {split: {S.Scene.from_json(r["scene"]).key() for r in rs} for split, rs in recs.items()}
    for x, y in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not images[x] & images[y] and not scenes[x] & scenes[y]
    assert len(list((tmp_path / "images").iterdir())) == 450


def test_held_out_scenes_never_occur_in_train_whatever_the_seed():
    test = {scene.key() for _, scene, _ in S.generate(500, seed=0, split="test")}
    for seed in (0, 1, 2):
        train = {scene.key() for _, scene, _ in S.generate(2000, seed=seed, split="train")}
        assert not train & test
    # without the partition, small scenes would collide: the space of one-shape scenes is 9 * 24 = 216
    assert sum(1 for key in test if key.count(";") == 0) > 10


# ----------------------------------------------------------------------------- vocabulary

def test_vocabulary_is_closed(tmp_path):
    config = S.ShapesConfig(questions_per_image=6, max_shapes=9)
    texts = [t for _, _, ss in S.generate(300, seed=9, config=config) for s in ss for t in (s.question, s.answer)]
    for text in texts:
        assert re.fullmatch(r"[A-Za-z0-9 ?.,]+", text), text
        assert set(S.tokenize(text)) <= set(S.VOCAB), set(S.tokenize(text)) - set(S.VOCAB)
    used = {t for text in texts for t in S.tokenize(text)}
    assert used == set(S.VOCAB), set(S.VOCAB) - used  # no dead words either
    assert all(w == w.lower() and w.isalnum() for w in S.WORDS)


def test_short_answers_are_listed(samples):
    for s in samples:
        if s.qtype != "describe":
            assert s.answer in S.ANSWERS[s.qtype]


# ----------------------------------------------------------------------------- scoring

def test_accuracy_per_qtype():
    ref = "A large red circle at the top left, a small blue square in the center."
    samples = [
        {"id": "a", "qtype": "color", "answer": "red"},
        {"id": "b", "qtype": "color", "answer": "blue"},
        {"id": "c", "qtype": "exist", "answer": "yes"},
        {"id": "d", "qtype": "count", "answer": "0"},
        {"id": "e", "qtype": "describe", "answer": ref},
        {"id": "f", "qtype": "describe", "answer": ref},
    ]
    predictions = {"a": " Red.", "b": "green", "c": "Yes", "e": ref.lower().rstrip("."),
                   "f": "A large red circle at the top left."}
    got = S.accuracy(predictions, samples)
    assert got["per_qtype"] == {"color": 0.5, "count": 0.0, "describe": 0.5, "exist": 1.0}
    assert got["n_per_qtype"] == {"color": 2, "count": 1, "describe": 2, "exist": 1}
    assert got["overall"] == pytest.approx(3 / 6) and got["n"] == 6 and got["missing"] == 1
    # f: its 8 words are all in the 15-word reference -> P = 1, R = 8/15, F1 = 16/23
    assert got["describe_f1"] == pytest.approx((1 + 16 / 23) / 2)


def test_accuracy_of_the_answers_themselves_is_one(samples):
    got = S.accuracy({s.id: s.answer for s in samples}, samples)
    assert got["overall"] == 1.0 and got["describe_f1"] == 1.0 and got["missing"] == 0
