"""A load generator for an OpenAI-compatible chat server (`matvlm bench-serve`, issue 20).

A workload is a list of requests with arrival times: Poisson arrivals at `rate` requests/s, prompt
lengths drawn uniformly from a range, answer lengths drawn from a range either uniformly or log-uniformly
(a long tail: most answers short, a few long, as chat traffic has), and a fraction of the requests with
an image. Every request streams (`stream: true`, usage included) with `ignore_eos`, so its answer has
exactly the asked length and schedulers are compared on the same work. Per request the client
records when it was sent, when each content chunk arrived and how many tokens the server counted.

Summaries (per scheduler): output tokens/s over the run (first send to last answer), requests/s,
time to first token, inter-token latency (the gaps between content chunks of one stream) and
end-to-end latency at p50 / p95 / p99, and the count of failed requests. Nothing here starts a
server or prints: the CLI does (`commands.bench_serve`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORDS = ("the a of and to in is that it was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find any new work part take get place made live where after back "
         "little only round man year came show every good me give our under name very through just form").split()


@dataclass
class LoadRequest:
    """One request of a workload: when it is sent (seconds after the start), its prompt, its answer length."""

    at: float
    prompt: str
    max_tokens: int
    image: str | None = None          # a data: URL


@dataclass
class Result:
    """What the client saw of one request (times in seconds after the run's start)."""

    sent: float
    max_tokens: int
    chunks: list[float] = field(default_factory=list)     # arrival time of each content chunk
    done: float | None = None
    completion_tokens: int = 0
    error: str | None = None


def _png(seed: int, size: int = 64) -> str:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(4, size // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


ANSWER_LENGTHS = ("uniform", "log-uniform")


def _answer_length(rng: random.Random, lo: int, hi: int, dist: str) -> int:
    if dist == "uniform":
        return rng.randint(lo, hi)
    # log-uniform: log(length) uniform over [log lo, log(hi + 1)), so each doubling of length is equally likely
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def make_workload(n: int, rate: float, prompt_words: tuple[int, int], max_tokens: tuple[int, int],
                  image_fraction: float = 0.0, seed: int = 0, answer_lengths: str = "uniform") -> list[LoadRequest]:
    """`n` requests with Poisson arrivals at `rate` per second (rate <= 0: all at once), prompts of
    prompt_words[0]..[1] words, answers of max_tokens[0]..[1] tokens (drawn `answer_lengths`: uniform or
    log-uniform), images on `image_fraction` of them."""
    if answer_lengths not in ANSWER_LENGTHS:
        raise ValueError(f"answer lengths are drawn {' or '.join(ANSWER_LENGTHS)}; got {answer_lengths!r}")
    if n < 1:
        raise ValueError(f"a workload needs at least one request; got {n}")
    for name, (lo, hi) in (("prompt words", prompt_words), ("max tokens", max_tokens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be a range 1 <= low <= high; got {lo}..{hi}")
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"the image fraction must be in [0, 1]; got {image_fraction}")
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words)))
        image = _png(seed * 100003 + i) if rng.random() < image_fraction else None
        out.append(LoadRequest(t, f"Continue this text: {words}", _answer_length(rng, *max_tokens, answer_lengths),
                               image))
        if rate > 0:
            t += rng.expovariate(rate)
    return out


async def _one(client, url: str, model: str, req: LoadRequest, start: float, headers: dict) -> Result:
    await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
    res = Result(sent=time.perf_counter() - start, max_tokens=req.max_tokens)
    content = [{"type": "text", "text": req.prompt}]
    if req.image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": req.image}})
    body = {"model": model, "messages": [{"role": "user", "content": content if req.image else req.prompt}],
            "max_tokens": req.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"].get("message", event["error"]))[:200]
                    return res
                if event.get("usage"):
                    res.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        res.chunks.append(time.perf_counter() - start)
        res.done = time.perf_counter() - start
    except Exception as e:                                  # noqa: BLE001 - counted as a failed request
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def _run(url: str, model: str, workload: list[LoadRequest], api_key: str | None, timeout: float):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*[_one(client, url, model, r, start, headers) for r in workload])


def run_load(url: str, model: str, workload: list[LoadRequest], api_key: str | None = None,
             timeout: float = 600.0) -> list[Result]:
    """Send `workload` to the server at `url` (its /v1 base) and return what was seen of each request."""
    return asyncio.run(_run(url.rstrip("/"), model, workload, api_key, timeout))


