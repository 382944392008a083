"""Write the recipes of the seeds' experiment tables into ``recipes/seeds/`` (one file per cell).

    python tools/make_seed_recipes.py            # (re)write them
    python tools/make_seed_recipes.py --check    # exit 1 if a file is missing or differs

Seed 002 (AG_NEWS, a 2-layer transformer trained from scratch, 10 epochs): basic vs fully
quantization at 8/4/2 bits; basic and IR-Net binarization of MHA/FFN/CLS/ALL/ALL_QK; the last
linear binarized too (the collapse the seed found); pre-trained init and latent quantization.
Seed 003 (RoBERTa-base, SST-2 and RTE; CoLA for KD): LSQ 4- and 2-bit weights on FFN, EMB, QKV and
their unions; PACT 4-bit FFN (init clip 1, lr scale 1000/100/10); 2-bit FFN with the TernaryBERT
distillation parts ablated. Seed 004 (RoBERTa-base, GLUE): PTQ (calibration only) at 4 and 8 bits
on all / MHA / FFN; cyclic precision training (CPT) 4-8, 4-16, 8-16 and fixed 8 with 16-bit
activations, 5 epochs.

Every quantized layer outside the selected groups stays 8-bit (``rest: int8``) so each result
deploys integer-only; the seeds kept the rest in float. 16-bit weights (seed 004's fixed-16
control, and the top of the 4-16/8-16 cycles at deployment) have no integer-only deployment: the
cyclic recipes deploy 8 bits. The tests check these files are what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "seeds"

GLUE_FP_LR = {"sst2": 1.0e-5, "mnli": 1.0e-5, "cola": 1.0e-5, "rte": 2.0e-5}  # = recipes/glue-*-fp.yaml
GLUE_EVAL_EVERY = {"sst2": 1000, "mnli": 5000, "cola": 200, "rte": 50}
GROUPS_003 = {"ffn": "FFN", "emb": "EMB", "qkv": "QKV", "ffn+emb": "FFN+EMB", "emb+qkv": "EMB+QKV",
              "ffn+qkv": "FFN+QKV", "all": "FFN+EMB+QKV"}
# seed 003's KD ablation columns -> DistillConfig weights
KD_PARTS = {
    "nokd": None,
    "kd": {"logits": 1.0, "hidden": 1.0, "attention": 1.0},     # Trm + Logits
    "kd-logits": {"logits": 1.0, "hidden": 0.0, "attention": 0.0},
    "kd-trm": {"logits": 0.0, "hidden": 1.0, "attention": 1.0},
    "kd-output": {"logits": 0.0, "hidden": 1.0, "attention": 0.0},
    "kd-atts": {"logits": 0.0, "hidden": 0.0, "attention": 1.0},
}


def glue(task: str, quant: dict[str, Any], *, qat_epochs: float = 3, qat_lr: float = 1.0e-5,
         fp_epochs: float = 10, distill: dict[str, float] | None = None, calib: int = 16) -> dict[str, Any]:
    """RoBERTa-base on a GLUE task: I-BERT's FP stage (shared by every recipe of the task, so a sweep
    trains it once), then the experiment's QAT stage."""
    rec: dict[str, Any] = {
        "version": 1, "model": "roberta-base", "task": task, "max_length": 128, "quant": quant,
        "fp": {"epochs": fp_epochs, "lr": GLUE_FP_LR[task], "batch_size": 32, "warmup_ratio": 0.06,
               "weight_decay": 0.1},
        "qat": {"epochs": qat_epochs, "lr": qat_lr, "batch_size": 32, "warmup_ratio": 0.06,
                "weight_decay": 0.1, "calib_batches": calib},
        "train": {"eval_every": GLUE_EVAL_EVERY[task], "save_every": 500, "grad_clip": 1.0, "seed": 0,
                  "device": "auto", "eval_split": "dev", "test_split": "dev"},
    }
    if distill is not None:
        rec["distillation"] = {"enabled": True, "ce": 1.0, "temperature": 1.0, **distill}
    return rec


def ag_news(quant: dict[str, Any], *, pretrained: bool = False) -> dict[str, Any]:
    """Seed 002: the 2-layer transformer on AG_NEWS, 10 epochs; quantized from scratch unless
    ``pretrained`` (FP training first, then QAT from it: the seed's pre-trained initialisation)."""
    rec: dict[str, Any] = {
        "version": 1, "model": "random:transformer-2l", "task": "ag_news", "max_length": 128, "quant": quant,
        "fp": {"epochs": 10 if pretrained or quant["preset"] == "fp" else 0, "lr": 1.0e-4, "batch_size": 64,
               "warmup_ratio": 0.05, "weight_decay": 0.01},
        "qat": {"epochs": 10, "lr": 1.0e-4, "batch_size": 64, "warmup_ratio": 0.05, "weight_decay": 0.01,
                "calib_batches": 8},
        "train": {"eval_every": 1000, "save_every": 500, "grad_clip": 1.0, "seed": 0, "device": "auto",
                  "eval_split": "dev", "test_split": "test"},
    }
    return rec


def full(**weights: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"preset": "full", "weight_bits": 8, "act_bits": 8}
    if weights:
        q["weights"] = weights
    return q


