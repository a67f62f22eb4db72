"""How the continuous batcher's attention step should split ragged rows (GPU only; issue 20). Slots of one buffer
sit at different positions (log-uniform, as a long-tailed serving load leaves them); the split-KV step reads each
row's own keys. `attention_plan` sizes its splits for the whole buffer of every row, which gives a long row among
short ones few programs. This times the one-kernel step (`launch_attend`) under that plan and under plans sized
as for one sequence or by a fixed split, checks each against the default plan's output, and reports the keys'
bytes read per microsecond against the copy rate measured in the same run. One JSON line per (batch, buffer,
plan).

    python scripts/ragged-attention-probe.py --out DIR [--batches 4,16] [--lengths 2048,4096]
"""

import argparse
import json
import math
import random
from pathlib import Path

import torch

from matvlm.bench.kernels import ceilings, timed
from matvlm.ops import attention_triton as at
from matvlm.ops.backend import dependent_launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--rotary", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rate = ceilings()["copy_GBps"]
    h, d, r = args.heads, args.head_dim, args.rotary
    rng = random.Random(0)
    rows = []
    for bsz in (int(b) for b in args.batches.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            # positions log-uniform in [16, length): most rows short, a few long (a long-tailed load's slots)
            slots = torch.tensor([min(length - 1, int(math.exp(rng.uniform(math.log(16), math.log(length)))))
                                  for _ in range(bsz)], device=dev)
            qkv = torch.randn(bsz, 3 * h * d, device=dev, dtype=torch.bfloat16)
            angle = torch.rand(bsz, r // 2, device=dev) * 6.3
            cos = torch.cat([angle.cos()] * 2, -1).to(torch.bfloat16)
            sin = torch.cat([angle.sin()] * 2, -1).to(torch.bfloat16)
            keys = torch.randn(bsz, h, length, d, device=dev, dtype=torch.bfloat16)
            values = torch.randn_like(keys)
            mask = torch.arange(length, device=dev)[None] <= slots[:, None]
            read = 2 * h * d * 2 * int((slots + 1).sum())                       # keys and values, bf16
            plans = {"default": at.attention_plan(bsz, h, length, sms),
                     "as one sequence": at.attention_plan(1, h, length, sms)}
            for split in (128, 256, 512):
                plans[f"split {split}"] = {"split_len": split, "block_l": 64, "warps": 1}
            base = None
            for name, plan in plans.items():
                k, v = keys.clone(), values.clone()

                def step(k=k, v=v, plan=plan):
                    return at.launch_attend(qkv, cos, sin, k, v, mask, slots, h, d ** -0.5, sms, plan=plan)

                out = step().float()
                base = out if base is None else base
                us = timed(step, warmup=10, rep=200) * 1e3
                row = {"batch": bsz, "length": length, "plan": name, "split_len": plan["split_len"],
                       "programs": bsz * h * -(-length // plan["split_len"]), "us": round(us, 2),
                       "keys_read_MB": round(read / 1e6, 2), "of_copy_rate": round(read / (us * 1e-6) / 1e9 / rate, 3),
                       "rel_to_default": ((out - base).norm() / base.norm()).item(),
                       "positions": sorted(int(s) + 1 for s in slots)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "ragged-attention.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "copy_GBps": rate, "sms": sms, "pdl": dependent_launch(keys),
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
