"""Evaluation: the same path for teacher and student — benchmark reader -> prompts -> engine -> official scorer.

Answers go to a LLaVA-convention answer file as they are produced, so an interrupted run resumes
where it stopped (answered ids are skipped); scoring reads that file, so saved answers can be scored
without a model, and so can the answer files LLaVA's evaluation scripts write (results.match_answers).
A question without an answer is an error unless allowed; the record counts them either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MatvlmError
from .benchmarks import get_benchmark, load_images, results_json, write_predictions
from .benchmarks.results import match_answers, missing_answers_error, read_answer_rows


def default_predictions_path(output: Path | None, benchmark: str) -> Path:
    if output is not None:
        return output.with_name(f"{output.stem}.{benchmark}.answers.jsonl")
    return Path(f"{benchmark}.answers.jsonl")


def evaluate(benchmark: str, data: Path, model=None, processor=None, predictions: Path | None = None,
             limit: int | None = None, batch_size: int = 16, template: str | None = None, engine=None,
             progress=None, samples: list | None = None, allow_missing: bool = False,
             options: dict | None = None) -> dict:
    """Answer (if a model or engine is given) and score one benchmark; returns its results record.

    Args:
        benchmark: registry name (mme, pope, sqa-img, textvqa, gqa, vqav2, mmbench, mmmu, mmvet, shapes).
        data: the benchmark's data directory.
        model, processor: a loaded model and its processor; or `engine`, an Engine built on them.
        predictions: answer file (read to resume, appended to); required when scoring without a model.
        limit: at most this many questions.
        batch_size: questions per engine batch.
        template: force a matvlm chat template instead of the model's own.
        progress: callable(done, total) for progress reporting.
        samples: the benchmark's samples if already read (`load_samples`); read from `data` otherwise.
        allow_missing: score questions without an answer as unanswered instead of raising (their
            count is the record's "missing_answers" either way). No answer at all always raises.
        options: benchmark options (get_benchmark), e.g. {"judge": ...} for mmvet.
    """
    from ..engine.engine import Engine, Request
    from ..inputs.prompts import render, stop_strings
    from ..engine.sampling import SamplingParams

    bench = get_benchmark(benchmark, **(options or {}))
    samples = samples if samples is not None else load_samples(benchmark, data, limit)
    if predictions is None:
        raise MatvlmError("an answer file path is needed (--predictions)")
    done, _ = match_answers(samples, read_answer_rows(predictions, missing_ok=True))
    todo = [s for s in samples if s.id not in done]
    if todo and engine is None and model is None:
        if not Path(predictions).is_file():
            raise MatvlmError(f"no model given and no answer file {predictions}: nothing to score")
    elif todo:
        engine = engine or Engine(model, processor)
        stops = stop_strings(engine.processor, engine.model.config, template)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            reqs = []
            for s in chunk:
                images = load_images(s) if engine.vlm else []
                images = images if _multi_image(engine) else images[:1]
                text = render(engine.processor, engine.model.config, [{"role": "user", "content": s.prompt}],
                              len(images), template)
                reqs.append(Request(text, images, SamplingParams(max_new_tokens=s.max_new_tokens, stop=stops)))
            outs = engine.generate(reqs)
            write_predictions(predictions, {s.id: o.text.strip() for s, o in zip(chunk, outs)})
            if progress:
                progress(min(i + batch_size, len(todo)), len(todo))
    rows = read_answer_rows(predictions, missing_ok=True)
    answers, unmatched = match_answers(samples, rows)
    error = missing_answers_error(bench.name, samples, answers, rows, predictions, allow_missing)
    if error is not None:
        raise error
    record = results_json(bench.name, len(samples), bench.score(samples, answers))
    record.update(missing_answers=len(samples) - len(answers), answers_not_matched=len(unmatched))
    return record


def load_samples(benchmark: str, data: Path, limit: int | None = None) -> list:
    """A benchmark's samples from its data directory (an unknown name or a wrong layout raise)."""
    return get_benchmark(benchmark).load(Path(data), limit)


def _multi_image(engine) -> bool:
    """Whether prompts may carry several images (the processor's chat template renders them); matvlm's
    templates place one image, so others use the first (as MMMU's LLaVA runner does)."""
    from ..inputs.prompts import has_chat_template

    return has_chat_template(engine.processor)


def write_results(path: Path, records: list[dict]) -> None:
    """Results JSON: one record, or a list for several benchmarks (written atomically)."""
    from ..model.io import atomic_write_text

    atomic_write_text(path, json.dumps(records[0] if len(records) == 1 else records, indent=1) + "\n")


def read_results(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MatvlmError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise MatvlmError(f"results file {path} is not valid JSON: {e}") from None
    records = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) and "benchmark" in r and "metrics" in r for r in records):
        raise MatvlmError(f"{path} is not a matvlm results file (expected {{benchmark, n, metrics}} records)")
    return records
