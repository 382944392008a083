"""The two-stage trainer: FP fine-tuning, then QAT fine-tuning initialised from its best model.

Contract of :func:`train` (``out_dir`` layout)::

    fp/                  best FP model (HF save_pretrained + tokenizer): the QAT init and teacher
    qat/best.pt          best QAT model state (fake-quant modules, activation ranges)
    checkpoint/          best QAT model as an integer checkpoint (qexport.quant.save_checkpoint)
    state/train_state.pt resumable training state (every ``train.save_every`` steps, atomic)
    metrics.json         one row per evaluation: stage, step, loss, eval_loss, metric, wall_time
    training_curve.png   loss and dev metric over steps
    summary.json         fp / qat / int metrics, step times and ``qat_step_time_ratio``

Stages: AdamW (no decay on biases and LayerNorm weights), linear warm-up then
linear decay, gradient clipping, evaluation on the dev split every
``train.eval_every`` steps and at the end of the stage, best model kept.
The QAT stage swaps in the quant modules (``quantize_model``), calibrates the
activation ranges on ``qat.calib_batches`` train batches, then trains; with
``qat.init_from`` it starts from that HF model directory instead of the FP stage.

Determinism: every stage starts from ``seed_everything(seed + 1000 * stage + rank)``
after its model is built; the batch order is a seeded ``DistributedSampler``;
a resumed run restores model, optimizer, scheduler, RNG states and data
position, so on CPU it ends bitwise equal to an uninterrupted run.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DDP (gloo on CPU, nccl on CUDA); each process reads its shard of every epoch;
rank 0 alone evaluates, logs, draws the progress bar and writes files.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qexport.config import Recipe, stage_has_work
from qexport.errors import CheckpointError, ConfigError, DataError
from qexport.io import atomic_directory, atomic_write_json
from qexport.train.batches import EncodedSplit, EpochOrder, encode_split
from qexport.train.state import (
    load_state,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
)

STAGE_INDEX = {"fp": 0, "qat": 1}
#: Recipe keys that may change between a run and its resume.
RESUME_MUTABLE = {("train", "device"), ("train", "log_every"), ("train", "save_every"), ("name",)}
#: Steps left out of the mean step time (allocator / first-call warm-up).
TIMING_WARMUP = 3


# ----------------------------------------------------------------------------- process context


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out


def init_distributed(device_pref: str) -> Dist:
    """Join the process group when launched by ``torchrun`` with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not td.is_initialized():
        use_cuda = device_pref != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        td.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(world_size=td.get_world_size(), rank=td.get_rank(), local_rank=local, owns_group=owns)


def resolve_device(pref: str, dist: Dist) -> torch.device:
    if pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda, got {pref!r}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available (use --device cpu)")
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())


