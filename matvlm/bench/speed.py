"""`matvlm bench`: decode and prefill speed and memory of a model and (with --vs) its teacher, in one run.

For every (context, batch, generated length) cell and every system:
  - matvlm engine (static cache, CUDA-graph decode) for the model and the teacher;
  - the teacher through transformers `generate` as users run it: the default dynamic cache, and
    `cache_implementation="static"` (transformers compiles that decode step);
it measures prefill time, time to first token, decode time per step (median), tokens/s and peak GPU
memory, and the step's HBM roofline: bytes the step must read (weights + KV of attention layers +
Mamba states, read and written) over the copy bandwidth measured in the same run. An out-of-memory
cell is recorded as such. Writes bench.json, a markdown table, and two plots in the style of the
paper's Fig. 1b/1c (tokens/s and memory against context length).

Models are directories, or `random:tinyllava-phi2` / `random:tinyllava-phi2@0.25` for random weights
at TinyLLaVA-3.1B's shapes (teacher / 25 % hybrid) without any files.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MatvlmError


def resolve(spec: str, dtype: torch.dtype):
    """A loaded model and its processor/tokenizer (None for random models) from a directory or random:NAME[@r]."""
    import matvlm

    if spec.startswith("random:"):
        from ..convert.init import hybridize
        from ..convert.layers import select_layers
        from .distill_step import tinyllava_config

        name, _, ratio = spec[len("random:"):].partition("@")
        if name != "tinyllava-phi2":
            raise MatvlmError(f"unknown random model {name!r}; available: tinyllava-phi2")
        from transformers import LlavaForConditionalGeneration
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlavaForConditionalGeneration(tinyllava_config())
        model.to(dtype).eval()
        layers = select_layers(32, float(ratio)) if ratio else []
        hybridize(model, layers)
        return model, None
    return matvlm.load(spec, dtype=dtype), matvlm.load_processor(spec)


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must move: every weight once, the KV of the attention layers up to `context`,
    and each Mamba layer's conv and SSM state read and written."""
    from ..model.hybrid import text_config

    weights = _lm_weight_bytes(model)
    tc = text_config(model.config)
    cfg = model.hybrid_config
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    elem = next(model.parameters()).element_size()
    kv_bytes = len(cfg.attn_layers) * 2 * batch * kv * hd * context * elem
    state = len(cfg.mamba_layers) * batch * (cfg.nheads * cfg.headdim * cfg.d_state * 4 + cfg.conv_dim * (cfg.d_conv - 1) * elem)
    return weights + kv_bytes + 2 * state


def roofline_ms(model, cell: "Cell", copy_gbps: float) -> float:
    """The cell's decode step at the copy bandwidth: `step_bytes` at the generation's midpoint."""
    return step_bytes(model, cell.batch, cell.context + cell.gen // 2) / (copy_gbps * 1e9) * 1e3


def _lm_weight_bytes(model) -> int:
    """Weights a decode step reads: everything but the vision tower and connector (the input embedding
    row lookup is ignored; the LM head is read in full)."""
    skip = ("vision_tower", "multi_modal_projector", "embed_tokens")
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not any(s in n for s in skip))


@dataclass
class Cell:
    context: int
    batch: int
    gen: int


