"""Training: FP fine-tuning then QAT (:func:`train`), resume, DDP, distillation, sweeps.

``train(recipe, out_dir, resume=False, device=None) -> summary dict`` is the entry point
(``qexport train`` and ``python -m qexport.train`` call it); see :mod:`qexport.train.trainer`
for the output directory layout and :mod:`qexport.train.sweep` for ``run_sweep``.
"""

from __future__ import annotations

from qexport.train.trainer import evaluate, evaluate_integer, train

__all__ = ["evaluate", "evaluate_integer", "train"]