class Console:
    """Rank-0 printing plus a rich progress bar (loss, step/s, ETA)."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console as RichConsole

        self.enabled = enabled
        self.rich = RichConsole(stderr=True, quiet=not enabled)

    def log(self, msg: str) -> None:
        if self.enabled:
            self.rich.print(msg, highlight=False, markup=False)

    def progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.2f} step/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.rich,
            disable=not self.enabled,
            transient=False,
        )


# ----------------------------------------------------------------------------- data and models


@dataclass
class Data:
    task: Any
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit | None
    test_split: str


def load_data(recipe: Recipe, tokenizer: Any, cache_dir: Path | None = None) -> Data:
    """The recipe's tokenised splits; with ``cache_dir``, through the on-disk token cache
    (:func:`qexport.train.batches.encode_split`)."""
    from qexport.data import get_task

    task = get_task(recipe.task)
    cfg = recipe.train

    def enc(split: str, limit: int | None = None) -> EncodedSplit:
        return encode_split(task.load(split), tokenizer, recipe.max_length, limit, cache_dir=cache_dir,
                            name=f"{recipe.task}-{split}")

    train = enc("train")
    # evaluation splits in length order: the metrics are the same, the padding mostly gone
    dev = enc(cfg.eval_split, cfg.eval_limit).by_length()
    test = None
    split = cfg.test_split or cfg.eval_split
    if cfg.test_split is not None:
        test = enc(cfg.test_split, cfg.test_limit).by_length()
    return Data(task, train, dev, test, split)


def build_model(spec: str, recipe: Recipe, num_labels: int, quantized: bool) -> tuple[nn.Module, Any]:
    """``load_model(spec)`` (+ ``quantize_model`` with the recipe's preset and bits when ``quantized``)."""
    from qexport.models import load_model

    model, tok = load_model(spec, num_labels=num_labels, seed=recipe.train.seed)
    if quantized:
        from qexport.quant import quantize_model

        q = recipe.quant
        quantize_model(model, q.preset, weight_bits=q.weight_bits, act_bits=q.act_bits, emb_bits=q.emb_bits)
        w = q.weights
        if w is not None:
            from qexport.quant.groups import apply_weight_quantization

            apply_weight_quantization(
                model, w.groups, w.quantizer, w.bits, w.mode, act_bits=q.act_bits, keep_last=w.keep_last,
                preset=q.preset, rest=w.rest, per_channel=w.per_channel, **w.options,
            )
    return model, tok


def quant_controller(model: nn.Module, recipe: Recipe, total: int) -> Any:
    """The QAT stage's precision schedules (CPT bits, latent switch, IR-Net's EDE); None if none."""
    from qexport.train.schedules import EDESchedule, LatentSchedule, QuantController, parse_bit_schedule

    q, s = recipe.quant, recipe.quant.schedule
    bits = None
    if s.cyclic is not None and q.weights is not None:
        bits = parse_bit_schedule(s.cyclic, total, s.cycles, s.shape, final_bits=q.weights.bits)
    latent = LatentSchedule(s.latent_steps) if s.latent_steps else None
    ede = EDESchedule(total) if q.weights is not None and q.weights.quantizer == "ir-net" else None
    if bits is None and latent is None and ede is None:
        return None
    return QuantController(model, bits=bits, latent=latent, ede=ede)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (BERT's convention)."""
    no_decay: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if id(p) in no_decay or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, split: EncodedSplit, task: Any, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Dev/test metrics of a (float or fake-quant) model: ``metric`` (%), ``loss`` and the task's entries."""
    was = model.training
    model.eval()
    preds: list[int] = []
    total, n = 0.0, 0
    try:
        for batch in split.sequential(batch_size):
            b = _to(batch, device)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            n += int(b["labels"].numel())
            preds.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was)
    res: dict[str, Any] = dict(task.compute_metric(preds, split.labels.tolist()))
    res["loss"] = total / max(n, 1)
    res["n"] = n
    return res


def evaluate_integer(ckpt: Path, split: EncodedSplit, task: Any, batch_size: int) -> dict[str, Any]:
    """Metrics of the pure-integer reference model (:class:`qexport.models.integer.IntegerModel`),
    through :func:`qexport.evaluation.score` on the encoded split."""
    from qexport.evaluation import reference_predictor, score
    from qexport.models.integer import IntegerModel

    im = IntegerModel.from_checkpoint(ckpt)
    batches = (
        ({k: b[k].numpy() for k in ("input_ids", "attention_mask")}, b["labels"].tolist(), 0)
        for b in split.sequential(batch_size)
    )
    ev = score(reference_predictor(im), batches, task)
    if ev.metric is None:  # an encoded split always has labels
        raise DataError(f"task {task.name}: the encoded split has no labels to score")
    res: dict[str, Any] = dict(ev.metric)
    res["n"] = ev.examples
    return res


def save_hf_atomic(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """``save_pretrained`` (model + tokenizer) into a temp dir, renamed into place."""
    with atomic_directory(Path(out)) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


# ----------------------------------------------------------------------------- one stage


@dataclass
class StageResult:
    best_metric: float | None = None
    best_step: int = 0
    steps: int = 0
    step_times: list[float] = field(default_factory=list)
    train_time_s: float = 0.0

    def mean_step_time(self) -> float | None:
        ts = self.step_times[TIMING_WARMUP:] if len(self.step_times) > 2 * TIMING_WARMUP else self.step_times
        return statistics.fmean(ts) if ts else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "steps": self.steps,
            "step_times": self.step_times,
            "train_time_s": self.train_time_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(d["best_metric"], d["best_step"], d["steps"], list(d["step_times"]), d["train_time_s"])


@dataclass
class _Cursor:
    """Where a stage's step loop stands: global step, epoch, batch in the epoch, and the train
    loss summed since the last evaluation (saved with the state, so a resume continues it)."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0


class Run:
    """One call of :func:`train`: shared context for both stages."""

    def __init__(self, recipe: Recipe, out_dir: Path, dist: Dist, device: torch.device) -> None:
        self.recipe = recipe
        self.out = Path(out_dir)
        self.dist = dist
        self.device = device
        self.console = Console(dist.is_main)
        self.history: list[dict[str, Any]] = []
        self.results: dict[str, StageResult] = {}
        self.wall_offset = 0.0
        self.t0 = time.perf_counter()
        self.data: Data | None = None
        self.tokenizer: Any = None

    # -- bookkeeping
    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    def common_state(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.dump(),
            "history": self.history,
            "results": {k: v.to_dict() for k, v in self.results.items()},
            "wall_time": self.wall(),
            "world_size": self.dist.world_size,
        }

    def save(self, state: dict[str, Any]) -> None:
        """Gather every rank's RNG state (collective), then rank 0 writes the state atomically."""
        rngs = self.dist.gather(rng_state())
        if self.dist.is_main:
            path = save_state(self.out, {**self.common_state(), **state, "rng": rngs})
            progress = {k: state.get(k) for k in ("stage", "step", "epoch", "pos")}
            atomic_write_json(path.with_name("progress.json"), {**progress, "wall_time": self.wall()})

    def write_metrics(self) -> None:
        if self.dist.is_main:
            atomic_write_json(self.out / "metrics.json", self.history)

    # -- the stage loop
    def run_stage(
        self,
        stage: str,
        model: nn.Module,
        cfg: Any,
        save_best: Callable[[nn.Module, dict[str, Any], int], None],
        teacher: nn.Module | None,
        resume: dict[str, Any] | None,
    ) -> StageResult:
        """One stage (FP or QAT): set up (or resume) the optimizer and the data position, then the
        step loop with its evaluations and training-state saves."""
        assert self.data is not None
        rc = self.recipe.train
        model.to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval()
        world, rank = self.dist.world_size, self.dist.rank
        lengths = self.data.train.attention_mask.sum(dim=1) if rc.group_by_length else None
        order = EpochOrder(len(self.data.train), cfg.batch_size, rc.seed, world, rank, lengths=lengths)
        total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * order.batches_per_epoch)
        optimizer, scheduler = self._optimizer(stage, model, cfg, total)
        res, cur = self._start_or_resume(stage, model, optimizer, scheduler, resume, total)
        ddp_model = self._distributed(model)
        model.train()
        ctrl = quant_controller(model, self.recipe, total) if stage == "qat" else None
        kd, outputs = self._distiller(teacher)
        eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
        self.console.log(
            f"[{stage}] {total} steps, {order.batches_per_epoch} batches/epoch of {cfg.batch_size} "
            f"x {self.dist.world_size} process(es), lr {cfg.lr:g}, device {self.device}"
        )
        batches = order.epoch(cur.epoch)
        with self.console.progress() as bar:
            task_id = bar.add_task(stage, total=total, completed=cur.step, loss=float("nan"), rate=0.0)
            if total == 0 and cur.step == 0:  # calibration only (PTQ): evaluate and keep the model as is
                self._evaluate(stage, model, 0, 0, float("nan"), eval_bs, res, save_best, ctrl)
            while cur.step < total:
                if ctrl is not None:
                    ctrl.on_step(cur.step)
                batch = _to(self.data.train.batch(batches[cur.pos]), self.device)
                lv, dt = self._train_step(ddp_model, model, batch, optimizer, scheduler, teacher, kd, outputs)
                res.step_times.append(dt)
                res.train_time_s += dt
                cur.step += 1
                cur.pos += 1
                if cur.pos >= len(batches):
                    cur.epoch, cur.pos = cur.epoch + 1, 0
                    batches = order.epoch(cur.epoch)
                cur.loss_sum += lv
                cur.loss_n += 1
                bar.update(task_id, completed=cur.step, loss=lv, rate=1.0 / dt if dt > 0 else 0.0)
                if cur.step % rc.eval_every == 0 or cur.step == total:
                    loss = cur.loss_sum / max(cur.loss_n, 1)
                    self._evaluate(stage, model, cur.step, cur.epoch, loss, eval_bs, res, save_best, ctrl)
                    cur.loss_sum, cur.loss_n = 0.0, 0
                if cur.step % rc.save_every == 0 or cur.step == total:
                    self._save_stage(stage, cur, model, optimizer, scheduler, res)
        self.dist.barrier()
        return res

    def _optimizer(self, stage: str, model: nn.Module, cfg: Any, total: int) -> tuple[Any, Any]:
        """AdamW with linear warm-up and decay over ``total`` steps."""
        from transformers import get_linear_schedule_with_warmup

        if stage == "qat" and self.recipe.quant.weights is not None:
            from qexport.quant.quantizers import quant_param_groups

            # PACT's clip values get their own learning-rate scale and weight decay (seed 003)
            groups = quant_param_groups(model, cfg.lr, cfg.weight_decay)
        else:
            groups = param_groups(model, cfg.weight_decay)
        fused = True if self.recipe.train.fused_adamw else None  # None: torch's default (foreach)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        return optimizer, scheduler

    def _start_or_resume(
        self, stage: str, model: nn.Module, optimizer: Any, scheduler: Any, resume: dict[str, Any] | None,
        total: int,
    ) -> tuple[StageResult, _Cursor]:
        """A fresh stage (seeded) or the saved one: model, optimizer, scheduler, data position,
        the stage's results so far, the pending loss average and this rank's RNG state."""
        if resume is None or resume.get("model") is None:
            seed_everything(self.recipe.train.seed + 1000 * STAGE_INDEX[stage] + self.dist.rank)
            return StageResult(steps=total), _Cursor()
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["sampler_seed"] != self.recipe.train.seed:
            raise CheckpointError("training state was written with another sampler seed")
        loss_sum, loss_n = resume["loss_acc"]
        cur = _Cursor(resume["step"], resume["epoch"], resume["pos"], float(loss_sum), int(loss_n))
        rngs = resume["rng"]
        set_rng_state(rngs[self.dist.rank % len(rngs)])
        self.console.log(f"[{stage}] resumed at step {cur.step}/{total} (epoch {cur.epoch}, batch {cur.pos})")
        return StageResult.from_dict(resume["stage_result"]), cur

    def _distributed(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel under DDP, else itself."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _distiller(self, teacher: nn.Module | None) -> tuple[Any, dict[str, bool]]:
        """The distillation loss and the extra outputs it needs (none without a teacher)."""
        if teacher is None:
            return None, {}
        from qexport.train.distill import DistillLoss

        dc = self.recipe.distillation
        parts = {"logits": dc.logits, "hidden": dc.hidden, "attention": dc.attention}
        kd = DistillLoss(parts, dc.temperature)
        return kd, kd.forward_kwargs()

    def _train_step(
        self, ddp_model: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor], optimizer: Any,
        scheduler: Any, teacher: nn.Module | None, kd: Any, outputs: dict[str, bool],
    ) -> tuple[float, float]:
        """One optimizer step on ``batch``: ``(loss, seconds)`` (device work included)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t_start = time.perf_counter()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = ddp_model(**inputs, **outputs)
        loss = F.cross_entropy(out.logits.float(), batch["labels"])
        if teacher is not None and kd is not None:
            with torch.no_grad():
                t_out = teacher(**inputs, **outputs)
            kd_loss, _ = kd(out, t_out, batch["labels"], batch["attention_mask"])
            loss = self.recipe.distillation.ce * loss + kd_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.recipe.train.grad_clip)
        optimizer.step()
        scheduler.step()
        sync()
        dt = time.perf_counter() - t_start
        return float(loss.detach()), dt

    def _save_stage(
        self, stage: str, cur: _Cursor, model: nn.Module, optimizer: Any, scheduler: Any, res: StageResult
    ) -> None:
        """The training state at the cursor (see :mod:`qexport.train.state`)."""
        self.save(
            {
                "stage": stage,
                "step": cur.step,
                "epoch": cur.epoch,
                "pos": cur.pos,
                "sampler_seed": self.recipe.train.seed,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "stage_result": res.to_dict(),
                "loss_acc": (cur.loss_sum, cur.loss_n),
            }
        )

    def _evaluate(
        self,
        stage: str,
        model: nn.Module,
        step: int,
        epoch: int,
        train_loss: float,
        eval_bs: int,
        res: StageResult,
        save_best: Callable[[nn.Module, dict[str, Any], int], None],
        ctrl: Any = None,
    ) -> None:
        assert self.data is not None
        # evaluate (and save) at the deployed precision: quantization on, the final weight bits
        qstate = ctrl.on_eval() if ctrl is not None else {}
        if self.dist.is_main:
            ev = evaluate(model, self.data.dev, self.data.task, eval_bs, self.device)
            best = res.best_metric is None or ev["metric"] > res.best_metric
            row = {
                "stage": stage,
                "step": step,
                "epoch": epoch,
                "loss": train_loss,
                "eval_loss": ev["loss"],
                "metric": ev["metric"],
                "metric_name": self.data.task.metric_name,
                "best": best,
                "wall_time": round(self.wall(), 3),
                **qstate,
            }
            self.history.append(row)
            self.write_metrics()
            if best:
                res.best_metric, res.best_step = float(ev["metric"]), step
                save_best(model, ev, step)
            self.console.log(
                f"[{stage}] step {step}/{res.steps}  train loss {train_loss:.4f}  dev loss {ev['loss']:.4f}  "
                f"dev {self.data.task.metric_name} {ev['metric']:.2f}{'  (best)' if best else ''}"
            )
        # every rank keeps the same best-so-far (it goes into the state on rank 0 only, but stay aligned)
        if self.dist.enabled:
            res.best_metric, res.best_step = self.dist.gather((res.best_metric, res.best_step))[0]
        self.dist.barrier()


# ----------------------------------------------------------------------------- the public entry point


def _check_resumable(state: dict[str, Any], recipe: Recipe, dist: Dist) -> None:
    old, new = state["recipe"], recipe.dump()

    def diff(a: Any, b: Any, path: tuple[str, ...]) -> str | None:
        if path in RESUME_MUTABLE:
            return None
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                d = diff(a.get(k), b.get(k), (*path, k))
                if d:
                    return d
            return None
        return None if a == b else f"{'.'.join(path)} was {a!r}, now {b!r}"

    d = diff(old, new, ())
    if d:
        raise ConfigError(
            f"cannot resume: the recipe changed ({d}); use the same recipe or a new -o directory"
        )
    if state.get("world_size", 1) != dist.world_size:
        raise ConfigError(
            f"cannot resume: the state was written by {state.get('world_size')} process(es), "
            f"this run has {dist.world_size}"
        )


def _summary(run: Run, extra: dict[str, Any]) -> dict[str, Any]:
    fp, qat = run.results.get("fp"), run.results.get("qat")
    fp_t = fp.mean_step_time() if fp else None
    qat_t = qat.mean_step_time() if qat else None
    return {
        "recipe": run.recipe.name,
        "task": run.recipe.task,
        "model": run.recipe.model,
        "preset": run.recipe.quant.preset,
        "weight_bits": run.recipe.quant.weight_bits,
        "weight_quant": run.recipe.quant.weights.model_dump() if run.recipe.quant.weights else None,
        "distillation": run.recipe.distillation.enabled,
        "world_size": run.dist.world_size,
        "device": str(run.device),
        "fp_dev_metric": fp.best_metric if fp else None,
        "qat_dev_metric": qat.best_metric if qat else None,
        "fp_steps": fp.steps if fp else 0,
        "qat_steps": qat.steps if qat else 0,
        "fp_train_time_s": fp.train_time_s if fp else 0.0,
        "qat_train_time_s": qat.train_time_s if qat else 0.0,
        "train_time_s": (fp.train_time_s if fp else 0.0) + (qat.train_time_s if qat else 0.0),
        "fp_step_time_mean_s": fp_t,
        "qat_step_time_mean_s": qat_t,
        "qat_step_time_ratio": (qat_t / fp_t) if (fp_t and qat_t) else None,
        "wall_time_s": run.wall(),
        **extra,
    }


def train(
    recipe: Recipe,
    out_dir: Path,
    resume: bool = False,
    device: str | None = None,
    fp_from: Path | None = None,
    *,
    final_int_eval: bool = True,
    token_cache: Path | None = None,
) -> dict[str, Any]:
    """Run the recipe's FP and QAT stages into ``out_dir``; return (and write) the summary.

    ``resume=True`` continues from ``out_dir/state/train_state.pt`` (a fresh start when there is
    none); the recipe must be the one the state was written with (device and log cadence aside).
    ``device`` overrides ``recipe.train.device``. Safe under ``torchrun``. ``fp_from``: a finished
    run whose FP stage had the same settings (:func:`fp_stage_key`) is reused instead of retrained
    (``qexport sweep`` does this across presets). ``final_int_eval=False`` leaves out the last
    step, the integer reference over the test split (slow: torch int64 kernels; ``qexport demo``
    scores the integer model after export with a backend proven bit-exact instead): ``int_metric``
    is then None. ``token_cache``: a directory for the tokenised splits, reused across runs.
    """
    out = Path(out_dir)
    pref = device or recipe.train.device
    dist = init_distributed(pref)
    try:
        dev = resolve_device(pref, dist)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return _train(recipe, out, resume, dist, dev, fp_from, final_int_eval, token_cache)
    finally:
        if dist.owns_group:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()


def _quiet_hf() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def fp_stage_key(recipe: Recipe) -> dict[str, Any]:
    """Everything the FP stage's result depends on: two recipes with equal keys train the same FP model."""
    d = recipe.dump()
    skip = ("save_every", "log_every", "test_split", "test_limit")
    loop = {k: v for k, v in d["train"].items() if k not in skip}
    return {"model": d["model"], "task": d["task"], "max_length": d["max_length"], "fp": d["fp"],
            "train": loop}


def _reuse_fp(run: Run, other: Path) -> bool:
    """Start ``run`` at its QAT stage from the finished FP stage of the run in ``other`` (same
    :func:`fp_stage_key`): its best FP model, step timings and history are copied, so the run is the
    one training it again would give (the FP stage is seeded and deterministic) without the time."""

    from qexport.config import validate_recipe

    st = load_state(other) if (other / "state").is_dir() else None
    if st is None or "fp" not in st.get("results", {}) or not (other / "fp").is_dir():
        return False
    if fp_stage_key(validate_recipe(st["recipe"])) != fp_stage_key(run.recipe):
        return False
    if run.dist.is_main:
        with atomic_directory(run.out / "fp") as tmp:
            shutil.copytree(other / "fp", tmp, dirs_exist_ok=True)
    run.results["fp"] = StageResult.from_dict(st["results"]["fp"])
    run.history = [dict(h, reused_from=str(other)) for h in st["history"] if h.get("stage") == "fp"]
    run.wall_offset = max((float(h["wall_time"]) for h in run.history), default=0.0)
    run.console.log(f"[fp] reusing the finished FP stage of {other} (same model, task, data and FP settings)")
    run.save({"stage": "qat", "model": None})
    run.dist.barrier()
    return True


def _train(
    recipe: Recipe, out: Path, resume: bool, dist: Dist, dev: torch.device, fp_from: Path | None = None,
    final_int_eval: bool = True, token_cache: Path | None = None,
) -> dict[str, Any]:
    _quiet_hf()
    run = Run(recipe, out, dist, dev)
    state = load_state(out) if resume else None
    if resume and state is None:
        run.console.log(f"no training state in {out}: starting from the beginning")
    if state is not None:
        _check_resumable(state, recipe, dist)
        run.history = list(state["history"])
        run.results = {k: StageResult.from_dict(v) for k, v in state["results"].items()}
        run.wall_offset = float(state["wall_time"])
        if state["stage"] == "done" and (out / "summary.json").is_file():
            run.console.log(f"{out}: this run is already complete")
            import json

            return dict(json.loads((out / "summary.json").read_text()))
    if dist.is_main and state is None:
        for stale in ("metrics.json", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    if fp_from is not None and state is None and recipe.runs_fp and _reuse_fp(run, Path(fp_from)):
        state = load_state(out)

    from qexport.data import get_task

    num_labels = get_task(recipe.task).num_labels
    stage_now = state["stage"] if state is not None else ("fp" if recipe.runs_fp else "qat")
    fp_dir = out / "fp"

    # ---- FP stage
    if recipe.runs_fp and stage_now == "fp":
        model, tok = build_model(recipe.model, recipe, num_labels, quantized=False)
        run.tokenizer = tok
        run.data = load_data(recipe, tok, token_cache)
        run.console.log(
            f"task {recipe.task}: {len(run.data.train)} train / {len(run.data.dev)} "
            f"{recipe.train.eval_split} rows ({run.data.train.num_truncated} truncated "
            f"to {recipe.max_length} tokens)"
        )

        def save_fp(m: nn.Module, ev: dict[str, Any], step: int) -> None:
            save_hf_atomic(m, tok, fp_dir)

        run.results["fp"] = run.run_stage("fp", model, recipe.fp, save_fp, None, state)
        state = None
        run.save({"stage": "qat" if recipe.runs_qat else "final", "model": None})
        del model
    # ---- QAT stage
    if recipe.runs_fp:
        source = str(fp_dir)
    elif recipe.qat.init_from is not None:
        source = str(recipe.qat.init_from)
    else:
        source = recipe.model
    if recipe.runs_qat and stage_now in ("fp", "qat"):
        model, tok = build_model(source, recipe, num_labels, quantized=True)
        run.tokenizer = tok
        if run.data is None:
            run.data = load_data(recipe, tok, token_cache)
        teacher = None
        if recipe.distillation.enabled:
            teacher, _ = build_model(source, recipe, num_labels, quantized=False)
        resuming = state is not None and state.get("model") is not None
        if not resuming and recipe.qat.calib_batches > 0:
            from qexport.quant import calibrate

            order = EpochOrder(
                len(run.data.train), recipe.qat.batch_size, recipe.train.seed, dist.world_size, dist.rank
            )
            first = order.epoch(0)[: recipe.qat.calib_batches]
            n = calibrate(model.to(dev), (_to(run.data.train.batch(ix), dev) for ix in first))
            run.console.log(
                f"[qat] calibrated activation ranges on {n} train batches (preset {recipe.quant.preset})"
            )
        qat_dir = out / "qat"
        ckpt_dir = out / "checkpoint"

        def save_qat(m: nn.Module, ev: dict[str, Any], step: int) -> None:
            from qexport.quant import save_checkpoint
            from qexport.train.state import atomic_torch_save

            atomic_torch_save(m.state_dict(), qat_dir / "best.pt")
            metrics = {"dev": {k: v for k, v in ev.items() if k != "n"}, "step": step}
            save_checkpoint(
                m, ckpt_dir, extra_manifest={"recipe": recipe.dump(), "metrics": metrics}, tokenizer=tok
            )

        run.results["qat"] = run.run_stage("qat", model, recipe.qat, save_qat, teacher, state)
        del model, teacher
        state = None
    return _finish(run, source, num_labels, final_int_eval, token_cache)


def _finish(
    run: Run, source: str, num_labels: int, final_int_eval: bool = True, token_cache: Path | None = None
) -> dict[str, Any]:
    """Test-split metrics of the best FP, QAT and integer models; summary.json, the plot, the final state."""
    recipe, out, dist = run.recipe, run.out, run.dist
    extra: dict[str, Any] = {"test_split": recipe.train.test_split or recipe.train.eval_split}
    if dist.is_main:
        if run.data is None:
            _, tok = build_model(source, recipe, num_labels, quantized=False)
            run.data = load_data(recipe, tok, token_cache)
        data = run.data
        split = data.test if data.test is not None else data.dev
        eval_bs = 64
        extra["metric_name"] = data.task.metric_name
        fp_source = str(out / "fp") if "fp" in run.results else source
        if recipe.runs_fp or not recipe.runs_qat:
            fp_model, _ = build_model(fp_source, recipe, num_labels, quantized=False)
            extra["fp_test"] = evaluate(fp_model.to(run.device), split, data.task, eval_bs, run.device)
            extra["fp_metric"] = extra["fp_test"]["metric"]
            extra["fp_dir"] = str(out / "fp")
            del fp_model
        if recipe.runs_qat:
            qmodel, _ = build_model(source, recipe, num_labels, quantized=True)
            best = out / "qat" / "best.pt"
            if not best.is_file():
                raise CheckpointError(f"{best} is missing: the QAT stage never saved a best model")
            qmodel.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
            extra["qat_test"] = evaluate(qmodel.to(run.device), split, data.task, eval_bs, run.device)
            extra["qat_metric"] = extra["qat_test"]["metric"]
            ckpt = out / "checkpoint"
            if final_int_eval:
                extra["int_test"] = evaluate_integer(ckpt, split, data.task, eval_bs)
                extra["int_metric"] = extra["int_test"]["metric"]
                _update_manifest(ckpt, {"test": {"split": split_name(recipe), **extra["int_test"]}})
            extra["checkpoint"] = str(ckpt)
            del qmodel
        summary = _summary(run, extra)
        atomic_write_json(out / "summary.json", summary)
        run.write_metrics()
        from qexport.train.plots import plot_training_curve

        plot_training_curve(run.history, out / "training_curve.png", title=str(recipe.name or ""))
        run.console.log(_headline(summary))
    else:
        summary = {}
    run.save({"stage": "done", "model": None})
    dist.barrier()
    return summary


def split_name(recipe: Recipe) -> str:
    return recipe.train.test_split or recipe.train.eval_split


def _update_manifest(ckpt: Path, test_metrics: dict[str, Any]) -> None:
    """Add the integer model's test metrics to the checkpoint manifest's ``metrics`` (atomic rewrite)."""
    import json

    mf = ckpt / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest.setdefault("metrics", {}).update(test_metrics)
    atomic_write_json(mf, manifest)


def _headline(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    name = s.get("metric_name", "metric")
    return (
        f"done: {s['test_split']} {name}: fp {f(s.get('fp_metric'))}, qat {f(s.get('qat_metric'))}, "
        f"integer {f(s.get('int_metric'))}; step time qat/fp {f(s.get('qat_step_time_ratio'))}"
    )


__all__ = ["train", "evaluate", "evaluate_integer", "stage_has_work"]
