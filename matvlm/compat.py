"""Names that moved between the transformers releases matvlm supports (README, "Supported dependency
versions"), resolved once here so no module reaches for a version-specific name itself."""

try:  # transformers >= 5 names the PIL-backed processor explicitly (the other one needs torchvision)
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # pragma: no cover - older releases: the class is PIL-backed under its plain name
    from transformers import SiglipImageProcessor

__all__ = ["SiglipImageProcessor"]
