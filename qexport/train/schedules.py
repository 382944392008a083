"""Precision schedules: cyclic precision (CPT, seed 004), latent quantization (seed 002), IR-Net's EDE.

Everything here is a pure function of the global optimizer step, so a resumed
run gets the same bits, switch and ``(t, k)`` as an uninterrupted one.
:class:`QuantController` applies them to a model once per step.

CPT (Fu et al. 2021, "CPT: efficient deep neural network training via cyclic
precision"): the weight precision sweeps from ``min_bits`` to ``max_bits`` in
each of ``num_cycles`` equal periods,
``bits = rint(min + (max - min) * (1 - cos(pi * f)) / 2)`` with ``f`` the
position in the period (CPT's "cosine" schedule; ``triangular`` goes up and
back down linearly). Evaluation and export use ``eval_bits`` (default
``max_bits``). Seed 004's five settings are ``"4-8"``, ``"4-16"``, ``"8-16"``,
``"8"`` and ``"16"`` (weights; activations fixed at 16 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from qexport.errors import ConfigError
from qexport.quant.quantizers import ede_t_k

SHAPES = ("cosine", "triangular")


class BitSchedule(Protocol):
    def bits_at(self, step: int) -> int: ...

    @property
    def eval_bits(self) -> int: ...


@dataclass(frozen=True)
class FixedPrecision:
    """The control: the same bits at every step."""

    bits: int

    def bits_at(self, step: int) -> int:
        return self.bits

    @property
    def eval_bits(self) -> int:
        return self.bits


@dataclass(frozen=True)
class CyclicPrecision:
    """CPT: ``num_cycles`` cycles between ``min_bits`` and ``max_bits`` over ``total_steps``.

    Steps at or beyond ``total_steps`` get ``eval_bits``. The bounds are reached
    in every cycle as long as a period has at least ``2 * (max - min)`` steps.
    """

    min_bits: int
    max_bits: int
    total_steps: int
    num_cycles: int = 8
    shape: str = "cosine"
    final_bits: int | None = None

    def __post_init__(self) -> None:
        if not 1 < self.min_bits < self.max_bits <= 32:
            raise ConfigError(
                f"cyclic precision needs 1 < min_bits < max_bits, got {self.min_bits}-{self.max_bits}"
            )
        if self.total_steps < 1 or self.num_cycles < 1:
            raise ConfigError("cyclic precision needs total_steps >= 1 and num_cycles >= 1")
        if self.shape not in SHAPES:
            raise ConfigError(f"cyclic precision shape must be {' or '.join(SHAPES)}, got {self.shape!r}")

    @property
    def period(self) -> float:
        return self.total_steps / self.num_cycles

    @property
    def eval_bits(self) -> int:
        return self.final_bits if self.final_bits is not None else self.max_bits

    def level(self, step: int) -> float:
        """Position between the bounds in ``[0, 1]`` (0 = ``min_bits``)."""
        f = (step % self.period) / self.period
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * f))
        return 1.0 - abs(2.0 * f - 1.0)

    def bits_at(self, step: int) -> int:
        if step >= self.total_steps:
            return self.eval_bits
        # round half to even, like CPT's np.rint
        return int(round(self.min_bits + (self.max_bits - self.min_bits) * self.level(max(step, 0))))


def parse_bit_schedule(
    spec: str | int,
    total_steps: int,
    num_cycles: int = 8,
    shape: str = "cosine",
    final_bits: int | None = None,
) -> FixedPrecision | CyclicPrecision:
    """``"8"`` / ``8`` -> fixed; ``"4-8"``, ``"4-16"``, ``"8-16"`` -> cyclic (CPT)."""
    s = str(spec).strip()
    try:
        if "-" in s:
            lo, hi = (int(x) for x in s.split("-", 1))
            return CyclicPrecision(lo, hi, total_steps, num_cycles, shape, final_bits)
        return FixedPrecision(int(s))
    except ValueError:
        raise ConfigError(
            f"bad bit schedule {spec!r}: use 'B' (fixed) or 'LO-HI' (cyclic), e.g. '4-8'"
        ) from None


@dataclass(frozen=True)
class LatentSchedule:
    """Latent quantization (seed 002): full precision before ``switch_step``, quantized from it on."""

    switch_step: int = 0

    @classmethod
    def from_epochs(cls, epochs: float, steps_per_epoch: int) -> LatentSchedule:
        return cls(int(round(epochs * steps_per_epoch)))

    def quantized_at(self, step: int) -> bool:
        return step >= self.switch_step


@dataclass(frozen=True)
class EDESchedule:
    """IR-Net's error-decay estimator: ``t`` from ``t_min`` to ``t_max`` (log scale), ``k = max(1/t, 1)``."""

    total_steps: int
    t_min: float = 0.1
    t_max: float = 10.0

    def t_k_at(self, step: int) -> tuple[float, float]:
        return ede_t_k(step / max(self.total_steps, 1), self.t_min, self.t_max)


class QuantController:
    """Applies the schedules to a model prepared by :func:`qexport.quant.groups.apply_weight_quantization`.

    Call :meth:`on_step` with the global step before each training forward and
    :meth:`on_eval` before evaluating or exporting. Both return the state for
    logging (``quantized``, ``weight_bits``, ``ede_t``, ``ede_k``). The quantizers'
    bits/enabled/``(t, k)`` are plain attributes (not in the state dict): after a
    resume, the first :meth:`on_step` restores them from the step.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: BitSchedule | None = None,
        latent: LatentSchedule | None = None,
        ede: EDESchedule | None = None,
        reinit_on_switch: bool = True,
    ) -> None:
        self.model = model
        self.bits = bits
        self.latent = latent
        self.ede = ede
        self.reinit_on_switch = reinit_on_switch
        self._quantized: bool | None = None
        self._bits: int | None = None

    def _set_quantized(self, on: bool) -> None:
        from qexport.quant.groups import set_quant_enabled

        if on != self._quantized:
            # re-initialise learned quantizer state (LSQ's step) only when switching on after a
            # float phase seen by this controller: never on the first call (fresh start or resume)
            reinit = on and self._quantized is False and self.reinit_on_switch
            set_quant_enabled(self.model, on, reinit=reinit)
            self._quantized = on

    def _set_bits(self, b: int) -> None:
        from qexport.quant.groups import set_weight_bits

        if b != self._bits:
            set_weight_bits(self.model, b)
            self._bits = b

    def on_step(self, step: int) -> dict[str, Any]:
        from qexport.quant.groups import set_ede

        state: dict[str, Any] = {}
        if self.latent is not None:
            on = self.latent.quantized_at(step)
            self._set_quantized(on)
            state["quantized"] = on
        if self.bits is not None:
            b = self.bits.bits_at(step)
            self._set_bits(b)
            state["weight_bits"] = b
        if self.ede is not None:
            t, k = self.ede.t_k_at(step)
            set_ede(self.model, t, k)
            state["ede_t"], state["ede_k"] = t, k
        return state

    def on_eval(self) -> dict[str, Any]:
        """Final precision for evaluation/export: quantization on (if latent), ``eval_bits``."""
        from qexport.quant.groups import set_ede

        state: dict[str, Any] = {}
        if self.latent is not None:
            self._set_quantized(True)
            state["quantized"] = True
        if self.bits is not None:
            self._set_bits(self.bits.eval_bits)
            state["weight_bits"] = self.bits.eval_bits
        if self.ede is not None:
            t, k = self.ede.t_k_at(self.ede.total_steps)
            set_ede(self.model, t, k)
        return state
