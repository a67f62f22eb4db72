"""Continuous batching: iteration-level scheduling over a pool of fixed-size per-request slots.

Every iteration of `ContinuousBatcher.step`:

1. drops cancelled requests (their slot is free at once);
2. starts waiting requests, first come first served, while a slot is free, with at most
   `prefill_tokens` prompt tokens per iteration so that running streams get a decode step between two
   prefills (with no stream running, up to a slot's length). Requests whose prompts fit the budget
   together are prefilled in one forward, left-padded as a static batch is (`Engine.prefill_into`), which
   pays the forward's fixed cost (its kernel launches) once for all of them; a longer one is prefilled
   alone, in chunks, in a staging row of the pool;
   With `overlap`, prefills run instead on a thread of their own (on CUDA, on a stream of their own),
   a group at a time, up to a slot's length of tokens, while this thread goes on with decode steps: a
   running stream no longer waits for a newcomer's prefill, whose host work (a forward's kernel launches
   from Python) is most of an admission's cost;
3. a request whose prefill is done draws its first token and moves into its slot (its KV rows and Mamba
   state are copied from the staging row or the group's cache);
4. one decode step runs every slot below the highest busy one (a bucket of `_bucket` sizes, so one
   fixed-shape step per bucket can be captured as a CUDA graph); each request's token is sampled,
   checked for stops and handed to its sink; finished requests leave their slot. When every running
   request is greedy, the step feeds its argmax forward on the device and the host takes its tokens
   while the next step runs (one step ahead; a finished request's row computes one spare step).

Per-slot state is fixed size: for attention layers KV rows (slots, kv_heads, length, head_dim) written
at each slot's own position, for Mamba layers conv (slots, conv_dim, d_conv-1) and SSM
(slots, H, P, N) states. Slots are independent rows of every tensor, so what one request holds or
does never changes another's numbers: a greedy answer is the same alone or batched (up to float
summation order), and a request whose image, prompt or prefill fails gets its own error.
Sampling is the engine's (`sample_batch`: a request's draws depend on its seed and step alone).
The decode step is the engine's fused step (`FusedDecoder`, on CUDA by default) with a cache position
per slot, or the model's own layers (`Engine._forward`) where the engine has no fused step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..errors import MatvlmError
from ..model.hybrid import attention_shape
from ..model.vlm import embed, vision_features
from ..ops.attention import sdpa_without_cudnn
from .answer import Answer
from .cache import SlotKVLayer, StaticHybridCache, StaticMambaState
from .engine import (Engine, Output, Request, _all_greedy, _bucket, _causal_lower_right, _TokenReader, context_limit,
                     warm_up_on_side_stream)
from .sampling import sample_batch

log = logging.getLogger("matvlm.engine")


POOL_MEMORY_FRACTION = 0.85      # of the memory free after loading the model, what the slot pool may take
# the warm-up captures the decode step at every (slot bucket, length bucket), a capture mid-serving stopping every
# stream, unless that is more than this many graphs (16 slots x a 4K slot: 8 x 5)
WARM_UP_CAPTURES = 64


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: Linux's MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def slot_bytes_per_token(engine: Engine) -> int:
    """KV bytes one slot holds per token: keys and values of every attention layer (Mamba layers hold a
    fixed-size state, whatever the length)."""
    cfg = engine.model.hybrid_config
    _, kv, head_dim = attention_shape(engine.model.config)
    n_attn = cfg.n_layer - len(cfg.mamba_layers)
    return 2 * n_attn * kv * head_dim * torch.empty((), dtype=engine.dtype).element_size()


def slot_length(engine: Engine, slots: int, length: int | None = None,
                fraction: float = POOL_MEMORY_FRACTION) -> int:
    """How many tokens (prompt + answer) each of `slots` slots holds: `length` if given, else the model's
    context, capped to what fits in `fraction` of the free memory (`slots` + 1 rows: one stages prefills,
    or, with overlapped prefills, stands for a group's own cache, which holds at most a row's tokens). A given
    `length` that does not fit is an error, not a crash mid-serving."""
    limit = context_limit(engine.model) or 4096
    want = min(length, limit) if length else limit
    per_token = slot_bytes_per_token(engine) * (slots + 1)
    free = free_memory(engine.device)
    if free is None or per_token == 0:
        return want
    fit = int(free * fraction) // per_token
    gib = 1 << 30
    if length is not None and want > fit:
        raise MatvlmError(f"--max-len {want} for {slots} slots needs {want * per_token / gib:.1f} GiB of KV cache "
                          f"but {free / gib:.1f} GiB is free ({fraction:.0%} of it usable): lower --max-len or "
                          f"--max-batch")
    if want > fit:
        fit = fit // 256 * 256
        if fit < min(want, 256):
            raise MatvlmError(f"{slots} slots do not fit in memory: even 256 tokens a slot need "
                              f"{256 * per_token / gib:.2f} GiB of KV cache, {free / gib:.1f} GiB is free: "
                              f"lower --max-batch")
        log.warning("slots hold %d tokens each (the model's context is %d): that is what %d slots' KV cache "
                    "fits in %.0f %% of the %.1f GiB free; --max-len and --max-batch change it",
                    fit, limit, slots, fraction * 100, free / gib)
        return fit
    return want


def _length_bucket(n: int, limit: int, smallest: int = 256) -> int:
    """The smallest power of two >= n (at least `smallest`), at most `limit`."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, limit)


