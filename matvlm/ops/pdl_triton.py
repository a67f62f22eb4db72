"""Programmatic dependent launch for matvlm's Triton decode kernels (`backend.dependent_launch` says when
it is on). A kernel launched with `launch_options(True)` must call `after_previous(True)` in every
program before it reads or writes anything an earlier kernel may write, or still read. Imported only
when triton is installed."""

import triton
import triton.language as tl


def _launch_option() -> bool:
    """Whether this Triton's CUDA backend takes the `launch_pdl` launch option (a build with the
    `griddepcontrol` intrinsics but not the option would refuse the keyword at launch)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_cuda = getattr(getattr(tl, "extra", None), "cuda", None)
AVAILABLE = hasattr(_cuda, "gdc_wait") and hasattr(_cuda, "gdc_launch_dependents") and _launch_option()


@triton.jit
def after_previous(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has completed and its writes are visible, then allow
    the next kernel to launch (it does once every program of this one has passed this point; its programs
    then take SM slots as this one's free them, and wait in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """The launch keywords (and the kernel's PDL constexpr) for a launch with or without PDL."""
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}
