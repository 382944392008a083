"""Loading BERT/RoBERTa sequence classifiers: local dirs, hub names, the offline default, random inits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qexport.data.offline import minilm_path
from qexport.errors import ModelError

SUPPORTED_TYPES = ("bert", "roberta")

#: Architectures for size/latency work, random-initialised from their config (no download).
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base": dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
    "roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2),
    # seed 002's "transformer with two encoder layers" for AG_NEWS, trained from scratch (the seed
    # gives no sizes: a small BERT with the offline WordPiece vocabulary)
    "transformer-2l": dict(model_type="bert", vocab_size=30522, hidden_size=256, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512),
    "roberta-large": dict(model_type="roberta", vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                          type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2),
}


def resolve_spec(spec: str) -> str:
    if spec == "minilm":
        return str(minilm_path())
    return spec


def load_model(spec: str, num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a BERT/RoBERTa ``*ForSequenceClassification``.

    ``spec``: a local directory, a hub name (needs the network), ``minilm``
    (offline default, 6 layers x 384), or ``random:bert-base`` /
    ``random:roberta-base`` / ``random:roberta-large`` / ``random:transformer-2l`` (random init from the
    architecture; the tokenizer is the offline WordPiece one, whose ids are
    valid in both vocabularies). The tokenizer is also attached as
    ``model.qexport_tokenizer`` so checkpoints can carry it.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        if arch not in RANDOM_CONFIGS:
            raise ModelError(f"unknown random architecture {arch!r}: choose {', '.join(RANDOM_CONFIGS)}")
        kw = dict(RANDOM_CONFIGS[arch])
        cfg = AutoConfig.for_model(kw.pop("model_type"), num_labels=num_labels, **kw)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    else:
        path = resolve_spec(spec)
        local = Path(path).expanduser()
        if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise ModelError(f"model path does not exist: {spec}")
        try:
            cfg = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
        if cfg.model_type not in SUPPORTED_TYPES:
            raise ModelError(
                f"unsupported model type {cfg.model_type!r} in {spec!r}: qexport supports BERT and RoBERTa"
            )
        try:
            torch.manual_seed(seed)  # the fresh classifier head is seeded
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, attn_implementation="eager"
            )
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    model.qexport_tokenizer = tok
    return model, tok
