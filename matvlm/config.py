"""Typed configuration of a hybrid model's Mamba-2 layers.

`HybridConfig` is what `mamba_config.json` holds. Its JSON form carries the
MaTVLM-compatible fields (per the released MaTVLM_0_25_Mamba2 `mamba_config.json`:
`d_model`, `d_inner`, `d_xb`, `ssm_cfg{expand, ngroups, d_state}`, `attn_layers`,
`n_layer`) plus the explicit fields matvlm itself reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FORMAT_VERSION = 1


@dataclass
class HybridConfig:
    """Shape and placement of the Mamba-2 mixers in a hybrid decoder.

    Attributes:
        n_layer: number of decoder layers.
        mamba_layers: indices of the layers whose attention is a Mamba-2 mixer (sorted).
        d_model: decoder hidden size.
        nheads, headdim: Mamba-2 heads; d_inner = nheads * headdim (the attention's
            num_heads * head_dim when converted).
        ngroups, d_state: B/C groups and state size (the attention's heads and head_dim).
        d_conv: causal depthwise conv kernel over [x, B, C].
        in_proj_bias, out_proj_bias: whether in_proj / out_proj carry a bias (the
            teacher's q/k/v and o biases when converted; False in MaTVLM's release).
        norm_eps: epsilon of the gated RMSNorm.
        dt_min, dt_max, dt_init_floor, a_init_min, a_init_max: standard Mamba-2 init ranges.
        source: free-form provenance (teacher path, format, placement) for humans.
    """

    n_layer: int
    mamba_layers: list[int]
    d_model: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    d_conv: int = 4
    in_proj_bias: bool = False
    out_proj_bias: bool = False
    norm_eps: float = 1e-5
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mamba_layers = sorted(int(i) for i in self.mamba_layers)
        if self.n_layer < 1:
            raise ValueError(f"n_layer must be >= 1, got {self.n_layer}")
        bad = [i for i in self.mamba_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"Mamba layer indices {bad} are outside 0..{self.n_layer - 1}")
        if len(set(self.mamba_layers)) != len(self.mamba_layers):
            raise ValueError(f"Mamba layer indices repeat: {self.mamba_layers}")
        for name in ("d_model", "nheads", "headdim", "ngroups", "d_state", "d_conv"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups ({self.ngroups}) must divide nheads ({self.nheads})")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def attn_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if i not in set(self.mamba_layers)]

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x (d_inner) + B and C (ngroups * d_state each)."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        """Rows of in_proj: [z | x | B | C | dt]."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    # --- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        # MaTVLM / MambaInLlama-compatible fields (x and B are not shared across heads
        # here, so d_xb == d_inner).
        d.update(
            d_inner=self.d_inner,
            d_xb=self.d_inner,
            attn_layers=self.attn_layers,
            ssm_cfg={"expand": self.d_inner / self.d_model, "ngroups": self.ngroups,
                     "d_state": self.d_state, "headdim": self.headdim},
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        if "mamba_layers" in d and "nheads" in d:     # written by matvlm
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        return cls.from_matvlm_upstream(d)

    @classmethod
    def from_matvlm_upstream(cls, d: dict) -> "HybridConfig":
        """Read the `mamba_config.json` of MaTVLM's released checkpoints."""
        try:
            n_layer = int(d["n_layer"])
            attn = set(int(i) for i in d["attn_layers"])
            ssm = d.get("ssm_cfg", {})
            d_model = int(d["d_model"])
            d_inner = int(d.get("d_inner", d_model * ssm.get("expand", 1)))
            d_state = int(ssm["d_state"])
            ngroups = int(ssm.get("ngroups", 1))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"mamba_config.json is missing or has a bad field: {e}") from e
        d_xb = int(d.get("d_xb", d_inner))
        if d_xb != d_inner:
            raise ValueError(f"mamba_config.json has d_xb={d_xb} < d_inner={d_inner} (x/B shared across "
                             "heads, MambaInLlama style); matvlm supports d_xb == d_inner only")
        headdim = int(ssm.get("headdim", d_state))
        return cls(n_layer=n_layer, mamba_layers=[i for i in range(n_layer) if i not in attn],
                   d_model=d_model, nheads=d_inner // headdim, headdim=headdim, ngroups=ngroups,
                   d_state=d_state, d_conv=int(ssm.get("d_conv", 4)),
                   source={"format": "matvlm-upstream"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HybridConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)
