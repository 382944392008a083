"""Every shipped recipe validates; bad recipes fail early with one ConfigError line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qexport.config import (
    GROUP_NAMES,
    PRESET_NAMES,
    QUANTIZER_NAMES,
    WEIGHT_BITS,
    Recipe,
    apply_overrides,
    load_recipe,
    validate_recipe,
)
from qexport.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    for preset in PRESET_NAMES:
        assert f"rt-minilm-{preset}.yaml" in names
        for task in ("cola", "sst2", "rte", "mnli"):
            assert f"glue-{task}-roberta-base-{preset}.yaml" in names
    assert "ag_news-roberta-base-full.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path: Path) -> None:
    rec = load_recipe(path)
    assert rec.version == 1
    assert rec.name == path.stem
    if rec.quant.weights is None and not rec.quant.schedule.cyclic:
        assert rec.quant.preset in path.stem  # the file name says which preset it is
    assert rec.runs_qat == (rec.quant.preset != "fp")


def test_constants_mirror_quant() -> None:
    from qexport.quant import PRESETS
    from qexport.quant.presets import WEIGHT_BITS as QUANT_BITS

    assert tuple(PRESETS) == PRESET_NAMES
    assert tuple(QUANT_BITS) == WEIGHT_BITS
    from qexport.quant.groups import GROUPS
    from qexport.quant.quantizers import QUANTIZERS

    assert tuple(QUANTIZERS) == QUANTIZER_NAMES
    assert tuple(GROUPS) == GROUP_NAMES


def test_weight_quant_and_schedule_errors(tmp_path: Path) -> None:
    def w(**kw: object) -> dict[str, object]:
        return {"quant": {"preset": "full", "weights": kw}}

    assert "quant.weights.groups must be one of EMB, QKV" in _err(tmp_path, w(groups="FFN+ATT"))
    assert "quant.weights.quantizer must be one of minmax, pact" in _err(tmp_path, w(quantizer="dorefa"))
    assert "quantizer binary has 1-bit weights, got 4" in _err(tmp_path, w(quantizer="binary", bits=4))
    assert "quantizer ternary has 2-bit weights" in _err(tmp_path, w(quantizer="ternary", bits=8))
    assert "bits must be 2, 4 or 8 for lsq" in _err(tmp_path, w(quantizer="lsq", bits=16))
    msg = _err(tmp_path, w(groups="FFN", bitz=2))
    assert "unknown key 'quant.weights.bitz'" in msg and "quantizer" in msg and "keep_last" in msg
    msg = _err(tmp_path, {"quant": {"preset": "full", "schedule": {"cyclic": "4-8"}}})
    assert "quant.schedule.cyclic needs quant.weights" in msg
    assert "LO-HI" in _err(tmp_path, {"quant": {"preset": "full", "schedule": {"cyclic": "8-4"}}})
    assert "LO-HI" in _err(tmp_path, {"quant": {"preset": "full", "schedule": {"cyclic": "four"}}})
    msg = _err(tmp_path, {"quant": {"preset": "fp", "weights": {"groups": "FFN"}}})
    assert "need a QAT stage" in msg
    rec = load_recipe(_write(tmp_path, w(groups="ffn+emb", quantizer="IRNet", bits=1)))
    assert rec.quant.weights is not None
    assert (rec.quant.weights.groups, rec.quant.weights.quantizer) == ("FFN+EMB", "ir-net")


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _err(tmp_path: Path, data: object, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_recipe(_write(tmp_path, data), overrides or [])
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_key_and_valid_ones(tmp_path: Path) -> None:
    msg = _err(tmp_path, {"fp": {"lrr": 1e-5}})
    assert "unknown key 'fp.lrr'" in msg
    assert "lr" in msg and "batch_size" in msg and "warmup_ratio" in msg
    msg = _err(tmp_path, {"epochs": 3})
    assert "unknown key 'epochs'" in msg and "quant" in msg and "fp" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    msg = _err(tmp_path, {"qat": {"batch_size": "many"}})
    assert "qat.batch_size" in msg and "many" in msg
    assert "qat.lr" in _err(tmp_path, {"qat": {"lr": -1.0}})


def test_bad_preset_and_bits(tmp_path: Path) -> None:
    msg = _err(tmp_path, {"quant": {"preset": "linear+gelu"}})
    assert "quant.preset must be one of fp, linear, linear+gelu+softmax" in msg
    assert "quant.weight_bits must be one of 2, 4, 8, got 3" in _err(tmp_path, {"quant": {"weight_bits": 3}})
    assert "quant.act_bits must be one of 8, 16" in _err(tmp_path, {"quant": {"act_bits": 4}})
    assert "train.device must be one of auto, cpu, cuda" in _err(tmp_path, {"train": {"device": "tpu"}})


def test_version_and_consistency(tmp_path: Path) -> None:
    assert "unsupported recipe version 2" in _err(tmp_path, {"version": 2})
    msg = _err(tmp_path, {"quant": {"preset": "fp"}, "qat": {"init_from": "out/fp"}})
    assert "qat.init_from" in msg


def test_bad_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("fp: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, {"task": "rt"})
    rec = load_recipe(p, ["qat.lr=3e-6", "quant.preset=linear", "fp.steps=7", "qat.init_from=null"])
    assert rec.qat.lr == 3e-6 and rec.quant.preset == "linear" and rec.fp.steps == 7
    assert "unknown key 'qat.lrr'" in _err(tmp_path, {}, ["qat.lrr=1"])
    assert "quant.weight_bits must be one of" in _err(tmp_path, {}, ["quant.weight_bits=5"])
    for bad in ("qat.lr", "=3", "qat..lr=1"):
        with pytest.raises(ConfigError, match="bad --set"):
            load_recipe(p, [bad])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"task": "rt"}, ["task.x=1"])


def test_defaults_and_dump_roundtrip() -> None:
    rec = Recipe()
    assert rec.model == "minilm" and rec.quant.preset == "full" and rec.qat.init_from is None
    assert validate_recipe(rec.dump()) == rec


def test_seed_recipes_are_generated_and_cover_the_tables() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "tools" / "make_seed_recipes.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    seeds = {p.relative_to(root / "recipes" / "seeds").as_posix() for p in RECIPES if "seeds" in p.parts}
    # seed 003's table: LSQ 4/2-bit on each group and union, SST-2 and RTE
    for task in ("sst2", "rte"):
        for bits in (4, 2):
            for g in ("ffn", "emb", "qkv", "ffn+emb", "emb+qkv", "ffn+qkv", "all"):
                assert f"003/glue-{task}-roberta-base-lsq{bits}-{g}.yaml" in seeds
    assert "003/glue-cola-roberta-base-lsq2-ffn-kd-trm.yaml" in seeds
    for cyc in ("4-8", "4-16", "8-16", "8"):
        assert f"004/glue-mnli-roberta-base-cpt-{cyc}.yaml" in seeds
    rec = load_recipe(root / "recipes/seeds/003/glue-rte-roberta-base-lsq2-all.yaml")
    assert rec.quant.weights is not None and rec.quant.weights.groups == "FFN+EMB+QKV"
    ptq = load_recipe(root / "recipes/seeds/004/glue-sst2-roberta-base-ptq4-mha.yaml")
    assert ptq.qat.epochs == 0 and ptq.quant.weights is not None and ptq.quant.weights.bits == 4
    latent = load_recipe(root / "recipes/seeds/002/ag_news-transformer2l-bin-ir-all_qk-latent.yaml")
    assert latent.quant.schedule.latent_steps > 0 and not latent.runs_fp  # from scratch
    assert load_recipe(root / "recipes/seeds/002/ag_news-transformer2l-bin-ir-all_qk-pretrained.yaml").runs_fp


def test_seed_002_model_builds() -> None:
    from qexport.models import load_model

    model, _ = load_model("random:transformer-2l", num_labels=4)
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 4