def reference_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's own full forward (its layers, no cache, no decode kernels) over `prompt` + `tokens`: the
    float32 logits at the positions that chose each of `tokens`, (len(tokens), V). What decode paths are
    checked against."""
    device = model.get_output_embeddings().weight.device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens], device=device), use_cache=False).logits
    return logits[0, len(prompt) - 1: -1].float()


def _random_prompts(batch: int, context: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (batch, context), generator=g).tolist()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def engine_cell(engine, cell: Cell, vocab: int) -> dict:
    from ..engine.engine import Request
    from ..engine.sampling import SamplingParams

    prompts = _random_prompts(cell.batch, cell.context, vocab)
    params = SamplingParams(max_new_tokens=cell.gen, ignore_eos=True)
    engine._statics.clear()                  # no other bucket's buffers in this cell's peak memory
    _peak_reset()
    try:
        engine.generate([Request(p, [], params) for p in prompts])      # warm-up: allocates and captures the bucket
        _peak_reset()
        outs = engine.generate([Request(p, [], params) for p in prompts])
    except torch.OutOfMemoryError:
        engine._statics.clear()
        return {"oom": True}
    except MatvlmError as e:                  # e.g. prompt + generated tokens beyond the model's context
        return {"error": str(e)}
    t = outs[0].timings
    step = t["decode_s_per_step"]
    return {"prefill_ms": 1e3 * t["prefill_s"], "ttft_ms": 1e3 * t["ttft_s"], "step_ms": 1e3 * step,
            "tokens_per_s": cell.batch / step, "peak_GiB": _peak_gib(), "cache_GiB": t["cache_bytes"] / 2**30,
            "first_tokens": outs[0].token_ids[:16]}


def max_batch(engine, context: int, vocab: int, gen: int = 4) -> dict:
    """The largest number of `context`-token prompts the engine prefills and decodes `gen` tokens for in
    one batch without running out of memory (doubling, then bisection; up to its max_batch_size)."""
    from ..engine.engine import Request
    from ..engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    peaks = {}

    def fits(b: int) -> bool:
        _peak_reset()
        try:
            engine.generate([Request(p, [], params) for p in _random_prompts(b, context, vocab)])
            peaks[b] = _peak_gib()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            engine._statics.clear()
            _peak_reset()

    ok, b, limit = 0, 1, engine.max_batch_size
    try:
        while b <= limit and fits(b):
            ok, b = b, b * 2
        hi = min(b, limit + 1)
        while hi - ok > 1:
            mid = (ok + hi) // 2
            ok, hi = (mid, hi) if fits(mid) else (ok, mid)
    except MatvlmError as e:                  # e.g. the context is beyond the model's
        return {"error": str(e)}
    return {"max_batch": ok, "peak_GiB": peaks.get(ok), "capped": ok == limit}


def hf_cell(model, cell: Cell, vocab: int, static: bool) -> dict:
    """transformers generate: per-step time from generating `gen` tokens and 1 token. A static cell
    starts from a fresh cache length and leaves no compiled state behind (each shape compiles anew
    anyway), so cells measured in one process do not inherit each other's memory."""
    from ..engine.engine import check_fits

    try:
        check_fits(model, cell.context, cell.gen)
    except MatvlmError as e:                  # as the engine's cell records it
        return {"error": str(e)}
    ids = torch.tensor(_random_prompts(cell.batch, cell.context, vocab), device=model.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
        # generate sizes a static cache to the longest it has made for this model: start from this cell's
        model.__dict__.pop("_previous_max_cache_length", None)
    _peak_reset()
    try:
        def run(n):
            _sync()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
            _sync()
            return time.perf_counter() - t0

        run(cell.gen if static else 2)                          # warm-up (static: compiles)
        _peak_reset()
        one, full = run(1), run(cell.gen)
        step = (full - one) / (cell.gen - 1)
        return {"prefill_ms": 1e3 * one, "step_ms": 1e3 * step, "tokens_per_s": cell.batch / step,
                "peak_GiB": _peak_gib()}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        if static:      # the compiled step's CUDA-graph memory pools outlive generate: free them for the next cell
            torch._dynamo.reset()
            _peak_reset()


def hf_variants(cell: Cell, device: str, static_contexts: list[int] | None, static_batches: list[int]) -> list[bool]:
    """Which transformers generate runs a cell gets: the dynamic cache always (False), the static cache
    compiled (True) on CUDA for the chosen contexts (None: all) and batch sizes; each static shape
    compiles for about a minute."""
    static = device == "cuda" and cell.batch in static_batches and (
        static_contexts is None or cell.context in static_contexts)
    return [False, True] if static else [False]


def run(model: str, vs: str | None, contexts: list[int], batches: list[int], gens: list[int], out: Path,
        hf: bool = True, hf_static_contexts: list[int] | None = None, dtype: str = "bfloat16",
        device: str | None = None, compile: list[bool] = (False,), max_batch_contexts: list[int] = (),
        fuse: list[bool | None] = (None,), hf_static_batches: list[int] = (1,), on_row=None,
        pdl: list[bool | None] = (None,)) -> dict:
    """Measure every cell for the model and the teacher (`on_row(row)` sees each row as it is measured);
    `hf_static_contexts` and `hf_static_batches`
    limit the (slow to compile) static+compiled transformers runs to those contexts (None: all) and batch
    sizes; `compile` and `fuse` list the engine variants (decode step eager-captured and/or compiled;
    the model's own layers and/or the fused step, None: the engine's default) each system is measured
    with; `pdl` lists programmatic dependent launch settings of the decode kernels (None: MATVLM_PDL),
    each cell measured under each in turn; for each context in `max_batch_contexts` the largest batch
    that fits is searched (engine, first variant)."""
    from ..engine.engine import Engine
    from ..ops.backend import dependent_launch, set_dependent_launch
    from .kernels import ceilings

    emit = on_row or (lambda row: None)
    if any(g < 2 for g in gens):
        raise MatvlmError(f"generated lengths must be at least 2 (one decode step or more), got {list(gens)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    copy_gbps = ceilings()["copy_GBps"] if device == "cuda" else None
    cells = [Cell(c, b, g) for c in contexts for b in batches for g in gens]
    systems = [("model", model)] + ([("teacher", vs)] if vs else [])
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "copy_GBps": copy_gbps,
           "model": model, "teacher": vs, "rows": []}
    for role, spec in systems:
        m, proc = resolve(spec, torch_dtype)
        vocab = m.get_output_embeddings().out_features
        tok = getattr(proc, "tokenizer", proc) if proc is not None else _NullTokenizer()
        variants = [(f, c) for f in fuse for c in compile]
        for fu, comp in variants:
            engine = Engine(m, proc or tok, device=device, dtype=torch_dtype, compile=comp, fuse=fu)
            for cell in cells:
                roof = roofline_ms(m, cell, copy_gbps) if copy_gbps else None
                for launch in pdl:
                    before = set_dependent_launch(launch)
                    try:
                        r = engine_cell(engine, cell, vocab)
                        r["pdl"] = dependent_launch(m.get_output_embeddings().weight)    # as the step ran
                    finally:
                        set_dependent_launch(before)
                    if "step_ms" in r and roof:
                        r.update(roofline_ms=roof, of_roofline=roof / r["step_ms"])
                    name = engine_name(role, engine) + {None: "", False: " PDL off", True: " PDL on"}[launch]
                    res["rows"].append({"system": name, **cell.__dict__, **r})
                    emit(res["rows"][-1])
            if (fu, comp) == variants[0]:
                for context in max_batch_contexts:
                    r = max_batch(engine, context, vocab)
                    res["rows"].append({"system": engine_name(role, engine), "context": context, "kind": "max_batch", **r})
                    emit(res["rows"][-1])
            del engine
            _peak_reset()
        if role == "teacher" and hf:
            for cell in cells:
                for static in hf_variants(cell, device, hf_static_contexts, hf_static_batches):
                    r = hf_cell(m, cell, vocab, static)
                    name = "teacher (transformers generate, " + ("static+compiled)" if static else "dynamic cache)")
                    res["rows"].append({"system": name, **cell.__dict__, **r})
                    emit(res["rows"][-1])
        del m
        _peak_reset()
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(table(res))
    plot(res, out)
    return res


def engine_name(role: str, engine) -> str:
    return f"{role} (matvlm engine{', fused' if engine.fused is not None else ''}{', compiled' if engine.compiled else ''})"


class _NullTokenizer:
    """For random models: prompts are token ids, and outputs are not decoded into text."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def table(res: dict) -> str:
    lines = ["| system | context | batch | gen | prefill ms | step ms | tokens/s | peak GiB | roofline ms | % of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fits = [r for r in res["rows"] if r.get("kind") == "max_batch"]
    for r in res["rows"]:
        if r.get("kind") == "max_batch":
            continue
        if r.get("oom") or r.get("error"):
            what = "OOM" if r.get("oom") else r["error"]
            lines.append(f"| {r['system']} | {r['context']} | {r['batch']} | {r['gen']} | {what} | | | | | |")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")
        lines.append(f"| {r['system']} | {r['context']} | {r['batch']} | {r['gen']} | {f('prefill_ms', '{:.1f}')} | "
                     f"{f('step_ms', '{:.2f}')} | {f('tokens_per_s', '{:.1f}')} | {f('peak_GiB', '{:.1f}')} | "
                     f"{f('roofline_ms', '{:.2f}')} | {f('of_roofline', '{:.0%}')} |")
    if fits:
        lines += ["", "| system | context | largest batch that fits | its peak GiB |", "|---|---|---|---|"]
        for r in fits:
            if r.get("error"):
                lines.append(f"| {r['system']} | {r['context']} | {r['error']} | |")
                continue
            peak = f"{r['peak_GiB']:.1f}" if r.get("peak_GiB") is not None else ""
            lines.append(f"| {r['system']} | {r['context']} | {r['max_batch']}{'+' if r['capped'] else ''} | {peak} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    """tokens/s and peak memory against context length, one line per system and batch (paper Fig. 1b/1c)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, name, label in (("tokens_per_s", "tokens_per_s.png", "generated tokens / s"),
                             ("peak_GiB", "memory.png", "peak GPU memory (GiB)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        series = {}
        for r in res["rows"]:
            if r.get(key) is None or r.get("kind") == "max_batch":
                continue
            series.setdefault((r["system"], r["batch"]), []).append((r["context"], r[key]))
        for (system, batch), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{system}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / name, dpi=130)
        plt.close(fig)
