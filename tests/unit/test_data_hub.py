"""GLUE / ag_news: the datasets.load_dataset path and row conversion, on small local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from qexport.data import Example, get_task  # noqa: E402
from qexport.data.hub import columns_to_examples  # noqa: E402
from qexport.errors import DataError  # noqa: E402


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cola_from_jsonl(tmp_path: Path) -> None:
    train = _jsonl(
        tmp_path / "train.jsonl",
        [
            {"sentence": "The cat sat.", "label": 1, "idx": 0},
            {"sentence": "Cat the sat.", "label": 0, "idx": 1},
        ],
    )
    test = _jsonl(tmp_path / "test.jsonl", [{"sentence": "Hidden.", "label": -1, "idx": 0}])
    task = get_task("cola", data_files={"train": train, "test": str(test)}, cache_dir=tmp_path / "cache")
    assert task.load("train") == [Example("The cat sat.", None, 1), Example("Cat the sat.", None, 0)]
    assert task.load("test") == [Example("Hidden.", None, None)]  # GLUE test labels are hidden
    with pytest.raises(DataError, match="no entry for split 'dev'"):
        task.load("dev")


def test_mnli_matched_mismatched_from_parquet(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    files = {}
    for split, label in (("train", 0), ("dev", 1), ("dev_mismatched", 2)):
        files[split] = tmp_path / f"{split}.parquet"
        pd.DataFrame(
            {"premise": [f"p-{split}"], "hypothesis": [f"h-{split}"], "label": [label], "idx": [0]}
        ).to_parquet(files[split])
    task = get_task("mnli", data_files=files, cache_dir=tmp_path / "cache")
    assert task.is_pair and task.metric_name == "mnli_accuracy"
    assert task.load("dev") == [Example("p-dev", "h-dev", 1)]
    assert task.load("dev_mismatched") == [Example("p-dev_mismatched", "h-dev_mismatched", 2)]
    assert task.compute_metric([1, 2], [1, 1])["metric"] == pytest.approx(50.0)


def test_rte_from_tsv(tmp_path: Path) -> None:
    f = tmp_path / "dev.tsv"
    f.write_text("sentence1\tsentence2\tlabel\tidx\nA man runs.\tSomeone moves.\t0\t0\n", encoding="utf-8")
    task = get_task("rte", data_files={"dev": f}, cache_dir=tmp_path / "cache")
    assert task.load("dev") == [Example("A man runs.", "Someone moves.", 0)]


def test_ag_news_carves_dev_from_train(tmp_path: Path) -> None:
    rows = [{"text": f"news item {i}", "label": i % 4} for i in range(400)]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    test = _jsonl(tmp_path / "test.jsonl", rows[:3])
    task = get_task("ag_news", data_files={"train": train, "test": test}, cache_dir=tmp_path / "cache")
    tr, dev = task.load("train"), task.load("dev")
    assert not {e.text for e in tr} & {e.text for e in dev}
    assert sorted(e.text for e in tr + dev) == sorted(r["text"] for r in rows)  # type: ignore[type-var]
    assert 5 <= len(dev) <= 40  # ~5% of 400
    assert task.load("test") == [Example(f"news item {i}", None, i % 4) for i in range(3)]
    # an explicit dev file replaces the carving, and train keeps every row
    task2 = get_task("ag_news", data_files={"train": train, "dev": test}, cache_dir=tmp_path / "cache")
    assert len(task2.load("train")) == 400 and len(task2.load("dev")) == 3


def test_hub_errors(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(DataError, match=r"missing column\(s\) sentence \(found: text, label\)"):
        get_task("sst2", data_files={"train": bad}, cache_dir=tmp_path / "c").load("train")
    out_of_range = _jsonl(tmp_path / "oor.jsonl", [{"sentence": "x", "label": 5}])
    with pytest.raises(DataError, match=r"row 0: label 5 outside 0\.\.1"):
        get_task("sst2", data_files={"train": out_of_range}, cache_dir=tmp_path / "c").load("train")
    with pytest.raises(DataError, match="unknown split"):
        get_task("sst2", data_files={"validation": bad})
    with pytest.raises(DataError, match="file not found"):
        get_task("sst2", data_files={"train": tmp_path / "nope.jsonl"}).load("train")
    odd = tmp_path / "x.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match="unsupported data file type"):
        get_task("sst2", data_files={"train": odd}).load("train")


def test_hub_offline_without_cache_is_one_clear_error(tmp_path: Path) -> None:
    # conftest sets HF_DATASETS_OFFLINE=1 and the cache is empty: must fail fast, in one line
    with pytest.raises(DataError, match="cannot load nyu-mll/glue/sst2") as ei:
        get_task("sst2", cache_dir=tmp_path / "empty").load("dev")
    assert "\n" not in str(ei.value) and ei.value.hint is not None


def test_columns_to_examples_string_labels() -> None:
    cols = {"sentence": ["a", "b"], "label": ["positive", "negative"]}
    out = columns_to_examples(
        cols,
        text_col="sentence",
        pair_col=None,
        label_col="label",
        label_names=("negative", "positive"),
        source="s",
    )
    assert [e.label for e in out] == [1, 0]
    with pytest.raises(DataError, match="unknown label 'meh'"):
        columns_to_examples(
            {"sentence": ["a"], "label": ["meh"]},
            text_col="sentence",
            pair_col=None,
            label_col="label",
            label_names=("negative", "positive"),
            source="s",
        )
    with pytest.raises(DataError, match="row 0: text is missing"):
        columns_to_examples(
            {"sentence": [None], "label": [0]},
            text_col="sentence",
            pair_col=None,
            label_col="label",
            label_names=("negative", "positive"),
            source="s",
        )
