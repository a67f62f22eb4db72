"""The generation engine used by chat, the Gradio app, the HTTP server, evaluation and benchmarks.

One forward path for hybrids and plain teachers alike (so the two are compared under the same code):

- a static, pre-allocated cache per (batch bucket, length bucket): KV buffers for attention layers,
  conv + SSM states for Mamba layers, all at fixed addresses;
- prefill of the left-padded batch through the model's own decoder layers (sdpa attention, the
  chunked SSD for Mamba layers), with an explicit causal + padding mask;
- decode steps that run the same layers on one token per sequence, captured once per bucket as a
  CUDA graph on CUDA (eager on CPU); mask, positions and cache slot advance inside the graph;
- sampling (greedy, temperature, top-k, top-p, repetition penalty, per-request seeds), stop tokens
  and stop strings, and a streaming iterator.

The decoder layers are transformers' own; the engine only replaces the loop around them
(transformers' `generate` re-derives masks and cache positions on the host every step, which is
what makes its decode slow and uncapturable).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, CausalVariant

from ..errors import MatvlmError
from ..inputs.tokens import has_own_bos
from ..model.cache import cache_kwarg
from ..model.hybrid import decoder_stack, text_config
from ..model.vlm import embed, is_vlm, vision_features
from ..ops.attention import sdpa_without_cudnn
from .answer import Answer
from .cache import StaticHybridCache
from .fused import fused_decoder
from .sampling import SamplingParams, sample_batch

log = logging.getLogger("matvlm.engine")

FINAL_NORM = ("final_layernorm", "norm")        # Phi, then Llama / Mistral / Qwen2


@dataclass
class _Static:
    """Buffers one (batch, length) bucket decodes with; a CUDA graph is bound to their addresses."""

    cache: StaticHybridCache
    token: Tensor        # (B, 1) int64: input token of the step
    position: Tensor     # (B, 1) int64: its position id
    mask: Tensor         # (B, 1, 1, L) bool: slots a query may attend to
    logits: Tensor       # (B, V) float32: output of the step
    greedy: Tensor       # (B, 1) int64: argmax of `logits`, computed inside the step
    feed: Tensor         # (B, 1) bool: the step feeds `greedy` back as the next `token` (greedy runs)
    graph: torch.cuda.CUDAGraph | None = None


# --- requests and results ---------------------------------------------------------------------

@dataclass
class Request:
    """A prompt (already templated text, or token ids) with its images and sampling parameters."""

    prompt: str | list[int]
    images: list = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    # `Engine.encode`'s result when the caller has it already (the server encodes to check the length);
    # it must be the same engine's encoding of this prompt and these images
    encoded: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str                 # "stop" (eos, stop token or stop string) or "length"
    prompt_tokens: int
    timings: dict


def context_limit(model: nn.Module) -> int | None:
    """The model's context length (its text config's max_position_embeddings), or None if it states none."""
    return getattr(text_config(model.config), "max_position_embeddings", None) or None


def check_fits(model: nn.Module, prompt_len: int, max_new: int) -> None:
    """Refuse a prompt whose answer cannot fit the model's context."""
    limit = context_limit(model)
    if limit and prompt_len + max_new > limit:
        raise MatvlmError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                          f"context of {limit} tokens")


def _all_greedy(params: list[SamplingParams]) -> bool:
    return all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params)


def _out_of_memory(e: BaseException | None) -> bool:
    """An out-of-memory error, also where torch.compile wrapped one (BackendCompilerFailed)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _causal_lower_right(q: int, kv: int) -> CausalBias:
    """torch's `causal_lower_right(q, kv)` without the uninitialised (2, q, kv) float32 host tensor its
    constructor allocates (16 GiB of address space for a 16K chunk over 128K keys): sdpa reads only
    the variant and the two lengths."""
    bias = torch.Tensor._make_subclass(CausalBias, torch.empty(0))
    bias.variant, bias.seq_len_q, bias.seq_len_kv = CausalVariant.LOWER_RIGHT, q, kv
    return bias


def _bucket(n: int, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)) -> int:
    for s in sizes:
        if n <= s:
            return s
    return n


def warm_up_on_side_stream(step, times: int = 2) -> None:
    """Run `step` `times` times on a side CUDA stream, as CUDA-graph capture needs before it records (lazy
    allocations and autotuning happen outside the graph); the current stream then waits for it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(stream)


