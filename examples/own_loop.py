"""Quantize a Hugging Face classifier and fine-tune it with your own PyTorch loop, then ship it.

    python examples/own_loop.py -o artifacts/own-loop              # FP 200 + QAT 150 steps (slow)
    python examples/own_loop.py --fp-steps 2 --qat-steps 2 --test-limit 32 -o /tmp/x   # smoke run

Flow (the same objects as ``qexport train``): load any BERT/RoBERTa sequence classifier ->
fine-tune in float -> ``qexport.quantize_model`` (in place, preset ``full``) ->
``qexport.calibrate`` -> QAT fine-tune -> ``qexport.save_checkpoint`` (integer checkpoint) ->
``qexport.export_onnx`` -> ``qexport.load_backend`` (ONNX Runtime) -> ``qexport.evaluate`` on the
Rotten Tomatoes test split. Writes ``result.json`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import qexport
from qexport.data.offline import minilm_path


def batches(rows: list, tok, batch_size: int, max_length: int, seed: int):
    """Endless shuffled batches of encoded rows (``input_ids``, ``attention_mask``, ``labels``)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            enc = qexport.encode([rows[j] for j in order[i : i + batch_size]], tok, max_length=max_length)
            yield {k: enc[k] for k in ("input_ids", "attention_mask", "labels")}


def fine_tune(model, data, steps: int, lr: float) -> None:
    """A plain AdamW loop with linear warm-up/decay and gradient clipping."""
    if steps == 0:
        return
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    model.train()
    for step in range(steps):
        loss = model(**next(data)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(minilm_path()), help="HF BERT/RoBERTa directory or hub name")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--fp-steps", type=int, default=200)
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--test-limit", type=int, default=None, help="first N test rows (default: all)")
    ap.add_argument("-o", "--output", type=Path, default=Path("artifacts/own-loop"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    task = qexport.get_task("rt")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=task.num_labels, attn_implementation="eager"
    )
    data = batches(task.load("train"), tok, args.batch_size, args.max_length, seed=0)

    fine_tune(model, data, args.fp_steps, lr=5e-5)                      # 1. float fine-tuning
    qexport.quantize_model(model, args.preset)                          # 2. QAT modules, in place
    n = qexport.calibrate(model, (next(data) for _ in range(8)))        # 3. activation ranges
    print(f"calibrated on {n} batches")
    fine_tune(model, data, args.qat_steps, lr=2e-5)                     # 4. quantization-aware training
    model.eval()

    ckpt = qexport.save_checkpoint(model, args.output / "checkpoint", tokenizer=tok)   # 5. integer
    onnx_file = qexport.export_onnx(ckpt, args.output / "model.onnx")                  # 6. ONNX
    runner = qexport.load_backend(onnx_file, "ort")                                    # 7. backend
    ev = qexport.evaluate(qexport.runner_predictor(runner, "logits"), "rt", tok, "test",
                          limit=args.test_limit, max_length=args.max_length)
    texts = ["a gorgeous, witty, seductive movie.", "the plot is a tired retread and the jokes fall flat."]
    enc = tok(texts, padding=True, return_tensors="np")
    out = runner.run({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    result = {
        "checkpoint": str(ckpt), "onnx": str(onnx_file), "test_examples": ev.examples,
        "integer_accuracy": None if ev.metric is None else round(ev.metric["metric"], 2),
        "predictions": dict(zip(texts, [task.label_names[i] for i in out["logits"].argmax(-1)], strict=True)),
    }
    (args.output / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
