"""lmms-eval plugin: `lmms-eval --model matvlm --model_args pretrained=DIR --tasks pope,mme ...`.

Registered through the `lmms_eval.models` entry-point group (pyproject.toml), which lmms-eval's
model registry reads at start-up; `manifest()` below is that entry point's payload. Only this
module imports lmms_eval (`import matvlm` does not), and only lmms-eval imports this module.

The model is opened with `matvlm.load` (a hybrid or a plain teacher directory, any format
`matvlm.load` reads) and answers through matvlm's `Engine`, with prompts rendered the way
`matvlm eval` renders them (the model's chat template, else the matvlm template of its family):

- generate_until: batched (`--batch_size N`), honouring the task's `max_new_tokens`, `until`
  stop strings, `temperature` (0 or `do_sample: false` = greedy), `top_p`, `top_k`,
  `repetition_penalty`; beam search is refused. Images come from the task's `doc_to_visual`
  (PIL images or image file paths); a model whose processor has a chat template takes every image
  of a question, one without (TinyLLaVA / released MaTVLM) the first, as `matvlm eval` does.
  Video and audio inputs are refused.
- loglikelihood (multiple-choice and loglikelihood tasks): the summed log-probability of the
  continuation after the rendered prompt, and whether greedy decoding would produce it, from one
  plain forward per batch.
- generate_until_multi_round: not supported.

Model args (comma-separated `key=value`): pretrained (required), max_new_tokens (used when a task
sets none; default 256), device (default cuda when available, else cpu; under `accelerate launch`
cuda:LOCAL_RANK), dtype (float32, bfloat16, float16 or auto: bfloat16 on CUDA, float32 on CPU),
template (a matvlm template name forcing it over the model's chat template). The batch size is
lmms-eval's own `--batch_size` (`auto` = 16).
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as _e:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        "matvlm.eval.lmms needs lmms-eval: pip install \"matvlm[lmms]\" && pip install --no-deps lmms-eval==0.7.3 "
        f"(README, 'With lmms-eval') [{_e}]") from None

import torch
from PIL import Image

from ..errors import MatvlmError
from ..ops.attention import sdpa_without_cudnn

MODEL_ID = "matvlm"
CLASS_PATH = "matvlm.eval.lmms.MatvlmLMM"
AUTO_BATCH = 16
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# generation kwargs lmms-eval tasks set that greedy / plain sampling decoding satisfies as they are
_IGNORED_GEN_KWARGS = {"use_cache", "image_aspect_ratio", "image_sizes", "modalities"}


def manifest():
    """The `lmms_eval.models` entry point: model id `matvlm` -> `MatvlmLMM` (a "simple" lmms-eval model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


class MatvlmLMM(lmms):
    """A matvlm checkpoint (hybrid or teacher) answering lmms-eval requests through matvlm's Engine."""

    is_simple = True

    def __init__(self, pretrained: str, max_new_tokens: int = 256, device: str | None = None,
                 dtype: str | None = "auto", template: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise MatvlmError(f"unknown matvlm model_args {sorted(kwargs)}; expected pretrained, max_new_tokens, "
                              "device, dtype, template (the batch size is lmms-eval's --batch_size)")
        if not pretrained:
            raise MatvlmError("give the model directory: --model_args pretrained=DIR")
        from ..engine.engine import Engine

        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None and self._world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"       # one model copy per process
        dtype = None if dtype in (None, "", "auto") else str(dtype).removeprefix("torch.")
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise MatvlmError(f"unknown dtype {dtype!r}; expected float32, bfloat16, float16 or auto")
        self.pretrained = str(Path(pretrained).expanduser())
        self.engine = Engine.from_dir(self.pretrained, device=device, dtype=dtype)
        self.template = template
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = self._batch_size(batch_size, max_batch_size)
        self._warned: set[str] = set()

    # --- properties lmms-eval reads ------------------------------------------------------------

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def device(self):
        return self.engine.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @staticmethod
    def _batch_size(value, max_batch_size) -> int:
        text = str(value).strip()
        if text.startswith("auto"):
            return int(max_batch_size or (text.split(":")[1] if ":" in text else AUTO_BATCH))
        n = int(text)
        if n < 1:
            raise MatvlmError(f"batch_size must be >= 1, got {n}")
        return n

    # --- inputs --------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            from loguru import logger

            logger.warning(message)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        """The request's images (PIL, RGB), as many as the model's prompt format takes."""
        if doc_to_visual is None:
            return []
        found = doc_to_visual(self.task_dict[task][split][doc_id])
        images = []
        for v in _flatten(found):
            if v is None:
                continue
            if isinstance(v, (str, Path)) and Path(v).suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(v) as im:
                    v = im.convert("RGB")
            if not isinstance(v, Image.Image):
                what = f"the path {v}" if isinstance(v, (str, Path)) else f"a {type(v).__name__}"
                raise MatvlmError(f"task {task!r} gives {what} as a visual; the matvlm model takes images only "
                                  "(PIL images or image files), not video or audio")
            images.append(v)
        if images and not self.engine.vlm:
            self._warn_once("text", f"{self.pretrained} is a text model: the images of task {task!r} are dropped")
            return []
        from .run import _multi_image

        if len(images) > 1 and not _multi_image(self.engine):
            self._warn_once("multi", f"{self.pretrained} has no chat template: its prompt format places one image, "
                                     f"so questions of task {task!r} with several images use the first")
            images = images[:1]
        return images

    def _prompt(self, context: str, n_images: int) -> str:
        from ..inputs.prompts import render

        text = context.replace("<image>", "").strip()        # render places the images' placeholders
        return render(self.engine.processor, self.engine.model.config, [{"role": "user", "content": text}],
                      n_images, self.template)

    def _params(self, gen_kwargs: dict):
        from ..inputs.prompts import stop_strings
        from ..engine.sampling import SamplingParams

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if int(kw.pop("num_beams", 1) or 1) != 1:
            raise MatvlmError("beam search (num_beams > 1) is not supported by matvlm's engine")
        temperature = float(kw.pop("temperature", 0) or 0)
        if kw.pop("do_sample", None) is False:
            temperature = 0.0
        top_p = kw.pop("top_p", None)
        top_k = kw.pop("top_k", None)
        penalty = kw.pop("repetition_penalty", None)
        max_new = kw.pop("max_new_tokens", None) or kw.pop("max_gen_toks", None) or self.max_new_tokens
        unused = sorted(k for k in kw if k not in _IGNORED_GEN_KWARGS)
        if unused:
            self._warn_once(f"kw{unused}", f"matvlm ignores the generation kwargs {unused}")
        stops = stop_strings(self.engine.processor, self.engine.model.config, self.template)
        return SamplingParams(max_new_tokens=int(max_new), temperature=temperature,
                              top_p=float(top_p) if top_p is not None and temperature > 0 else 1.0,
                              top_k=int(top_k or 0) if temperature > 0 else 0,
                              repetition_penalty=float(penalty) if penalty is not None else 1.0,
                              stop=stops + [s for s in until if s and s not in stops])

    def _fit_context(self, request):
        """Shorten max_new_tokens so prompt + answer fit the model's context; None if the prompt alone does not."""
        from ..engine.engine import context_limit

        limit = context_limit(self.engine.model)
        if not limit:
            return request
        n_prompt = len(self.engine.encode(request)[0])
        room = limit - n_prompt
        if room < 1:
            self._warn_once("long", f"a prompt of {n_prompt} tokens does not fit the model's context of {limit} "
                                    "tokens: its answer is empty")
            return None
        if request.params.max_new_tokens > room:
            request.params.max_new_tokens = room
        return request

    # --- lmms-eval API -------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        from ..engine.engine import Request

        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="matvlm generating")
        for start in range(0, len(order), self.batch_size):
            chunk, batch = [], []
            for i in order[start:start + self.batch_size]:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                images = self._visuals(doc_to_visual, doc_id, task, split)
                req = self._fit_context(Request(self._prompt(context, len(images)), images,
                                                self._params(gen_kwargs)))
                if req is None:
                    results[i] = ""
                else:
                    chunk.append(i)
                    batch.append(req)
            for i, out in zip(chunk, self.engine.generate(batch) if batch else []):
                results[i] = out.text.strip()
                self.cache_hook.add_partial("generate_until", requests[i].args[:2], results[i])
            bar.update(len(order[start:start + self.batch_size]))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | rendered prompt), whether greedy decoding gives them)."""
        from tqdm import tqdm

        from ..engine.engine import Request

        items = []                                            # (ids, pixels, n_context) per request
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            images = []
            if len(r.args) >= 6:
                doc_to_visual, doc_id, task, split = r.args[2:6]
                if not isinstance(continuation, str):         # `loglikelihood` tasks pass doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                images = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(images))
            ctx_ids, _ = self.engine.encode(Request(prompt, images))
            ids, pixels = self.engine.encode(Request(prompt + str(continuation), images))
            n_ctx = min(len(ctx_ids), len(ids) - 1)            # the continuation has at least one token
            items.append((ids, pixels, n_ctx))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="matvlm loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, res in zip(chunk, self._score([items[i] for i in chunk])):
                results[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], res)
            bar.update(len(chunk))
        bar.close()
        return results

    @torch.no_grad()
    def _score(self, items) -> list[tuple[float, bool]]:
        """One right-padded forward of the model's decoder; the LM head only on continuation positions."""
        eng = self.engine
        width = max(len(ids) for ids, _, _ in items)
        pad_id = eng.tokenizer.pad_token_id if eng.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (seq, _, _) in enumerate(items):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        kwargs = {"input_ids": ids.to(eng.device), "attention_mask": mask.to(eng.device)}
        pixels = [p for _, p, _ in items if p is not None]
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(eng.device, eng.dtype)
        with sdpa_without_cudnn():                  # a new length per batch (ops.attention.sdpa_without_cudnn)
            hidden = eng.model.model(**kwargs).last_hidden_state             # (B, T, d), after the final norm
        head = eng.model.get_output_embeddings()
        out = []
        for row, (seq, _, n_ctx) in enumerate(items):
            target = torch.tensor(seq[n_ctx:], device=eng.device)
            logp = torch.log_softmax(head(hidden[row, n_ctx - 1:len(seq) - 1]).float(), dim=-1)
            out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the matvlm lmms-eval model does not support multi-round generation "
                                  "(generate_until_multi_round tasks); generate_until and loglikelihood tasks work")


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _flatten(item)
    else:
        yield x
