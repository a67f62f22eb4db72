"""Benchmark readers, prompts and official scorers of the MaTVLM evaluation (paper Table 1).

    from matvlm.eval.benchmarks import get_benchmark, read_predictions, results_json
    bench = get_benchmark("pope")
    samples = bench.load(Path("data/pope"), limit=300)        # list[Sample]
    metrics = bench.score(samples, read_predictions("answers/pope.jsonl"))
    record = results_json(bench.name, len(samples), metrics)

One module per benchmark; each class is a dataclass whose fields are its options
(``get_benchmark("textvqa", ocr=False)``). Model code never lives here: a Sample's prompt has
no chat template and no image placeholder, and the engine turns it into model input.
"""

from __future__ import annotations

import dataclasses

from matvlm.errors import MatvlmError

from .base import Benchmark, ImageBytes, ImageFile, Sample, load_images
from .gqa import GQA
from .mmbench import MMBench
from .mme import MME
from .mmmu import MMMU
from .mmvet import MMVet, containment_judge
from .pope import POPE
from .results import (PAPER_COLUMNS, compare_table, headline, paper_average, read_predictions,
                      results_json, write_predictions)
from .shapes import Shapes
from .sqa import ScienceQAImg
from .textvqa import TextVQA
from .vqav2 import VQAv2

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in (MME(), POPE(), ScienceQAImg(), TextVQA(), GQA(), VQAv2(), MMBench(), MMMU(), MMVet(),
                        Shapes())
}


def get_benchmark(name: str, **options) -> Benchmark:
    """The benchmark registered as ``name``; with options, a new instance configured by them."""
    if name not in BENCHMARKS:
        raise MatvlmError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if not options:
        return bench
    valid = [f.name for f in dataclasses.fields(bench)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MatvlmError(f"benchmark {name!r} has no option {', '.join(unknown)}; options: {', '.join(valid)}")
    return dataclasses.replace(bench, **options)


__all__ = [
    "BENCHMARKS", "Benchmark", "GQA", "ImageBytes", "ImageFile", "MMBench", "MME", "MMMU", "MMVet",
    "PAPER_COLUMNS", "POPE", "Sample", "ScienceQAImg", "Shapes", "TextVQA", "VQAv2", "compare_table",
    "containment_judge", "get_benchmark", "headline", "load_images", "paper_average",
    "read_predictions", "results_json", "write_predictions",
]
