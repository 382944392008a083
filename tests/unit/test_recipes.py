"""Every shipped recipe validates; bad recipes fail early with one ConfigError line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qexport.config import PRESET_NAMES, WEIGHT_BITS, Recipe, apply_overrides, load_recipe, validate_recipe
from qexport.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


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
    assert rec.quant.preset in path.stem  # the file name says which preset it is
    assert rec.runs_qat == (rec.quant.preset != "fp")


def test_constants_mirror_quant() -> None:
    from qexport.quant import PRESETS
    from qexport.quant.presets import WEIGHT_BITS as QUANT_BITS

    assert tuple(PRESETS) == PRESET_NAMES
    assert tuple(QUANT_BITS) == WEIGHT_BITS


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