def recipes() -> dict[str, tuple[str, dict[str, Any]]]:
    """``{relative path: (comment, recipe)}``."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    # ---- seed 002
    out["002/ag_news-transformer2l-fp.yaml"] = (
        "Seed 002 baseline: the 2-layer transformer in full precision.", ag_news({"preset": "fp"}))
    for mode in ("basic", "fully"):
        for bits in (8, 4, 2):
            what = "weights only" if mode == "basic" else "weights and activations"
            out[f"002/ag_news-transformer2l-{mode}{bits}.yaml"] = (
                f"Seed 002 experiment 1: {mode} quantization ({what}), {bits}-bit, from scratch.",
                ag_news(full(groups="ALL", quantizer="minmax", bits=bits, mode=mode)))
    for method, q in (("basic", "binary"), ("ir", "ir-net")):
        for pattern in ("MHA", "FFN", "CLS", "ALL", "ALL_QK"):
            out[f"002/ag_news-transformer2l-bin-{method}-{pattern.lower()}.yaml"] = (
                f"Seed 002 experiments 1-2: {q} binarization of {pattern} "
                "(the classifier's last linear kept), from scratch.",
                ag_news(full(groups=pattern, quantizer=q, bits=1, mode="basic")))
    out["002/ag_news-transformer2l-bin-ir-all-last.yaml"] = (
        "Seed 002 improvement 1: the last linear binarized too (the seed saw training collapse).",
        ag_news(full(groups="ALL", quantizer="ir-net", bits=1, mode="basic", keep_last=False)))
    out["002/ag_news-transformer2l-bin-ir-all_qk-pretrained.yaml"] = (
        "Seed 002 experiment 3: IR-Net ALL_QK from the pre-trained full-precision model.",
        ag_news(full(groups="ALL_QK", quantizer="ir-net", bits=1, mode="basic"), pretrained=True))
    latent = ag_news(full(groups="ALL_QK", quantizer="ir-net", bits=1, mode="basic"))
    latent["quant"]["schedule"] = {"latent_steps": 1875}  # one epoch: 120k examples / 64
    out["002/ag_news-transformer2l-bin-ir-all_qk-latent.yaml"] = (
        "Seed 002 experiment 3: latent quantization (full precision for the first epoch, "
        "then IR-Net ALL_QK).",
        latent)
    # ---- seed 003
    for task in ("sst2", "rte"):
        for bits in (4, 2):
            for slug, groups in GROUPS_003.items():
                out[f"003/glue-{task}-roberta-base-lsq{bits}-{slug}.yaml"] = (
                    f"Seed 003: LSQ {bits}-bit weights on {groups} (QAT after FP fine-tuning).",
                    glue(task, full(groups=groups, quantizer="lsq", bits=bits)))
    for scale, wd in ((1000.0, 0.5), (100.0, 0.5), (10.0, 0.4)):
        out[f"003/glue-sst2-roberta-base-pact4-ffn-lr{int(scale)}.yaml"] = (
            f"Seed 003: PACT 4-bit FFN weights, init clip 1, clip lr scale {scale:g}, "
            f"clip weight decay {wd:g}.",
            glue("sst2", full(groups="FFN", quantizer="pact", bits=4,
                              options={"init": 1.0, "lr_scale": scale, "weight_decay": wd})))
    for task in ("sst2", "cola", "rte"):
        for slug, parts in KD_PARTS.items():
            out[f"003/glue-{task}-roberta-base-lsq2-ffn-{slug}.yaml"] = (
                f"Seed 003 KD table: 2-bit FFN weights, distillation {slug} (TernaryBERT's parts).",
                glue(task, full(groups="FFN", quantizer="lsq", bits=2), distill=parts))
    # ---- seed 004
    for task in ("sst2", "cola", "rte", "mnli"):
        for bits in (8, 4):
            for slug, groups in (("all", "ALL"), ("mha", "MHA"), ("ffn", "FFN")):
                q = full(groups=groups, quantizer="minmax", bits=bits)
                q["weight_bits"] = 8
                out[f"004/glue-{task}-roberta-base-ptq{bits}-{slug}.yaml"] = (
                    f"Seed 004 experiment 1: post-training quantization, {bits}-bit {groups} weights, "
                    "EMA activation ranges from 64 calibration batches, no training.",
                    glue(task, q, qat_epochs=0, calib=64))
        for cyc in ("4-8", "4-16", "8-16", "8"):
            q = {"preset": "full", "weight_bits": 8, "act_bits": 16,
                 "weights": {"groups": "ALL", "quantizer": "minmax", "bits": 8}}
            if cyc != "8":
                q["schedule"] = {"cyclic": cyc, "cycles": 8}
            out[f"004/glue-{task}-roberta-base-cpt-{cyc}.yaml"] = (
                f"Seed 004 experiment 2: {'cyclic precision ' + cyc if cyc != '8' else 'fixed 8-bit'} "
                "weights, "
                "16-bit activations, 5 epochs; deployed at 8 bits.",
                glue(task, q, qat_epochs=5, qat_lr=1.0e-5))
    return out


def render(comment: str, rec: dict[str, Any]) -> str:
    head = f"# {comment}\n# Generated by tools/make_seed_recipes.py: edit the script, not this file.\n"
    return head + yaml.safe_dump(rec, sort_keys=False, default_flow_style=None, width=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a file is missing or differs")
    args = ap.parse_args(argv)
    bad = []
    for rel, (comment, rec) in recipes().items():
        path = ROOT / rel
        text = render(comment, rec)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                bad.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if bad:
        print(f"out of date: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
              "(run python tools/make_seed_recipes.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
