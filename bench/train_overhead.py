"""FP vs QAT training step time for MiniLM on Rotten Tomatoes batches (goal: QAT/FP <= 2.0).

    python bench/train_overhead.py [--steps 20] [--warmup 3] [--batch 32] [--max-length 64]
                                   [--presets linear,full] [--threads N] [--device cpu]

One step = forward + cross-entropy + backward + AdamW step, exactly as the trainer does it
(dropout on). Reports the median over ``--steps`` steps after ``--warmup`` steps, per preset,
and the ratio to FP. Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_times(model, batches, device, steps: int, warmup: int) -> list[float]:  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        b = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        sync()
        t = time.perf_counter()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = F.cross_entropy(out.logits.float(), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--presets", default="linear,full")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from qexport.data import get_task
    from qexport.models import load_model
    from qexport.quant import calibrate, quantize_model
    from qexport.train.batches import EpochOrder, encode_split

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, tok = load_model(args.model)
    train = encode_split(get_task("rt").load("train"), tok, args.max_length)
    order = EpochOrder(len(train), args.batch, seed=0).epoch(0)
    batches = [train.batch(ix) for ix in order[: args.steps + args.warmup]]

    rows = []
    model, _ = load_model(args.model)
    fp = statistics.median(step_times(model, batches, device, args.steps, args.warmup))
    rows.append(("fp", fp, 1.0))
    for preset in [p for p in args.presets.split(",") if p]:
        model, _ = load_model(args.model)
        quantize_model(model, preset)
        calibrate(model, batches[:4])
        t = statistics.median(step_times(model, batches, device, args.steps, args.warmup))
        rows.append((preset, t, t / fp))

    print(
        f"{args.model}, rt batches of {args.batch} x <= {args.max_length} tokens, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print("| preset | step time (ms) | QAT/FP |\n|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t * 1e3:.1f} | {r:.2f} |")
    worst = max(r for _, _, r in rows)
    print(
        f"\nworst QAT/FP step-time ratio: {worst:.2f} (goal <= 2.0: {'met' if worst <= 2.0 else 'NOT met'})"
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "device": str(device),
                "fp_ms": fp * 1e3,
                "ratios": {n: r for n, _, r in rows},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
