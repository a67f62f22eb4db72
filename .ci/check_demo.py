"""Fail CI when the demo's student keeps less than --min-kept of its teacher's held-out accuracy."""

import argparse
import json
import sys

p = argparse.ArgumentParser()
p.add_argument("summary")
p.add_argument("--min-kept", type=float, required=True)
a = p.parse_args()
try:
    d = json.load(open(a.summary))
    teacher, student = d["teacher"]["overall"], d["student"]["overall"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"cannot read the demo's result from {a.summary}: {e}")
kept = student / teacher if teacher else 0.0
print(f"demo: teacher {teacher:.1%}, student {student:.1%}, kept {kept:.1%} (needs >= {a.min_kept:.0%}); "
      f"wall time {d['seconds']:.0f} s")
if kept < a.min_kept:
    sys.exit(f"the demo's student keeps {kept:.1%} of its teacher, under {a.min_kept:.0%}")
