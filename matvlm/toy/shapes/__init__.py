"""Shapes-VQA: a procedural, deterministic visual question answering data set.

The project's embedded default: small images (64x64 RGB by default) of 1-4 coloured shapes on a
3x3 grid, closed-vocabulary questions with short answers that the scene decides uniquely, written
in LLaVA / ShareGPT4V JSON so the real training and evaluation code reads it unchanged.

    from matvlm.toy.shapes import make_splits, accuracy
    make_splits("runs/shapes", n_train=20_000, n_test=1_000, seed=0)
    # runs/shapes/{train,test}.json + runs/shapes/images/{train,test}-000000.png ...

A scene is a set of `Shape`s, each in its own grid cell. Questions are built from referring
expressions (`Ref`: optional size, colour, kind) and asked only when their answer is unique:

    qtype     question                                           answers
    color     What color is the [size] {kind}?                   red | green | blue | yellow
    shape     What shape is the [size] {color} object?           circle | square | triangle
    count     How many {kinds | color objects | objects} are there?   0 .. 9
    exist     Is there a {color} {kind}?                         yes | no (balanced)
    position  Where is the {ref A} relative to the {ref B}?      left | right | above | below
    describe  Describe the image.                                one sentence, shapes in reading order

Position is defined on grid cells: A is `left` of B when both are in the same row and A's column
is smaller (`right`: larger); `above` / `below` when both are in the same column and A's row is
smaller / larger (row 0 is the top). Pairs in different rows and columns are never asked.

Held-out splits are a fixed partition of the *scene space*: a scene belongs to `test`, `val` or
`train` by a hash of its canonical description, so no scene of one split can ever occur in another,
whatever seeds or sizes the splits are generated with. Every image is a pure function of
(seed, split, index).

The package by job: `scene` (vocabulary, scenes, the split partition), `draw` (rendering), `questions`
(grammar, answers, parser, proposers), `dataset` (generation, LLaVA JSON writer and reader), `score`
(tokenising and accuracy).
"""

from .dataset import (
                    Sample,
                    ShapesConfig,
                    generate,
                    load_samples,
                    make_splits,
                    write_dataset,
)
from .draw import render, shape_box
from .questions import (
                    Question,
                    Ref,
                    answer,
                    ask,
                    cell_phrase,
                    describe,
                    parse,
                    propose,
                    relation,
)
from .scene import (
                    ANSWERS,
                    BACKGROUND,
                    COLORS,
                    HALF_EXTENT,
                    HELD_OUT,
                    IMAGE_TOKEN,
                    KINDS,
                    MAX_GRID,
                    MIN_CELL,
                    PUNCT,
                    QTYPES,
                    RELATIONS,
                    SIZES,
                    SPLITS,
                    VOCAB,
                    WORDS,
                    Scene,
                    Shape,
                    sample_scene,
                    scene_from_seed,
                    scene_split,
)
from .score import accuracy, normalize, token_f1, tokenize

__all__ = ["ANSWERS", "BACKGROUND", "COLORS", "HALF_EXTENT", "HELD_OUT", "IMAGE_TOKEN", "KINDS", "MAX_GRID", "MIN_CELL",
           "PUNCT", "QTYPES", "RELATIONS", "SIZES", "SPLITS", "VOCAB", "WORDS", "Question", "Ref", "Sample", "Scene",
           "Shape", "ShapesConfig", "accuracy", "answer", "ask", "cell_phrase", "describe", "generate", "load_samples",
           "make_splits", "normalize", "parse", "propose", "relation", "render", "sample_scene", "scene_from_seed",
           "scene_split", "shape_box", "token_f1", "tokenize", "write_dataset"]
