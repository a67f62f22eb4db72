"""Shared fixtures: tiny teachers built from transformers configs with random weights (no hub)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in Triton's interpreter on CPU tensors (tests/ops/test_decode_kernels.py); it must be
# chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch.overrides import TorchFunctionMode

from matvlm.toy.tiny import save_teacher, tiny_causal_lm, tiny_llava

torch.set_num_threads(min(2, torch.get_num_threads()))

# family -> kwargs: phi is MHA with q/k/v/dense biases, llama is GQA without biases, qwen2 GQA with q/k/v biases
FAMILY_KW = {"phi": {}, "llama": {"kv_heads": 2}, "qwen2": {"kv_heads": 2}}


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """Directories of tiny llava-hf teachers, one per family, written once per session."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for family, kw in FAMILY_KW.items():
        model, proc = tiny_llava(family, n_layer=4, seed=1, **kw)
        out[family] = save_teacher(model, proc, root / family)
    model, tok = tiny_causal_lm("llama", n_layer=4, kv_heads=2, seed=2)
    out["causal-llama"] = save_teacher(model, tok, root / "causal-llama")
    return out


@pytest.fixture
def image():
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(40, 52, 3), dtype=np.uint8))


class _SdpaSpy(TorchFunctionMode):
    """Records, for every sdpa call outside a decode step, whether cuDNN attention was allowed (a mode, not a
    patched function: torch's CausalBias recognises sdpa by identity). Decode steps are left out: their
    shapes are a few buckets, and the compiled step must not trace a context switch."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.decoding = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention and not self.decoding:
            self.seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return func(*args, **(kwargs or {}))

    def around(self, fn):
        def decode(*args, **kwargs):
            self.decoding = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.decoding = False
        return decode


@pytest.fixture
def sdpa_spy():
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with _SdpaSpy() as mode:
        yield mode
    assert torch.backends.cuda.cudnn_sdp_enabled()            # every path restores the caller's setting
