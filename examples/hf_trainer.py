"""Quantize a Hugging Face classifier and fine-tune it with ``transformers.Trainer``, then ship it.

    python examples/hf_trainer.py -o artifacts/hf-trainer          # FP 200 + QAT 150 steps (slow)
    python examples/hf_trainer.py --fp-steps 2 --qat-steps 2 --test-limit 32 -o /tmp/x   # smoke run

The defaults are the recipe ``recipes/rt-minilm-full.yaml``'s: the offline MiniLM on Rotten
Tomatoes, batch 16, max length 64, FP 200 steps at lr 5e-5, then ``qexport.quantize_model``
(preset ``full``), ``qexport.calibrate`` on 8 train batches and QAT 150 steps at lr 2e-5 (warm-up
10 %, weight decay 0.01, gradient clipping 1.0). The quantized model is an ordinary ``nn.Module``,
so the Trainer trains it like any other; then ``qexport.save_checkpoint`` -> ``export_onnx`` ->
``load_backend("ort")`` -> ``qexport.evaluate`` on the test split. Needs ``accelerate`` (the
Trainer's own requirement). Writes ``result.json`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import qexport
from qexport.data.offline import minilm_path


def train_steps(model, dataset, collator, steps: int, lr: float, out: Path) -> None:
    if steps == 0:
        return
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        warmup_steps=int(0.1 * steps), weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
        logging_steps=50, save_strategy="no", report_to="none", seed=0, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(minilm_path()), help="HF BERT/RoBERTa directory or hub name")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--fp-steps", type=int, default=200)
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--test-limit", type=int, default=None, help="first N test rows (default: all)")
    ap.add_argument("-o", "--output", type=Path, default=Path("artifacts/hf-trainer"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    task = qexport.get_task("rt")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=task.num_labels, attn_implementation="eager"
    )
    rows = task.load("train")
    enc = tok([r.text for r in rows], truncation=True, max_length=args.max_length)
    dataset = [{"input_ids": ids, "attention_mask": m, "label": r.label}
               for ids, m, r in zip(enc["input_ids"], enc["attention_mask"], rows, strict=True)]
    collator = DataCollatorWithPadding(tok)

    train_steps(model, dataset, collator, args.fp_steps, 5e-5, args.output / "fp")        # 1. float
    qexport.quantize_model(model, args.preset)                                             # 2. in place
    calib = ({k: v.to(model.device) for k, v in collator(dataset[i : i + 16]).items()}
             for i in range(0, 8 * 16, 16))
    print(f"calibrated on {qexport.calibrate(model, calib)} batches")                      # 3. ranges
    train_steps(model, dataset, collator, args.qat_steps, 2e-5, args.output / "qat")      # 4. QAT
    model.eval()

    ckpt = qexport.save_checkpoint(model.cpu(), args.output / "checkpoint", tokenizer=tok)  # 5. integer
    onnx_file = qexport.export_onnx(ckpt, args.output / "model.onnx")                        # 6. ONNX
    runner = qexport.load_backend(onnx_file, "ort")                                          # 7. backend
    ev = qexport.evaluate(qexport.runner_predictor(runner, "logits"), "rt", tok, "test",
                          limit=args.test_limit, max_length=args.max_length)
    result = {"checkpoint": str(ckpt), "onnx": str(onnx_file), "test_examples": ev.examples,
              "integer_accuracy": None if ev.metric is None else round(ev.metric["metric"], 2)}
    (args.output / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