class SlotPool:
    """The hybrid state of `slots` requests of up to `length` tokens each, plus, with `staging`, one staging row
    (index `slots`) that chunked prefills write into; and the decode step's inputs and outputs per row.
    (Overlapped prefills write into a cache of their own instead, of at most one row's tokens; while one group's
    cache is read into the slots, the next group's may already exist.)"""

    def __init__(self, engine: Engine, slots: int, length: int, staging: bool = True):
        model, dev, dtype = engine.model, engine.device, engine.dtype
        cfg = model.hybrid_config
        _, kv, head_dim = attention_shape(model.config)
        rows = slots + 1 if staging else slots
        self.slots, self.length, self.stage = slots, length, slots if staging else None
        self.mamba = set(cfg.mamba_layers)
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.state: dict[int, tuple[Tensor, Tensor]] = {}
        for i in range(cfg.n_layer):
            if i in self.mamba:
                self.state[i] = (torch.zeros(rows, cfg.conv_dim, cfg.d_conv - 1, dtype=dtype, device=dev),
                                 torch.zeros(rows, cfg.nheads, cfg.headdim, cfg.d_state, dtype=torch.float32,
                                             device=dev))
            else:
                k = torch.zeros(rows, kv, length, head_dim, dtype=dtype, device=dev)
                self.kv[i] = (k, torch.zeros_like(k))
        self.n_layer = cfg.n_layer
        vocab = model.get_output_embeddings().out_features
        self.token = torch.zeros(slots, 1, dtype=torch.long, device=dev)        # (S, 1) next input token
        self.position = torch.zeros(slots, 1, dtype=torch.long, device=dev)     # (S, 1) its position = cache index
        self.mask = torch.zeros(slots, 1, 1, length, dtype=torch.bool, device=dev)   # (S, 1, 1, L)
        self.mask[:, 0, 0, 0] = True               # idle rows attend to something (no NaN rows)
        self.logits = torch.zeros(slots, vocab, dtype=torch.float32, device=dev)
        self.stage_pos = torch.zeros(1, dtype=torch.long, device=dev)

    def cache(self, rows: slice, pos: Tensor, decoding: bool, visible: int | None = None) -> Cache:
        """A transformers cache over `rows` of the pool, writing at `pos` (k,)."""
        layers = []
        for i in range(self.n_layer):
            if i in self.mamba:
                conv, ssm = self.state[i]
                st = StaticMambaState()
                st.conv_states[0], st.recurrent_states[0] = conv[rows], ssm[rows]
                st.is_conv_states_initialized[0] = st.is_recurrent_states_initialized[0] = True
                st.has_previous_state[0] = decoding
                layers.append(st)
            else:
                k, v = self.kv[i]
                layers.append(SlotKVLayer(k[rows], v[rows], pos, visible))
        return Cache(layers=layers)

    def fused_view(self, k: int, length: int) -> SimpleNamespace:
        """What `FusedDecoder.forward` reads and writes for the first `k` slots over their first `length`
        positions: `slot`, the position each row writes (k,), and per layer the KV views (k, kv_heads,
        length, head_dim) or the Mamba state."""
        rows = slice(0, k)
        layers = []
        for i, layer in enumerate(self.cache(rows, self.position[:k, 0], decoding=True).layers):
            if i in self.mamba:
                layers.append(layer)
            else:
                keys, values = self.kv[i]
                layers.append(SimpleNamespace(keys=keys[rows, :, :length], values=values[rows, :, :length]))
        return SimpleNamespace(slot=self.position[:k, 0], layers=layers)

    def move(self, row: int, n: int, src: StaticHybridCache | None = None, src_row: int = 0, start: int = 0) -> None:
        """A prefill of `n` tokens becomes slot `row`'s state: the staging row's (its positions 0 .. n-1), or
        row `src_row` of a group prefill's cache `src` (positions start .. start+n-1: prompts are left-padded)."""
        for i, (k, v) in self.kv.items():
            if src is None:
                sk, sv, r, s0 = k, v, self.stage, 0
            else:
                sk, sv, r, s0 = src.layers[i].keys, src.layers[i].values, src_row, start
            k[row, :, :n] = sk[r, :, s0:s0 + n]
            v[row, :, :n] = sv[r, :, s0:s0 + n]
        for i, (conv, ssm) in self.state.items():
            sc, ss, r = (conv, ssm, self.stage) if src is None else (src.layers[i].conv, src.layers[i].ssm, src_row)
            conv[row] = sc[r]
            ssm[row] = ss[r]
        self.mask[row] = False
        self.mask[row, 0, 0, :n] = True
        self.position[row] = n

    def step_state(self) -> list[Tensor]:
        """What a decode step changes besides KV entries at and after each row's position."""
        return [self.position, self.mask, self.token] + [t for pair in self.state.values() for t in pair]