def step_bound(workload: list[LoadRequest], max_batch: int) -> dict:
    """How much continuous batching can gain on a workload sent all at once, from its answer lengths alone:
    static batching runs batches of `max_batch` requests, in arrival order, each to its longest answer;
    continuous batching needs at least the total answer tokens over `max_batch` slots, and the longest
    answer. The ratio bounds continuous over static decode throughput at that many slots."""
    lengths = [r.max_tokens for r in workload]
    static = sum(max(lengths[i:i + max_batch]) for i in range(0, len(lengths), max_batch))
    continuous = max(math.ceil(sum(lengths) / max_batch), max(lengths))
    return {"static_decode_steps": static, "continuous_min_decode_steps": continuous,
            "continuous_over_static_at_most": static / continuous}


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    v = sorted(values)

    def q(p):   # nearest rank: the smallest value with at least p % of the values at or below it
        return v[min(len(v), max(1, math.ceil(p / 100 * len(v)))) - 1]
    return {"p50": q(50), "p95": q(95), "p99": q(99), "mean": sum(v) / len(v)}


def summarize(results: list[Result]) -> dict:
    """Throughput and latency percentiles of one run (failed requests counted, not timed)."""
    ok = [r for r in results if r.error is None and r.done is not None]
    ttft = [r.chunks[0] - r.sent for r in ok if r.chunks]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    e2e = [r.done - r.sent for r in ok]
    span = (max(r.done for r in ok) - min(r.sent for r in results)) if ok else 0.0
    tokens = sum(r.completion_tokens for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if r.error})[:5],
            "short_answers": sum(r.completion_tokens != r.max_tokens for r in ok),
            "output_tokens": tokens, "duration_s": span,
            "output_tokens_per_s": tokens / span if span > 0 else None,
            "requests_per_s": len(ok) / span if span > 0 else None,
            "ttft_s": _pcts(ttft), "itl_s": _pcts(itl), "e2e_s": _pcts(e2e)}


def table(summaries: dict[str, dict]) -> str:
    """A side-by-side text table of the schedulers' summaries."""
    names = list(summaries)
    rows = [("output tokens/s", lambda s: s["output_tokens_per_s"], "{:.1f}"),
            ("requests/s", lambda s: s["requests_per_s"], "{:.2f}"),
            ("failed", lambda s: s["failed"], "{}")]
    for metric, label in (("ttft_s", "TTFT"), ("itl_s", "inter-token"), ("e2e_s", "end-to-end")):
        for p in ("p50", "p95", "p99"):
            rows.append((f"{label} {p} (ms)", lambda s, m=metric, p=p: None if s[m][p] is None else 1e3 * s[m][p],
                         "{:.1f}"))
    lines = [f"{'':22s}" + "".join(f"{n:>14s}" for n in names)]
    for label, get, fmt in rows:
        cells = [get(summaries[n]) for n in names]
        lines.append(f"{label:22s}" + "".join(f"{'-' if c is None else fmt.format(c):>14s}" for c in cells))
    return "\n".join(lines)


def plot(runs: dict[str, list[Result]], path: Path) -> Path:
    """TTFT and inter-token latency CDFs, and tokens generated over time, per scheduler, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, results in runs.items():
        ok = [r for r in results if r.error is None and r.done is not None]
        for ax, values in ((axes[0], [r.chunks[0] - r.sent for r in ok if r.chunks]),
                           (axes[1], [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])])):
            v = sorted(1e3 * x for x in values)
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=name)
        times = sorted(t for r in ok for t in r.chunks)
        axes[2].plot(times, range(1, len(times) + 1), label=name)
    for ax, title, xlabel in ((axes[0], "time to first token", "ms"), (axes[1], "inter-token latency", "ms"),
                              (axes[2], "content chunks received", "s since start")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("fraction of requests")
    axes[1].set_xscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def results_json(workload: list[LoadRequest], runs: dict[str, list[Result]], summaries: dict, meta: dict) -> str:
    return json.dumps({**meta, "workload": [{k: v for k, v in asdict(r).items() if k != "image"} |
                                            {"image": r.image is not None} for r in workload],
                       "summaries": summaries,
                       "requests": {name: [asdict(r) for r in res] for name, res in runs.items()}}, indent=1)
