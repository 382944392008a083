"""``make bench``: the benchmark scripts in order (tables on stdout).

    python bench/run.py [CHECKPOINT]   # CHECKPOINT defaults to artifacts/demo/train/checkpoint
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
ckpt = sys.argv[1] if len(sys.argv) > 1 else "artifacts/demo/train/checkpoint"
steps = [[str(here / "size.py")], [str(here / "train_overhead.py")]]
if Path(ckpt).is_dir():
    steps.append([str(here / "cpu_latency.py"), ckpt])
else:
    print(f"(skipping cpu_latency: no checkpoint at {ckpt}; run make demo first)")
for cmd in steps:
    print(f"\n=== {' '.join(Path(c).name for c in cmd)}", flush=True)
    subprocess.run([sys.executable, *cmd], check=True)