def _round_up(n: int, to: int = 256) -> int:
    return -(-n // to) * to


class Engine:
    """Generation for a matvlm model (hybrid or plain teacher) and its processor or tokenizer.

    Args:
        model: from `matvlm.load`; moved to `device` / `dtype`.
        processor: its `LlavaProcessor` (VLMs) or tokenizer (text models).
        device: default cuda when available.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        cuda_graphs: capture decode steps (default: on for CUDA).
        max_batch_size: largest batch one decode runs.
        prefill_tokens: tokens (batch x positions) one prefill forward may hold; longer prompts are
            prefilled in chunks (memory bounded; the result is the same).
        compile: compile the decode step with `torch.compile` (inductor fuses the norms, rotary
            embedding, activation and cache writes between the matmuls) before capturing it. The first
            request of each batch bucket then waits for the compilation (tens of seconds; cached on
            disk by inductor afterwards). Default off.
        fuse: decode through `FusedDecoder` (projections that share an input run as one product,
            Triton matrix-vector and split-KV attention kernels on CUDA) instead of the model's own
            layers. The model's weights then become views of the fused matrices. Default: on CUDA
            unless `compile` (the fused step runs its own kernels and needs no compilation).
    """

    def __init__(self, model: nn.Module, processor, device: str | torch.device | None = None, dtype=None,
                 cuda_graphs: bool | None = None, max_batch_size: int = 64, image_aspect: str = "square",
                 prefill_tokens: int = 16384, compile: bool = False, fuse: bool | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.stack = decoder_stack(model)
        self.norm = next(getattr(self.stack, n) for n in FINAL_NORM if hasattr(self.stack, n))
        self.vlm = is_vlm(model)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.max_batch_size = max_batch_size
        self.image_aspect = image_aspect
        self.prefill_tokens = prefill_tokens
        self._statics: dict[tuple[int, int], _Static] = {}
        self.eos_ids = self._eos_ids()
        # read once here: prefills may run on another thread than the one decoding text with the tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.compiled = compile
        self._compiled_ok = False          # the compiled step has run once (compiled or fell back)
        fuse = self.device.type == "cuda" and not compile if fuse is None else fuse
        self.fused = fused_decoder(self.model, self.stack, self.norm) if fuse else None
        self._cache_kw = cache_kwarg(self.stack.layers[0])   # `cache` (transformers >= 5.24) or `past_key_values`
        # dynamic shapes: one compilation serves every cache length (and every batch size above 1)
        self._decode_forward = torch.compile(self._step_forward, dynamic=True) if compile else self._step_forward

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                 image_aspect: str = "square", **kwargs) -> "Engine":
        """An engine over the model directory `model_dir` (any layout `matvlm.load` reads) and its processor.
        `dtype` may be a name ("bfloat16"); the image aspect is the model config's `image_aspect_ratio`
        when it says "pad" or "square", else `image_aspect`. Other keywords go to `Engine`."""
        from ..convert.formats import load, load_processor

        model = load(model_dir)
        aspect = getattr(model.config, "image_aspect_ratio", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return cls(model, load_processor(model_dir), device=device, dtype=dtype,
                   image_aspect=aspect if aspect in ("pad", "square") else image_aspect, **kwargs)

    def prefill_chunk(self, batch: int) -> int:
        """Prompt tokens per prefill forward: the prompt is prefilled in chunks of this many positions
        so that one forward holds at most `prefill_tokens` (batch x chunk) tokens; the attention layers
        read the cache written by earlier chunks and the Mamba-2 layers carry their state across."""
        return max(2, self.prefill_tokens // batch)   # a one-token call is a Mamba decode step (no padding)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.model.generation_config, text_config(self.model.config), self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            ids |= set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())
        return ids

    # --- the forward path -----------------------------------------------------------------------

    def _forward(self, embeds: Tensor, position: Tensor, mask4d: Tensor, pad2d: Tensor | None,
                 cache: StaticHybridCache) -> Tensor:
        """Decoder layers over `embeds` (B, T, d) writing the cache; logits of the last position (B, V)."""
        pe = self.stack.rotary_emb(embeds, position)
        h = embeds
        for layer in self.stack.layers:
            h = layer(h, attention_mask=mask4d, position_ids=position, use_cache=True, position_embeddings=pe,
                      mamba_padding_mask=pad2d, **{self._cache_kw: cache})
            h = h[0] if isinstance(h, tuple) else h
        return self.model.get_output_embeddings()(self.norm(h[:, -1:]))[:, -1].float()

    @property
    def _step_forward(self):
        """The uncompiled decode forward: the fused step, or the model's own layers."""
        return self.fused.forward if self.fused is not None else self._forward

    def _decode_body(self, st: _Static) -> None:
        """One decode step on the bucket's buffers. The greedy choice is made on the device and, where
        `feed` is set, becomes the next step's input, so greedy steps can be queued back to back without
        waiting for the host."""
        st.mask.index_fill_(-1, st.cache.slot.view(1), True)
        embeds = self.model.get_input_embeddings()(st.token)
        st.logits.copy_(self._decode_forward(embeds, st.position, st.mask, None, st.cache))
        st.greedy.copy_(st.logits.argmax(-1, keepdim=True))
        st.token.copy_(torch.where(st.feed, st.greedy, st.token))
        st.cache.slot.add_(1)
        st.position.add_(1)

    def _static(self, batch: int, length: int) -> _Static:
        key = (batch, length)
        if key not in self._statics:
            if len(self._statics) >= 2:                       # keep at most two buckets' buffers alive
                self._statics.pop(next(iter(self._statics)))
            try:
                self._statics[key] = self._allocate(batch, length)
            except torch.OutOfMemoryError:                    # make room: drop the other buckets, once
                self._statics.clear()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self._statics[key] = self._allocate(batch, length)
        return self._statics[key]

    def _allocate(self, batch: int, length: int) -> _Static:
        vocab = self.model.get_output_embeddings().out_features
        return _Static(
            cache=StaticHybridCache(self.model, batch, length, self.dtype, self.device),
            token=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            position=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            mask=torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=self.device),
            logits=torch.zeros(batch, vocab, dtype=torch.float32, device=self.device),
            greedy=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            feed=torch.zeros(batch, 1, dtype=torch.bool, device=self.device))

    def _capture(self, st: _Static) -> None:
        """Record one decode step as a CUDA graph. Warm-up (where a compiled step compiles) and capture
        run the step, so what a step changes is saved before and restored after (not the KV buffers: the
        entries the extra steps write lie past the prompt and are rewritten before they are read). A step
        that fails to compile falls back to the eager step, with a warning."""
        saved = [t.clone() for t in self._step_tensors(st)]
        try:
            self._or_uncompiled(lambda: self._warm_up(st), st, saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_body(st)
            st.graph = graph                                  # only a graph that was captured whole
        finally:
            torch.cuda.synchronize()
            self._restore(st, saved)

    def _or_uncompiled(self, run, st: _Static, saved: list[Tensor]) -> None:
        """run(); if the compiled step fails to compile, warn, restore the buffers and run it eager."""
        try:
            run()
        except Exception as e:                              # torch.compile problems are not the user's
            if not self.compiled or _out_of_memory(e):
                raise
            log.warning("compiling the decode step failed (%s: %s); decoding without compilation",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compiled, self._decode_forward = False, self._step_forward
            self._restore(st, saved)
            run()
        self._compiled_ok = self.compiled

    @staticmethod
    def _step_tensors(st: _Static) -> list[Tensor]:
        return [*st.cache.step_state(), st.token, st.position, st.mask, st.feed]

    def _warm_up(self, st: _Static) -> None:
        warm_up_on_side_stream(lambda: self._decode_body(st))

    @classmethod
    def _restore(cls, st: _Static, saved: list[Tensor]) -> None:
        for t, s in zip(cls._step_tensors(st), saved):
            t.copy_(s)

    # --- inputs ---------------------------------------------------------------------------------

    def encode(self, request: Request, processor=None) -> tuple[list[int], Tensor | None]:
        """Token ids of a request (image placeholders expanded) and its pixel values (n_img, 3, H, W).
        `processor`: a copy of the engine's processor to encode with instead of its own, for callers on
        other threads (a fast tokenizer must not encode in two threads at once, or encode in one while
        another decodes: it raises "Already borrowed")."""
        if request.encoded is not None:
            return request.encoded
        proc = self.processor if processor is None else processor
        tokenizer = self.tokenizer if processor is None else getattr(processor, "tokenizer", processor)
        if isinstance(request.prompt, list):
            if request.images:
                raise MatvlmError("a request given as token ids cannot carry images")
            return list(request.prompt), None
        if request.images:
            if not self.vlm:
                raise MatvlmError("this model takes no images (it is a text model)")
            from ..inputs.images import expand2square

            images = [im.convert("RGB") for im in request.images]
            if self.image_aspect == "pad":
                mean = tuple(int(m * 255) for m in proc.image_processor.image_mean)
                images = [expand2square(im, mean) for im in images]
            enc = proc(text=[request.prompt], images=images, return_tensors="pt")
            return enc["input_ids"][0].tolist(), enc["pixel_values"]
        own_bos = has_own_bos(tokenizer, request.prompt)           # a chat template that wrote it already
        return tokenizer(request.prompt, add_special_tokens=not own_bos)["input_ids"], None

    # --- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[Output]:
        """Generate for a batch of requests (any lengths; left-padded together)."""
        outs: list[Output] = []
        for i in range(0, len(requests), self.max_batch_size):
            final = None
            for event in self._run(requests[i:i + self.max_batch_size]):
                final = event
            outs += final
        return outs

    def stream(self, request: Request) -> Iterator[str]:
        """Yield the text of one request as it is generated (pieces that concatenate to the full text)."""
        sent = ""
        with torch.no_grad():
            for event in self._run([request], stream=True):
                final = not isinstance(event[0], str)
                text = event[0].text if final else event[0]
                if not final:                     # hold back a character whose bytes are still arriving
                    text = text.rstrip("\ufffd")
                if text.startswith(sent) and len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text

    def _run(self, requests: list[Request], stream: bool = False, encoded: list | None = None):
        """Generator: yields [partial text per request] after each step (kept current only with `stream`
        or for requests with stop strings), and finally [Output, ...]. `encoded`: the requests' `encode`
        results where the caller has them already.

        The walk: size the batch's static state, prefill the prompts (`_prefill`), capture the decode step,
        then decode, with what each request has produced kept in a `_Decoding`, which also assembles the
        outputs."""
        t0 = time.perf_counter()
        encoded = encoded if encoded is not None else [self.encode(r) for r in requests]
        n = len(requests)
        b = _bucket(n)
        prompt_len = max(len(ids) for ids, _ in encoded)
        max_new = max(r.params.max_new_tokens for r in requests)
        length = _round_up(prompt_len + max(max_new, 3))   # capturing a step runs 3 past the prompt
        check_fits(self.model, prompt_len, max_new)
        st = self._static(b, length)
        logits = self._prefill(st, encoded, b, prompt_len)
        t_prefill = time.perf_counter() - t0
        if self.cuda_graphs and st.graph is None:
            self._capture(st)

        dec = _Decoding(self, requests, encoded, stream, vocab=logits.shape[-1])
        # Greedy runs queue each step before reading the previous one's tokens (the step feeds its own
        # argmax forward), so the device never waits for the host; sampled runs sample on the host
        # between steps. Either way a step's tokens are read back once, after it ran.
        st.feed.fill_(dec.greedy)
        reader = _TokenReader(st.greedy, n)
        tokens = self._sample(logits[:n], dec.params, dec.keys, 0, dec.seen)
        _feed(st, tokens)
        t_first = time.perf_counter() - t0
        launched = steps = 0
        while True:
            dec.accept(tokens)
            yield list(dec.texts)
            if dec.done:
                break
            if dec.greedy:
                while reader.pending < 2 and launched < max_new - 1:     # never past the cache's length
                    self._launch(st)
                    reader.push()
                    launched += 1
                tokens = reader.pop()
            else:
                self._launch(st)
                tokens = self._sample(st.logits[:n], dec.params, dec.keys, steps + 1, dec.seen)
                _feed(st, tokens)
            steps += 1
        t_last = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        yield dec.outputs({"prefill_s": t_prefill, "ttft_s": t_first, "total_s": total, "decode_steps": steps,
                           "decode_s_per_step": (t_last - t_first) / steps if steps else None, "batch_bucket": b,
                           "cache_length": length, "cache_bytes": st.cache.nbytes()})

    def _prefill(self, st: _Static, encoded: list, b: int, prompt_len: int) -> Tensor:
        """Write the prompts into `st`'s cache (`prefill_into`) and leave `st` ready for the first decode
        step. Returns the last position's logits (b, V)."""
        logits, valid = self.prefill_into(st.cache, encoded, b, prompt_len)
        st.cache.slot.fill_(prompt_len)
        st.mask.zero_()
        st.mask[:, 0, 0, :prompt_len] = valid
        st.position.copy_(valid.long().sum(-1, keepdim=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return logits

    def prefill_into(self, cache: StaticHybridCache, encoded: list, b: int, prompt_len: int) -> tuple[Tensor, Tensor]:
        """Write the prompts (`encode` results) into `cache`, left-padded to `prompt_len` in `b` rows (rows
        past the requests repeat the last one), in chunks of `prefill_chunk(b)` tokens. Returns the last
        position's logits (b, V) and which positions hold prompt tokens (b, prompt_len), on the device:
        row r's prompt is at cache positions prompt_len - n_r ... prompt_len - 1."""
        n, dev = len(encoded), self.device
        cache.clear()
        pad_id = self.pad_id
        ids = torch.full((b, prompt_len), pad_id, dtype=torch.long)
        valid = torch.zeros((b, prompt_len), dtype=torch.bool)
        for row in range(b):
            src = encoded[min(row, n - 1)][0]                 # bucket padding rows repeat the last request
            ids[row, prompt_len - len(src):] = torch.tensor(src)
            valid[row, prompt_len - len(src):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        pixels = [p for _, p in encoded[:n] if p is not None]
        pixels += [encoded[n - 1][1]] * (b - n) if encoded[n - 1][1] is not None else []
        feats = vision_features(self.model, torch.cat(pixels).to(dev, self.dtype)) if pixels else None
        embeds = embed(self.model, ids, feats)

        position = (valid.long().cumsum(-1) - 1).clamp_min(0)
        chunk = self.prefill_chunk(b)
        unpadded = bool(valid.all())
        for c0 in range(0, prompt_len, chunk):
            c1 = min(prompt_len, c0 + chunk)
            cache.slot.fill_(c0)
            cache.set_visible(c1)                   # attention reads the c1 positions written so far
            if unpadded:            # causal, aligned to the chunk's end: no mask tensor, sdpa's flash path
                # (one query over exactly the keys written so far needs no mask; transformers folds a
                # lone GQA query's heads into the query length, which a lower-right bias would misalign)
                mask4d = None if c0 == 0 or c1 - c0 == 1 else _causal_lower_right(c1 - c0, c1)
            else:                                      # bounded memory: (chunk x c1) booleans per row
                rows = torch.arange(c0, c1, device=dev)
                cols = torch.arange(c1, device=dev)
                causal = cols[None, :] <= rows[:, None]                                      # (c, c1)
                mask4d = ((causal & valid[:, None, :c1]) | (cols[None, :] == rows[:, None]))[:, None]  # pads: self
            try:
                with sdpa_without_cudnn():             # every prompt length is a new shape: see its doc
                    logits = self._forward(embeds[:, c0:c1], position[:, c0:c1], mask4d, valid[:, c0:c1].long(),
                                           cache)
            finally:
                cache.set_visible(None)
        return logits, valid

    def _launch(self, st: _Static) -> None:
        if st.graph is not None:
            st.graph.replay()
        elif self.compiled and not self._compiled_ok:        # first uncaptured compiled step (CPU)
            self._or_uncompiled(lambda: self._decode_body(st), st, [t.clone() for t in self._step_tensors(st)])
        else:
            self._decode_body(st)

    def _sample(self, logits: Tensor, params: list[SamplingParams], keys: Tensor, step: int, seen) -> list[int]:
        """The next tokens of a batch: `step` counts the tokens each request has drawn before (all rows of a
        batch start together), so a request's draws depend on its seed and step alone."""
        if _all_greedy(params):
            return logits.argmax(-1).tolist()
        return sample_batch(logits.float(), params, seen, keys, torch.full_like(keys, step)).tolist()


class _Decoding:
    """What the requests of one static batch have produced while it decodes: an `Answer` each (tokens,
    finish reason, text followed token by token where it is read: streaming, or stop strings to find),
    sampling keys and the tokens seen (repetition penalty); `accept` takes a step's tokens, `outputs`
    assembles the answers."""

    def __init__(self, engine: Engine, requests: list[Request], encoded: list, stream: bool, vocab: int):
        n, dev = len(requests), engine.device
        self.encoded = encoded
        self.params = [r.params for r in requests]
        self.greedy = _all_greedy(self.params)
        # per-request sampling keys: the request's seed, or a fresh draw from torch's generator
        self.keys = torch.tensor([p.seed if p.seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()))
                                  for p in self.params], dtype=torch.int64, device=dev)
        self.seen = None
        if any(p.repetition_penalty != 1.0 for p in self.params):
            self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
            for row, (src, _) in enumerate(encoded):
                self.seen[row, torch.tensor(src, device=dev)] = True
        self.answers = [Answer(engine.tokenizer, p, engine.eos_ids, live=stream or bool(p.stop),
                               seen=None if self.seen is None else self.seen[row])
                        for row, p in enumerate(self.params)]

    @property
    def texts(self) -> list[str]:
        return [a.text for a in self.answers]

    @property
    def done(self) -> bool:
        return all(a.done for a in self.answers)

    def accept(self, tokens: list[int]) -> None:
        for answer, tok in zip(self.answers, tokens):
            answer.accept(tok)

    def outputs(self, timings: dict) -> list[Output]:
        return [Output(a.final_text(), a.ids, a.reason, len(enc[0]), timings)
                for a, enc in zip(self.answers, self.encoded)]


def _feed(st: _Static, tokens: list[int]) -> None:
    """The next step's input tokens; the bucket's padding rows repeat the last request's."""
    b = st.token.shape[0]
    st.token.copy_(torch.tensor(tokens + [tokens[-1]] * (b - len(tokens)), device=st.token.device).view(b, 1))


class _TokenReader:
    """Reads the greedy tokens of launched steps back to the host in launch order without stalling the
    device: each launch is followed by an asynchronous copy into pinned memory and an event."""

    def __init__(self, source: Tensor, n: int, slots: int = 3):
        self.source, self.n = source, n
        self.cuda = source.is_cuda
        self.host = torch.empty((slots, *source.shape), dtype=source.dtype, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        self.queue: list[int] = []
        self.count = 0

    @property
    def pending(self) -> int:
        return len(self.queue)

    def push(self) -> None:
        i = self.count % len(self.host)
        self.host[i].copy_(self.source, non_blocking=self.cuda)
        if self.cuda:
            self.events[i].record()
        self.queue.append(i)
        self.count += 1

    def pop(self) -> list[int]:
        i = self.queue.pop(0)
        if self.cuda:
            self.events[i].synchronize()
        return self.host[i][:self.n, 0].tolist()

