"""True checkpoint size vs FP32/FP16 (issue 3's goal): random:roberta-base, preset full.

    python bench/size.py [--model random:roberta-base] [-o artifacts/bench-size]

Prints one table row per configuration and the ratio against FP32:
INT8 (goal >= 3.9x), 4-bit encoder weights with 8-bit embeddings (goal >= 6.5x), and 4-bit
embeddings too (for reference: the embeddings alone are ~39M of roberta-base's 125M params).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qexport.ptq import post_training_quantize
from qexport.report.size import checkpoint_size

CONFIGS = (("int8", 8, 8), ("w4 (emb 8)", 4, 8), ("w4 + emb4", 4, 4), ("w2 (emb 8)", 2, 8))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:roberta-base")
    ap.add_argument("-o", "--out", type=Path, default=Path("artifacts/bench-size"))
    args = ap.parse_args()
    print(f"{'config':<14}{'stored MB':>12}{'FP32 MB':>10}{'FP16 MB':>10}{'vs FP32':>9}{'vs FP16':>9}")
    for name, wb, eb in CONFIGS:
        ck = post_training_quantize(args.model, "full", weight_bits=wb, emb_bits=eb, calib_batches=1,
                                    batch_size=2, max_length=32, out_dir=args.out / name.replace(" ", "_"))
        r = checkpoint_size(ck)
        print(f"{name:<14}{r['bytes'] / 1e6:12.2f}{r['fp32_bytes'] / 1e6:10.2f}{r['fp16_bytes'] / 1e6:10.2f}"
              f"{r['ratio_vs_fp32']:8.2f}x{r['ratio_vs_fp16']:8.2f}x")


if __name__ == "__main__":
    main()
