"""Knowledge distillation from the full-precision teacher (TernaryBERT, seed 003).

TernaryBERT trains the quantized student with ``L = L_pred + L_trm``:
``L_pred`` the soft cross-entropy between student and teacher logits,
``L_trm`` the sum over layers of the MSE between hidden states (embedding
output included) and between attention maps. :class:`DistillLoss` computes
each part with its own weight (0 switches a part off; seed 003 ablates
logits / "Trm" / hidden / attention) plus an optional hard-label cross-entropy.

Inputs are Hugging Face outputs of ``model(..., output_hidden_states=True,
output_attentions=True)``. HF returns attention *probabilities* (after the
softmax), so the attention part is the MSE of probabilities, not of the
pre-softmax scores TinyBERT/TernaryBERT used (the qexport student's softmax
is i-softmax and its probabilities are on the 1/127 grid, which is what the
integer model computes). The teacher is detached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from qexport.errors import ConfigError

PARTS = ("logits", "hidden", "attention", "ce")


@dataclass(frozen=True)
class DistillWeights:
    """Weight of each part; 0 disables it (TernaryBERT: logits 1, hidden 1, attention 1, ce 0)."""

    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    ce: float = 0.0

    @classmethod
    def of(cls, w: DistillWeights | Mapping[str, float] | None) -> DistillWeights:
        if w is None:
            return cls()
        if isinstance(w, DistillWeights):
            return w
        unknown = set(w) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown distillation part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}"
            )
        return cls(**{k: float(v) for k, v in w.items()})

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"distillation weight {f.name} must be >= 0")


def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 * mean_b( -sum_c softmax(t/T) log_softmax(s/T) )`` (Hinton; TernaryBERT with T = 1)."""
    t = temperature
    p = F.softmax(teacher.detach() / t, dim=-1)
    return -(p * F.log_softmax(student / t, dim=-1)).sum(dim=-1).mean() * (t * t)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with ``mask`` [B, S] (1 = real token) only over real positions.

    ``a``/``b`` are [B, S, H] (hidden states) or [B, heads, S, S] (attention, masked by query row).
    """
    if mask is None:
        return F.mse_loss(a, b)
    m = mask.to(a.dtype)
    m = m[:, :, None] if a.dim() == 3 else m[:, None, :, None]
    m = m.expand_as(a)
    return ((a - b) ** 2 * m).sum() / m.sum().clamp(min=1.0)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher index for each student index (uniform, TinyBERT): equal depths map 1:1."""
    if n_student == n_teacher:
        return list(range(n_student))
    if n_student < 1 or n_teacher % n_student:
        raise ConfigError(f"cannot map {n_student} student layers onto {n_teacher} teacher layers")
    r = n_teacher // n_student
    return [(i + 1) * r - 1 for i in range(n_student)]


class DistillLoss:
    """``DistillLoss(weights, temperature)(student_out, teacher_out, labels) -> (loss, parts)``.

    ``parts`` maps each enabled part (``logits``, ``hidden``, ``attention``, ``ce``)
    to its unweighted value (a float) and ``total`` to the weighted sum. Hidden
    states: the sum over the ``L + 1`` states (embeddings and every layer) of the
    per-layer MSE; attention: the sum over the ``L`` layers. Student and teacher
    may differ in depth when the teacher's is a multiple (uniform mapping; the
    embedding output maps to the embedding output); widths must match.
    Regression heads (one logit) use MSE on the logits instead of soft CE.
    ``attention_mask`` (optional) restricts the MSEs to real tokens.
    """

    def __init__(
        self, weights: DistillWeights | Mapping[str, float] | None = None, temperature: float = 1.0
    ) -> None:
        self.weights = DistillWeights.of(weights)
        if temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @property
    def needs_hidden_states(self) -> bool:
        return self.weights.hidden > 0

    @property
    def needs_attentions(self) -> bool:
        return self.weights.attention > 0

    @property
    def needs_teacher(self) -> bool:
        w = self.weights
        return w.logits > 0 or w.hidden > 0 or w.attention > 0

    def forward_kwargs(self) -> dict[str, bool]:
        """Keyword arguments for both models' forward calls."""
        return {"output_hidden_states": self.needs_hidden_states, "output_attentions": self.needs_attentions}

    @staticmethod
    def _seq(out: Any, key: str, who: str) -> Sequence[torch.Tensor]:
        v = _get(out, key)
        if not v or any(x is None for x in v):
            flag = "output_hidden_states" if key == "hidden_states" else "output_attentions"
            hint = " and attn_implementation='eager' (sdpa returns none)" if key == "attentions" else ""
            raise ConfigError(f"distillation needs the {who}'s {key}: call the model with {flag}=True{hint}")
        return v

    def _stack_loss(
        self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor], offset: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # offset 1: hidden states (index 0 = embeddings maps to 0), 0: attentions
        ns, nt = len(s) - offset, len(t) - offset
        idx = layer_map(ns, nt)
        pairs = [(s[i + offset], t[j + offset]) for i, j in enumerate(idx)]
        if offset:
            pairs.insert(0, (s[0], t[0]))
        total = s[0].new_zeros(())
        for a, b in pairs:
            if a.shape != b.shape:
                raise ConfigError(f"student/teacher shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
            total = total + _masked_mse(a, b.detach(), mask)
        return total

    def __call__(
        self,
        student_out: Any,
        teacher_out: Any,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        s_logits = _get(student_out, "logits")
        if s_logits is None:
            raise ConfigError("student output has no logits")
        loss = s_logits.new_zeros(())
        parts: dict[str, float] = {}
        if w.logits > 0:
            t_logits = _get(teacher_out, "logits")
            if t_logits is None:
                raise ConfigError("teacher output has no logits")
            if s_logits.shape[-1] == 1:
                part = F.mse_loss(s_logits, t_logits.detach())
            else:
                part = soft_cross_entropy(s_logits, t_logits, self.temperature)
            loss = loss + w.logits * part
            parts["logits"] = float(part.detach())
        if w.hidden > 0:
            part = self._stack_loss(
                self._seq(student_out, "hidden_states", "student"),
                self._seq(teacher_out, "hidden_states", "teacher"), 1, attention_mask,
            )
            loss = loss + w.hidden * part
            parts["hidden"] = float(part.detach())
        if w.attention > 0:
            part = self._stack_loss(
                self._seq(student_out, "attentions", "student"),
                self._seq(teacher_out, "attentions", "teacher"), 0, attention_mask,
            )
            loss = loss + w.attention * part
            parts["attention"] = float(part.detach())
        if w.ce > 0:
            if labels is None:
                raise ConfigError("distillation weight ce > 0 needs labels")
            if s_logits.shape[-1] == 1:
                part = F.mse_loss(s_logits.squeeze(-1), labels.to(s_logits.dtype))
            else:
                part = F.cross_entropy(s_logits, labels)
            loss = loss + w.ce * part
            parts["ce"] = float(part.detach())
        parts["total"] = float(loss.detach())
        return loss, parts