@dataclass
class Sequence:
    """One request in the batcher, with where its text goes: `emit(text so far)` after each token and
    `finish(output, error)` once (error: an exception, output None); `cancelled()` says the caller
    went away."""

    request: Request
    emit: Callable[[str], None]
    finish: Callable[[Output | None, BaseException | None], None]
    cancelled: Callable[[], bool] = lambda: False
    stream: bool = True                      # False: nobody reads the text before the end (no per-token decode)
    arrived: float = field(default_factory=time.perf_counter)
    ids: list[int] = field(default_factory=list)
    pixels: Tensor | None = None              # the request's images, processed (until its prefill)
    embeds: Tensor | None = None
    solo: bool = False                        # prefilled alone (its group's prefill failed)
    prefilled: int = 0
    row: int = -1
    key: int = 0
    seen: Tensor | None = None
    answer: Answer | None = None
    first_token_s: float | None = None


class ContinuousBatcher:
    """Iteration-level scheduling over an `Engine`'s model (see the module doc). Not thread-safe: one
    thread calls `add` and `step` (the serving thread)."""

    def __init__(self, engine: Engine, slots: int = 16, length: int | None = None, prefill_tokens: int = 1024,
                 overlap: bool = False):
        self.engine = engine
        self.overlap = overlap
        self._job: tuple[Future, list[Sequence]] | None = None     # the prefill running on the prefill thread
        self._executor: ThreadPoolExecutor | None = None
        self._side = None                                          # its CUDA stream
        self.pool = SlotPool(engine, slots, slot_length(engine, slots, length), staging=not overlap)
        self.prefill_tokens = max(2, prefill_tokens)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: dict[int, Sequence] = {}
        self.free = list(range(slots))
        self._caches: dict[tuple[int, int], Cache] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._eager: set[tuple[int, int]] = set()          # buckets whose capture failed: they decode eagerly
        self.steps = 0
        self._pending: list[Sequence] | None = None     # the requests of a queued greedy step not yet taken
        self._reader = _TokenReader(self.pool.token, slots)   # each greedy step's argmax, back in launch order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def warm_up(self) -> float:
        """Pay the one-time costs before the first request does: a short dummy request (with an image for a
        VLM) runs through encoding, the vision tower, prefill and decoding (kernel compilation and autotuning
        happen there), then two together (a padded group prefill, whose kernels may compile apart: a burst's
        first requests would otherwise wait for them), then, where CUDA graphs are on, the decode step of
        every slot bucket is captured at every length bucket (at the shortest only past `WARM_UP_CAPTURES`
        graphs; without CUDA graphs, each slot bucket runs once at the shortest). Nothing of it stays: the
        slots are free and their state is rewritten when a request takes them. A failing dummy request is
        logged, not raised: serving goes on. Returns the seconds it took."""
        from ..inputs.prompts import render
        from .sampling import SamplingParams

        if self.busy:
            raise MatvlmError("warm_up runs before the first request")
        t0 = time.perf_counter()
        eng = self.engine
        images = []
        if eng.vlm:
            from PIL import Image

            images = [Image.new("RGB", (64, 64), (128, 128, 128))]
        failed: list[BaseException] = []

        def dummy(text: str, imgs: list) -> Sequence:
            prompt = render(eng.processor, eng.model.config, [{"role": "user", "content": text}], len(imgs))
            return Sequence(Request(prompt, imgs, SamplingParams(max_new_tokens=4, ignore_eos=True)),
                            emit=lambda text: None, finish=lambda out, err: failed.extend([err] if err else []))

        batches = [[dummy("Hello.", images)]]
        if self.pool.slots > 1:
            batches.append([dummy("Hello.", images), dummy("Hello, how are you today?", [])])
        for batch in batches:
            for seq in batch:
                self.add(seq)
            while self.busy:
                self.step()
        if failed:          # e.g. slots too short for an image: serving goes on, the first request pays instead
            log.warning("warm-up request failed (%s); the first requests will wait for kernel compilation", failed[0])
        ks = sorted({min(_bucket(n), self.pool.slots) for n in range(1, self.pool.slots + 1)})
        lengths = [_length_bucket(1, self.pool.length)]
        while eng.cuda_graphs and lengths[-1] < self.pool.length:
            lengths.append(_length_bucket(lengths[-1] + 1, self.pool.length))
        if len(ks) * len(lengths) > WARM_UP_CAPTURES:     # each graph holds memory of its own: past this many,
            lengths = lengths[:1]                         # the shortest only, the rest captured when first met
        with torch.no_grad():
            for length in lengths:
                for k in ks:
                    self.pool.position[:k] = 0                # idle rows: a step writes only at position 0
                    self._launch(k, length)
        self.pool.position.zero_()
        self.steps = 0
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._pending or self._job)

    @property
    def n_running(self) -> int:
        job = self._job                                  # read by other threads (metrics) while it changes
        return len(self.running) + (self.prefilling is not None) + (len(job[1]) if job else 0)

    def close(self) -> None:
        """End the prefill thread (`overlap`). Call it once the batcher is not busy; a prefill still in flight
        is waited for and landed first (its requests then hold their slots, as running ones do)."""
        if self._job is not None:
            self._land_job()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def step(self) -> None:
        """One iteration: cancellations, prefills (up to `prefill_tokens` prompt tokens), one decode step."""
        self._drop_cancelled()
        if self.overlap:
            self._overlapped_prefill()
            if self.running or self._pending:
                self._decode()
            return
        # the budget keeps running streams flowing; with none running nobody waits for a decode step, so new
        # requests are prefilled together up to a slot's length (as a static batch starts)
        budget = self.prefill_tokens if self.running or self._pending else max(self.prefill_tokens, self.pool.length)
        while budget > 0:
            if self.prefilling is None:
                group = self._admit(budget)
                if not group:
                    break
                if len(group) > 1:
                    budget -= self._prefill_group(group)
                    continue
                group[0].row = self.free.pop(0)
                self.prefilling = group[0]
            budget -= self._prefill_chunk(self.prefilling, budget)
        if self.running or self._pending:
            self._decode()

    # --- admission and prefill --------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled()]:
            self.waiting.remove(seq)
            seq.finish(None, MatvlmError("request cancelled"))
        if self.prefilling is not None and self.prefilling.cancelled():
            self._release(self.prefilling, None, MatvlmError("request cancelled"))
        for seq in [s for s in self.running.values() if s.cancelled()]:
            self._release(seq, None, MatvlmError("request cancelled"))

    def _admit(self, budget: int) -> list[Sequence]:
        """The waiting requests to prefill next, first come first served, encoded, at most one per free slot:
        those whose prompts, left-padded to the longest, fit `budget` tokens together; or the first alone
        (it is then prefilled in chunks) when no second one fits with it, or when it is `solo`."""
        group: list[Sequence] = []
        while self.waiting and len(group) < len(self.free):
            seq = self.waiting[0]
            if seq.answer is None:
                try:
                    self._encode(seq)
                except Exception as e:                   # noqa: BLE001 - its own error, nobody else's
                    self.waiting.popleft()
                    seq.finish(None, e)
                    continue
            width = max(len(s.ids) for s in group + [seq])
            if group and (seq.solo or (len(group) + 1) * width > budget):
                break
            group.append(self.waiting.popleft())
            if seq.solo or len(seq.ids) > budget:
                break
        return group

    def _encode(self, seq: Sequence) -> None:
        eng, p = self.engine, seq.request.params
        ids, pixels = eng.encode(seq.request)
        if not ids:
            raise MatvlmError("the prompt has no tokens")
        if len(ids) + p.max_new_tokens > self.pool.length:   # + 1: the spare step after the last token
            raise MatvlmError(f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                              f"{self.pool.length} tokens a slot holds")
        dev = eng.device
        seq.ids, seq.pixels = ids, pixels
        seq.key = p.seed if p.seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()))
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.pool.logits.shape[-1], dtype=torch.bool, device=dev)
            seq.seen[torch.tensor(ids, device=dev)] = True
        seq.answer = Answer(eng.tokenizer, p, eng.eos_ids, live=seq.stream or bool(p.stop), seen=seq.seen)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill the next chunk of `seq` (at most `budget` tokens) in the staging row; returns its size."""
        pool, n = self.pool, len(seq.ids)
        c0 = seq.prefilled
        c1 = min(n, c0 + max(budget, 2 if n - c0 > 1 else 1))
        try:
            if seq.embeds is None:
                dev = self.engine.device
                with torch.no_grad():
                    feats = (vision_features(self.engine.model, seq.pixels.to(dev, self.engine.dtype))
                             if seq.pixels is not None else None)
                    seq.embeds = embed(self.engine.model, torch.tensor([seq.ids], device=dev), feats)   # (1, T, d)
                seq.pixels = None
            pool.stage_pos.fill_(c0)
            cache = pool.cache(slice(pool.stage, pool.stage + 1), pool.stage_pos, decoding=c0 > 0, visible=c1)
            mask = None if c0 == 0 or c1 - c0 == 1 else _causal_lower_right(c1 - c0, c1)
            position = torch.arange(c0, c1, device=self.engine.device)[None]
            with torch.no_grad(), sdpa_without_cudnn():      # each chunk is a new shape (see its doc)
                logits = self.engine._forward(seq.embeds[:, c0:c1], position, mask, None, cache)
            seq.prefilled = c1
            if c1 == n:
                self.prefilling = None
                seq.embeds = None
                pool.move(seq.row, n)
                self._started(seq, self._sample(logits, [seq])[0])
        except Exception as e:                           # noqa: BLE001 - its own error
            self.prefilling = None
            self._release(seq, None, e)
        return c1 - c0

    def _prefill_group(self, group: list[Sequence]) -> int:
        """Prefill several new requests in one forward, left-padded to the longest in a cache of their own,
        then move each into a slot (`_land`). Returns the tokens it computed."""
        for seq in group:
            seq.row = self.free.pop(0)
        try:
            result = self._prefill_job(group, side=False)
        except Exception as e:                           # noqa: BLE001 - `_land` says whose it is
            result = e
        self._land(group, result)
        return len(group) * max(len(s.ids) for s in group)

    def _prefill_job(self, group: list[Sequence], side: bool):
        """The group's prefill into a cache of its own: (cache, last logits, a CUDA event after them or None).
        `side`: on the prefill thread's CUDA stream."""
        eng, width = self.engine, max(len(s.ids) for s in group)
        on_side = side and eng.device.type == "cuda"
        with torch.no_grad(), (torch.cuda.stream(self._side) if on_side else nullcontext()):
            cache = StaticHybridCache(eng.model, len(group), width, eng.dtype, eng.device)
            logits, _ = eng.prefill_into(cache, [(s.ids, s.pixels) for s in group], len(group), width)
            event = None
            if on_side:
                event = torch.cuda.Event()
                event.record()
        return cache, logits, event

    def _land(self, group: list[Sequence], result) -> None:
        """Move a group's prefill (`_prefill_job`'s result, or the exception it raised) into the group's slots
        and give each its first token. If the prefill failed (one bad image, or memory), a group goes back
        to the front of the queue to be prefilled one by one, so that only a request whose own prefill
        fails gets an error; a request alone gets the error."""
        try:
            if isinstance(result, BaseException):
                raise result
            cache, logits, event = result
            width = cache.length
            with torch.no_grad():
                if event is not None:                    # the side stream's work first; its memory stays
                    main = torch.cuda.current_stream(self.engine.device)    # ours until read here
                    main.wait_event(event)
                    for t in cache.tensors() + [logits]:
                        t.record_stream(main)
                for r, seq in enumerate(group):
                    self.pool.move(seq.row, len(seq.ids), cache, r, width - len(seq.ids))
                tokens = self._sample(logits, group)
        except Exception as e:                           # noqa: BLE001 - retried one by one, or its own
            if len(group) == 1:
                self._release(group[0], None, e)
                return
            log.warning("prefill of %d requests together failed (%s: %s); prefilling them one by one",
                        len(group), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            for seq in reversed(group):
                self.free.append(seq.row)
                seq.row, seq.solo = -1, True
                self.waiting.appendleft(seq)
            self.free.sort()
            return
        for seq, tok in zip(group, tokens):
            seq.pixels = None
            if seq.cancelled():                          # it went away while its prompt was prefilled
                self._release(seq, None, MatvlmError("request cancelled"))
                continue
            try:
                self._started(seq, tok)
            except Exception as e:                       # noqa: BLE001 - its own error
                self._release(seq, None, e)

    def _overlapped_prefill(self) -> None:
        """`overlap`: start the next group's prefill on the prefill thread when none runs; land it once done,
        or at once (waiting for it) when no decode step would run meanwhile."""
        if self._job is not None and (self._job[0].done() or not (self.running or self._pending)):
            self._land_job()
        if self._job is None:                            # the next group starts at once, beside the decode step
            group = self._admit(self.pool.length)
            if group:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="matvlm-prefill")
                    if self.engine.device.type == "cuda":
                        self._side = torch.cuda.Stream(self.engine.device)
                for seq in group:
                    seq.row = self.free.pop(0)
                self._job = (self._executor.submit(self._prefill_job, group, True), group)

    def _land_job(self) -> None:
        """Wait for the prefill thread's group (if it still runs) and land it."""
        future, group = self._job
        self._job = None
        try:
            result = future.result()
        except Exception as e:                           # noqa: BLE001 - `_land` says whose it is
            result = e
        self._land(group, result)

    def _started(self, seq: Sequence, tok: int) -> None:
        """A prefilled request (in its slot) takes its first token, then decodes with the others or is done."""
        if self._accept(seq, tok):
            self._release(seq, self._output(seq), None)
        else:
            self.pool.token[seq.row] = tok
            self.running[seq.row] = seq

    # --- decode -----------------------------------------------------------------------------------

    def _bucket_cache(self, k: int, length: int):
        """The step's view of the pool: the fused step's (`SlotPool.fused_view`) or a transformers cache."""
        if (k, length) not in self._caches:
            if self.engine.fused is not None:
                self._caches[k, length] = self.pool.fused_view(k, length)
            else:
                self._caches[k, length] = self.pool.cache(slice(0, k), self.pool.position[:k, 0], decoding=True,
                                                          visible=length)
        return self._caches[k, length]

    def _step_body(self, k: int, length: int) -> None:
        """The fixed-shape decode step of the first `k` rows over the first `length` KV entries of each
        (what a CUDA graph of bucket (k, length) records)."""
        pool = self.pool
        pos = pool.position[:k]
        mask = pool.mask[:k, :, :, :length]
        mask.scatter_(-1, pos.view(k, 1, 1, 1), True)
        embeds = self.engine.model.get_input_embeddings()(pool.token[:k])
        forward = self.engine.fused.forward if self.engine.fused is not None else self.engine._forward
        pool.logits[:k].copy_(forward(embeds, pos, mask, None, self._bucket_cache(k, length)))
        pool.token[:k, 0].copy_(pool.logits[:k].argmax(-1))       # greedy: the next step's input, on the device
        pos.add_(1)

    def _launch(self, k: int, length: int) -> None:
        key = (k, length)
        if self.engine.cuda_graphs and key not in self._graphs and key not in self._eager:
            if self._job is not None:                    # no other thread's CUDA calls during a capture
                wait_for([self._job[0]])
            try:
                self._capture(k, length)
            except Exception as e:                       # noqa: BLE001 - eager steps give the same tokens
                self._eager.add(key)
                log.warning("decode step of %d slots x %d positions not captured as a CUDA graph (%s: %s); it "
                            "runs eagerly", k, length, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        if key in self._graphs:
            self._graphs[key].replay()
        else:
            self._step_body(k, length)

    def _capture(self, k: int, length: int) -> None:
        """Record bucket (k, length)'s step as a CUDA graph; warm-up and capture run it, so what a step
        changes is saved before and restored after (KV entries written past each row's position are
        rewritten before any step reads them). Each graph keeps its own memory pool, as the engine's do:
        buckets are replayed in any order, and PyTorch documents pool sharing as safe only for graphs replayed
        in the order they were captured."""
        saved = [t.clone() for t in self.pool.step_state()]
        try:
            warm_up_on_side_stream(lambda: self._step_body(k, length))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_body(k, length)
            self._graphs[k, length] = graph
        finally:
            torch.cuda.synchronize()
            for t, s in zip(self.pool.step_state(), saved):
                t.copy_(s)

    def _decode(self) -> None:
        """One decode step. A batch of greedy requests runs a step ahead of the host: every step feeds its
        own argmax forward on the device (`_step_body`), so step N+1 is queued before step N's tokens are
        taken (stops, text, streaming), and the host's work overlaps the device's. A request that finished
        at step N is known after N+1 was queued: its row computes one spare step, which nothing reads.
        Batches with sampled requests sample on the host between steps."""
        pending, self._pending = self._pending, None
        seqs = [self.running[r] for r in sorted(self.running)]
        if seqs and _all_greedy([s.request.params for s in seqs]):
            if self._launch_step(seqs, ahead=pending is not None):
                self._reader.push()
                self._pending = seqs
            if pending is not None:
                self._take(pending, dict(enumerate(self._reader.pop())))
            return
        if pending is not None:                          # a sampled request joined: finish the greedy step first
            self._take(pending, dict(enumerate(self._reader.pop())))
            seqs = [self.running[r] for r in sorted(self.running)]
        if not seqs or not self._launch_step(seqs, ahead=False):
            return
        rows = torch.tensor([s.row for s in seqs], device=self.engine.device)
        try:
            with torch.no_grad():
                tokens = self._sample(self.pool.logits[rows], seqs)
        except Exception as e:                           # noqa: BLE001 - sampling failed: every row
            for seq in seqs:
                self._release(seq, None, e)
            return
        fed = self._take(seqs, {s.row: t for s, t in zip(seqs, tokens)})
        if fed:                                          # the sampled tokens replace the argmax the step fed
            idx = torch.tensor([r for r, _ in fed], device=self.engine.device)
            self.pool.token[idx, 0] = torch.tensor([t for _, t in fed], device=self.engine.device)

    def _launch_step(self, seqs: list[Sequence], ahead: bool) -> bool:
        """Queue one decode step over `seqs`' slots; False if it failed (every request in it then gets the
        error). `ahead`: the previous step's tokens are not taken yet, so each request holds one more
        position than its answer shows."""
        rows = [s.row for s in seqs]
        k = min(_bucket(rows[-1] + 1), self.pool.slots)
        # attend over the KV entries the longest running request holds (a power-of-two bucket), not the
        # whole slot: a step's attention reads grow with the requests, not with --max-len
        held = max(len(s.ids) + len(s.answer.ids) for s in seqs) + (1 if ahead else 0)
        length = _length_bucket(held, self.pool.length)
        idle = sorted(set(range(k)) - set(rows))
        if idle:                                         # idle rows decode garbage at position 0, never past L
            self.pool.position[torch.tensor(idle, device=self.engine.device)] = 0
        try:
            with torch.no_grad():
                self._launch(k, length)
        except Exception as e:                           # noqa: BLE001 - the step itself failed: every row
            for seq in seqs:
                self._release(seq, None, e)
            return False
        self.steps += 1
        return True

    def _take(self, seqs: list[Sequence], tokens: dict[int, int]) -> list[tuple[int, int]]:
        """Hand each request its token of a step (`tokens`: {row: token}); finished requests leave their
        slot. Requests that left since the step was queued (cancelled) are skipped. Returns (row, token)
        of the requests that go on."""
        going = []
        for seq in seqs:
            if self.running.get(seq.row) is not seq:
                continue
            tok = tokens[seq.row]
            try:
                done = self._accept(seq, tok)
            except Exception as e:                       # noqa: BLE001 - this row's text failed, not others'
                self._release(seq, None, e)
                continue
            if done:
                self._release(seq, self._output(seq), None)
            else:
                going.append((seq.row, tok))
        return going

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        params = [s.request.params for s in seqs]
        if _all_greedy(params):
            return logits.argmax(-1).tolist()
        dev = logits.device
        seen = None
        if any(s.seen is not None for s in seqs):
            seen = torch.stack([s.seen if s.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for s in seqs])
        keys = torch.tensor([s.key for s in seqs], dtype=torch.int64, device=dev)
        counters = torch.tensor([len(s.answer.ids) for s in seqs], dtype=torch.int64, device=dev)
        return sample_batch(logits.float(), params, seen, keys, counters).tolist()

    def _accept(self, seq: Sequence, tok: int) -> bool:
        """Take one generated token; whether the request is done."""
        if seq.first_token_s is None:
            seq.first_token_s = time.perf_counter() - seq.arrived
        done = seq.answer.accept(tok)
        if seq.stream and seq.answer.reason != "stop":
            seq.emit(seq.answer.text)
        return done

    def _output(self, seq: Sequence) -> Output:
        total = time.perf_counter() - seq.arrived
        a = seq.answer
        return Output(a.final_text(), a.ids, a.reason, len(seq.ids),
                      {"ttft_s": seq.first_token_s, "total_s": total, "scheduler": "continuous"})

    def _release(self, seq: Sequence, output: Output | None, error: BaseException | None) -> None:
        if self.running.get(seq.row) is seq:
            del self.running[seq.row]
        if self.prefilling is seq:
            self.prefilling = None
        if seq.row >= 0:
            self.free.append(seq.row)
            self.free.sort()
            seq.row = -1
        seq.finish(output, error)
