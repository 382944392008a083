"""Training recipes: typed, versioned pydantic models, validated when loaded.

A recipe is a YAML file (see ``recipes/``)::

    version: 1
    model: minilm            # qexport.models.load_model spec
    task: rt                 # qexport.data.get_task spec
    max_length: 64
    quant: {preset: full, weight_bits: 8, act_bits: 8, emb_bits: 8}
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


class QuantConfig(_Strict):
    """What QAT quantizes: a named preset and bit widths (``qexport.quant.quantize_model`` arguments)."""

    preset: str = "full"
    weight_bits: int = 8
    act_bits: int = 8
    emb_bits: int = 8

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
