"""Training recipes: typed, versioned pydantic models, validated when loaded.

A recipe is a YAML file (see ``recipes/``)::

    version: 1
    model: minilm            # qexport.models.load_model spec
    task: rt                 # qexport.data.get_task spec
    max_length: 64
    quant: {preset: full, weight_bits: 8, act_bits: 8, emb_bits: 8}
    # optional, the seeds' experiments: a quantizer on layer groups, CPT / latent schedules
    #   weights: {groups: FFN, quantizer: minmax, bits: 2, mode: fully, rest: int8}
    #   schedule: {cyclic: "4-8", cycles: 8, eval_bits: 8, latent_steps: 0}
    fp:  {epochs: 1, lr: 5.0e-5, batch_size: 32, warmup_ratio: 0.1, weight_decay: 0.01}
    qat: {steps: 300, lr: 1.0e-5, batch_size: 32, init_from: null, calib_batches: 8}
    train: {eval_every: 100, save_every: 50, grad_clip: 1.0, seed: 0, device: auto}
    distillation: {enabled: false, logits: 1.0, hidden: 0.0, attention: 0.0, temperature: 1.0}

Every model forbids unknown keys; a bad file, key or value raises one
:class:`~qexport.errors.ConfigError` line naming the key (and, for an unknown
key, the valid ones). ``load_recipe(path, ["qat.lr=1e-5"])`` applies
``--set`` overrides (values parsed as YAML) before validation.

Extending: add a field (with a default) to the sub-model it belongs to, e.g.
a PACT/LSQ option in :class:`QuantConfig`; old recipes stay valid. A change
that breaks old recipes bumps :data:`RECIPE_VERSION`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qexport.errors import ConfigError

#: The recipe format this code reads.
RECIPE_VERSION = 1
#: Mirrors ``qexport.quant.PRESETS`` (kept literal so that reading a recipe does not import torch;
#: tests/unit/test_recipes.py checks the two agree).
PRESET_NAMES: tuple[str, ...] = (
    "fp",
    "linear",
    "linear+gelu+softmax",
    "linear+gelu+layernorm",
    "linear+softmax+layernorm",
    "full",
)
#: Mirrors ``qexport.quant.presets.WEIGHT_BITS``.
WEIGHT_BITS: tuple[int, ...] = (2, 4, 8)
ACT_BITS: tuple[int, ...] = (8, 16)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


#: Mirrors ``qexport.quant.quantizers.QUANTIZERS`` (tests/unit/test_recipes.py checks they agree).
QUANTIZER_NAMES: tuple[str, ...] = ("minmax", "pact", "lsq", "binary", "ir-net", "ternary")
#: Mirrors ``qexport.quant.groups.GROUPS``.
GROUP_NAMES: tuple[str, ...] = ("EMB", "QKV", "QK", "MHA", "FFN", "CLS", "ALL", "ALL_QK")


class WeightQuantConfig(_Strict):
    """The seeds' weight-quantization experiments on chosen layer groups (seeds 002-004).

    ``groups`` (``EMB``, ``QKV``, ``QK``, ``MHA``, ``FFN``, ``CLS``, ``ALL``, ``ALL_QK`` and unions
    such as ``FFN+EMB``) get ``quantizer`` at ``bits``; every other layer keeps the preset's 8-bit
    min/max (``rest: int8``) or trains in float and exports as 8-bit (``rest: fp``). ``mode``:
    ``basic`` quantizes weights only (activations observe their ranges), ``fully`` weights and
    activations. ``keep_last`` leaves the classifier's last linear out (seed 002). ``options`` go
    to the quantizer (PACT ``init``/``lr_scale``/``weight_decay``, IR-Net ``t``/``k``, ternary
    ``threshold``, ...). See :func:`qexport.quant.groups.apply_weight_quantization`.
    """

    groups: str = "ALL"
    quantizer: str = "minmax"
    bits: int = 8
    mode: str = "fully"
    rest: str = "int8"
    keep_last: bool = True
    per_channel: bool | None = None
    options: dict[str, float | int | bool | str] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: str) -> str:
        parts = [p.strip().upper() for p in v.split("+")]
        for p in parts:
            _one_of("groups", p, GROUP_NAMES)
        return "+".join(parts)

    @field_validator("quantizer")
    @classmethod
    def _quantizer(cls, v: str) -> str:
        key = v.lower().replace("_", "-")
        return str(_one_of("quantizer", "ir-net" if key == "irnet" else key, QUANTIZER_NAMES))

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        return str(_one_of("mode", v, ("basic", "fully")))

    @field_validator("rest")
    @classmethod
    def _rest(cls, v: str) -> str:
        return str(_one_of("rest", v, ("int8", "fp")))

    @model_validator(mode="after")
    def _bits_fit(self) -> WeightQuantConfig:
        need = {"binary": 1, "ir-net": 1, "ternary": 2}.get(self.quantizer)
        if need is not None and self.bits != need:
            raise ValueError(f"bits: quantizer {self.quantizer} has {need}-bit weights, got {self.bits}")
        if need is None and self.bits not in (2, 4, 8):
            raise ValueError(
                f"bits must be 2, 4 or 8 for {self.quantizer} (1 bit: quantizer binary or ir-net)"
            )
        return self


class ScheduleConfig(_Strict):
    """Precision schedules during QAT (:mod:`qexport.train.schedules`).

    ``cyclic``: CPT (seed 004): the selected groups' weight bits cycle ``"LO-HI"`` (``"4-8"``,
    ``"4-16"``, ``"8-16"``) in ``cycles`` periods over the QAT stage; evaluation and the exported
    checkpoint use ``quant.weights.bits`` (at most 8: 16-bit weights have no integer-only
    deployment, so seed 004's "8-16" trains cycling up to 16 bits and deploys 8).
    ``latent_steps``: latent quantization (seed 002): the first N QAT steps train in float
    (activation ranges keep being observed), quantization switches on from step N.
    """

    cyclic: str | None = None
    cycles: int = Field(default=8, ge=1)
    shape: str = "cosine"
    latent_steps: int = Field(default=0, ge=0)

    @field_validator("cyclic")
    @classmethod
    def _cyclic(cls, v: str | None) -> str | None:
        if v is None:
            return None
        lo, sep, hi = str(v).partition("-")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            raise ValueError(f"must be 'LO-HI' weight bits such as '4-8', got {v!r}") from None
        if not sep or not 2 <= a < b <= 16:
            raise ValueError(f"must be 'LO-HI' with 2 <= LO < HI <= 16, got {v!r}")
        return f"{a}-{b}"

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        return str(_one_of("shape", v, ("cosine", "triangular")))


class QuantConfig(_Strict):
    """What QAT quantizes: a named preset and bit widths (``qexport.quant.quantize_model`` arguments)."""

    preset: str = "full"
    weight_bits: int = 8
    act_bits: int = 8
    emb_bits: int = 8
    weights: WeightQuantConfig | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        return str(_one_of("preset", v, PRESET_NAMES))

    @field_validator("weight_bits")
    @classmethod
    def _wbits(cls, v: int) -> int:
        return int(_one_of("weight_bits", v, WEIGHT_BITS))

    @field_validator("emb_bits")
    @classmethod
    def _ebits(cls, v: int) -> int:
        return int(_one_of("emb_bits", v, WEIGHT_BITS))

    @field_validator("act_bits")
    @classmethod
    def _abits(cls, v: int) -> int:
        return int(_one_of("act_bits", v, ACT_BITS))


class StageConfig(_Strict):
    """One fine-tuning stage: AdamW with linear warm-up then linear decay.

    Length: ``steps`` optimizer steps when given, else ``epochs`` passes over the
    train split (0 skips the stage). ``batch_size`` is per process (DDP: the
    global batch is ``batch_size * world_size``).
    """

    epochs: float = Field(default=1.0, ge=0)
    steps: int | None = Field(default=None, ge=0)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)


class QatStageConfig(StageConfig):
    """The QAT stage; ``init_from`` (an HF model directory such as a previous run's ``fp/``) skips
    the FP stage and starts QAT from that model. ``calib_batches`` train batches set the activation
    ranges before the first step."""

    lr: float = Field(default=1e-5, gt=0)
    init_from: Path | None = None
    calib_batches: int = Field(default=8, ge=0)


class TrainConfig(_Strict):
    """Loop settings shared by both stages."""

    eval_every: int = Field(default=100, ge=1, description="evaluate on the dev split every N steps")
    save_every: int = Field(default=50, ge=1, description="write the resumable training state every N steps")
    grad_clip: float | None = Field(default=1.0, gt=0, description="max gradient norm (null: no clipping)")
    seed: int = 0
    device: str = "auto"
    eval_split: str = "dev"
    test_split: str | None = "test"
    eval_limit: int | None = Field(default=None, ge=1, description="first N dev examples (null: all)")
    test_limit: int | None = Field(default=None, ge=1, description="first N test examples (null: all)")
    log_every: int = Field(default=10, ge=1)
    group_by_length: bool = Field(
        default=False,
        description="batch training rows of similar length together (less padding, faster; "
                    "another batch order, so other results than without)",
    )
    fused_adamw: bool = Field(
        default=False,
        description="torch's fused AdamW kernel (one pass over the parameters; faster on CPU, "
                    "rounds differently from the default implementation)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return str(_one_of("device", v, DEVICES))


class DistillConfig(_Strict):
    """Knowledge distillation from the FP stage's best model during QAT (I-BERT/TernaryBERT style).

    Loss = ``ce`` * CE(labels) + ``logits`` * soft CE(T) + ``hidden`` * MSE(hidden states)
    + ``attention`` * MSE(attention probs) (see :class:`qexport.train.distill.DistillLoss`).
    """

    enabled: bool = False
    ce: float = Field(default=1.0, ge=0)
    logits: float = Field(default=1.0, ge=0)
    hidden: float = Field(default=0.0, ge=0)
    attention: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)


class Recipe(_Strict):
    """A whole experiment: model, task, quantization, the FP and QAT stages, loop and distillation."""

    version: int = RECIPE_VERSION
    name: str | None = None
    model: str = "minilm"
    task: str = "rt"
    max_length: int = Field(default=128, ge=8, le=512)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    fp: StageConfig = Field(default_factory=StageConfig)
    qat: QatStageConfig = Field(default_factory=QatStageConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distillation: DistillConfig = Field(default_factory=DistillConfig)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"unsupported recipe version {v}: this qexport reads version {RECIPE_VERSION}")
        return v

    @field_validator("model", "task")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.quant.preset == "fp" and self.qat.init_from is not None:
            raise ValueError("qat.init_from is set but quant.preset is fp (there is no QAT stage)")
        if self.distillation.enabled and self.quant.preset == "fp":
            raise ValueError("distillation.enabled needs a QAT stage (quant.preset is fp)")
        q = self.quant
        if q.preset == "fp" and (q.weights is not None or q.schedule.cyclic or q.schedule.latent_steps):
            raise ValueError("quant.weights/quant.schedule need a QAT stage (quant.preset is fp)")
        if q.schedule.cyclic is not None and (
            q.weights is None or q.weights.quantizer not in ("minmax", "pact", "lsq")
        ):
            raise ValueError(
                "quant.schedule.cyclic needs quant.weights with a multi-bit quantizer "
                "(minmax, pact or lsq) on the groups whose bits cycle"
            )
        return self

    @property
    def runs_fp(self) -> bool:
        """Whether the FP stage runs (it is skipped when QAT starts from ``qat.init_from``)."""
        return self.qat.init_from is None and stage_has_work(self.fp)

    @property
    def runs_qat(self) -> bool:
        return self.quant.preset != "fp"

    def dump(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings), as written into manifests and summaries."""
        return self.model_dump(mode="json")


def stage_has_work(stage: StageConfig) -> bool:
    return (stage.steps if stage.steps is not None else stage.epochs) > 0


# ----------------------------------------------------------------------------- loading


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the (sub-)model at ``loc`` (the location of an unknown key's parent)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        info = model.model_fields.get(str(part))
        ann = getattr(info, "annotation", None)
        # ``Sub | None`` sections: the model inside the Optional
        subs = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = subs[0] if subs else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return list(model.model_fields)


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "recipe"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown key {key!r} (valid keys here: {', '.join(_fields_at(loc[:-1]))})"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if kind == "value_error":
        return f"{key} {msg}" if msg.startswith("must ") else f"{key}: {msg}"
    got = err.get("input")
    tail = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{key}: {msg}{tail}"


def validate_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe dict; ConfigError (one line, first problem + count) on failure."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        first = _format_error(dict(errs[0]))
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"bad --set {item!r}: use KEY=VALUE, e.g. --set qat.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"bad --set {item!r}: value is not valid YAML ({str(exc).splitlines()[0]})"
        ) from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b=value`` items into a raw recipe dict (a new dict; values parsed as YAML)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"bad --set {item!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe YAML; ConfigError (one line) on any problem."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).replace("\n", " ")
        raise ConfigError(f"{p}: not valid YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    rec = validate_recipe(data, source=str(p))
    if rec.name is None:
        rec.name = p.stem
    return rec
