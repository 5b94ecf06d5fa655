import gzip
import json

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from conftest import TEST_DATA
from xprompt import data as data_mod
from xprompt.data import NO_LABEL, TemplateEncoder, batches, encode, holdout_split, load_split, sample_shots
from xprompt.errors import XPromptError


def test_load_from_data_dir_plain_jsonl(xnli):
    ds = load_split(xnli, "zh", "dev", [TEST_DATA], use_hub=False)
    assert len(ds) == 24
    assert set(ds.column_names) == {"id", "premise", "hypothesis", "label"}
    first = json.loads((TEST_DATA / "xnli/dev.zh.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert ds[0]["premise"] == first["premise"]
    assert ds[0]["label"] == xnli.labels.index(first["label"])


def test_bundled_copy_is_used_without_data_dir(xnli):
    ds = load_split(xnli, "sw", "dev", [], use_hub=False)
    assert len(ds) == 2490  # the full XNLI dev set the repository carries
    assert sorted(set(ds["label"])) == [0, 1, 2]
    pool = load_split(xnli, "en", "train", [], use_hub=False)
    assert len(pool) == 8999


def test_data_dir_wins_over_bundled_copy(xnli):
    assert len(load_split(xnli, "en", "dev", [TEST_DATA], use_hub=False)) == 24


def test_unlabeled_test_split(xnli):
    ds = load_split(xnli, "zh", "test", [TEST_DATA], use_hub=False)
    assert set(ds["label"]) == {NO_LABEL}


def test_hub_fallback_maps_class_labels(xnli, monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                             "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
        return Dataset.from_dict({"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [2, 0]}, features=features)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data_mod, "BUNDLED_DATA_DIR", tmp_path)  # nothing local
    ds = load_split(xnli, "fr", "dev", [tmp_path])
    assert calls == [("facebook/xnli", "fr", "validation")]
    assert ds["label"] == [2, 0]
    assert ds["id"] == ["0", "1"]


def test_hub_failure_is_one_line(xnli, monkeypatch, tmp_path):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(data_mod, "BUNDLED_DATA_DIR", tmp_path)
    with pytest.raises(XPromptError) as info:
        load_split(xnli, "fr", "dev", [tmp_path])
    assert "ConnectionError: no network" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"premise": "a", "hypothesis": "b", "label": "neutral"}', '{"premise": "a", '], r"dev.en.jsonl:2: malformed JSON"),
        (['{"premise": "a", "label": "neutral"}'], r"dev.en.jsonl:1: field 'hypothesis' is missing"),
        (['{"premise": "a", "hypothesis": 3, "label": "neutral"}'], r":1: field 'hypothesis' is not a string"),
        (['{"premise": "a", "hypothesis": "b", "label": "maybe"}'], r":1: label 'maybe' is not a label of task xnli \(known: entailment, neutral, contradiction\)"),
        (['[1, 2]'], r":1: expected a JSON object"),
        ([], r"dev.en.jsonl: the split is empty"),
    ],
)
def test_bad_files_name_file_and_line(xnli, tmp_path, lines, message):
    (tmp_path / "xnli").mkdir()
    (tmp_path / "xnli" / "dev.en.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(XPromptError, match=message):
        load_split(xnli, "en", "dev", [tmp_path], use_hub=False)


def test_truncated_gzip_is_a_clear_error(xnli, tmp_path):
    (tmp_path / "xnli").mkdir()
    blob = gzip.compress(b'{"premise": "a", "hypothesis": "b", "label": "neutral"}\n' * 500)
    (tmp_path / "xnli" / "dev.en.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(XPromptError, match="cannot read"):
        load_split(xnli, "en", "dev", [tmp_path], use_hub=False)


def test_missing_file_without_hub(xnli, tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "BUNDLED_DATA_DIR", tmp_path)
    with pytest.raises(XPromptError, match="no file xnli/test.de.jsonl.gz under"):
        load_split(xnli, "de", "test", [tmp_path], use_hub=False)


def test_kshot_sampling(xnli):
    pool = load_split(xnli, "en", "train", [TEST_DATA], use_hub=False)
    rows = sample_shots(pool, 4, seed=13, num_labels=3)
    labels = [pool[i]["label"] for i in rows]
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert rows == sample_shots(pool, 4, seed=13, num_labels=3)
    assert rows != sample_shots(pool, 4, seed=21, num_labels=3)
    other = sample_shots(pool, 4, seed=14, num_labels=3, exclude=set(rows))
    assert not set(other) & set(rows)
    with pytest.raises(XPromptError, match="--shots 41 asks for more examples than class 0 has \\(40\\)"):
        sample_shots(pool, 41, seed=1, num_labels=3)


def test_holdout_is_disjoint_and_seeded(xnli):
    pool = load_split(xnli, "en", "train", [TEST_DATA], use_hub=False)
    train, held = holdout_split(pool, 20, seed=3)
    assert len(train) == 100 and len(held) == 20
    assert not set(train["id"]) & set(held["id"])
    assert holdout_split(pool, 20, seed=3)[1]["id"] == held["id"]


def test_template_encoder_places_mask_and_truncates(tokenizer):
    enc = TemplateEncoder("{premise} ? <mask> , {hypothesis}", tokenizer, max_length=16)
    long = "word " * 40
    out = enc({"premise": ["Hello world", long], "hypothesis": ["Good bye", "short one"]})
    ids, pos = out["input_ids"], out["mask_pos"]
    for row, p in zip(ids, pos):
        assert row[p] == tokenizer.mask_token_id
        assert row.count(tokenizer.mask_token_id) == 1
        assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    assert len(ids[1]) == 16  # cut to max_length, the long premise gave up its tail
    text = tokenizer.decode(ids[1])
    assert "short one" in text
    assert out["length"] == [len(r) for r in ids]


def test_batches_pad_and_sort(xnli, tokenizer):
    ds = encode(load_split(xnli, "de", "dev", [TEST_DATA], use_hub=False), xnli.template, tokenizer)
    seen = []
    widths = []
    for batch in batches(ds, 5, tokenizer.pad_token_id):
        widths.append(batch["input_ids"].shape[1])
        assert (batch["attention_mask"].sum(1) == batch["attention_mask"].sum(1)).all()
        lengths = batch["attention_mask"].sum(1).tolist()
        assert lengths == [ds[i]["length"] for i in batch["index"].tolist()]
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    assert widths == sorted(widths)  # evaluation batches come shortest first
    a = [b["index"].tolist() for b in batches(ds, 5, 1, shuffle=True, seed=1, epoch=0)]
    b = [b["index"].tolist() for b in batches(ds, 5, 1, shuffle=True, seed=1, epoch=0)]
    c = [b["index"].tolist() for b in batches(ds, 5, 1, shuffle=True, seed=1, epoch=1)]
    assert a == b and a != c


def test_ocnli_rows_without_majority_are_dropped():
    from xprompt.tasks import load_task

    ocnli = load_task("ocnli")
    ds = load_split(ocnli, "zh", "dev", [TEST_DATA], use_hub=False)
    assert len(ds) == 21
    assert len(load_split(ocnli, "zh", "dev", [], use_hub=False)) == 2950  # the bundled dev, "-" rows gone


def test_list_fields_are_joined_and_other_types_refused(tmp_path):
    from xprompt.tasks import load_task

    csl = load_task("csl")
    (tmp_path / "fewclue" / "csl").mkdir(parents=True)
    path = tmp_path / "fewclue" / "csl" / "dev_few_all.zh.jsonl"
    path.write_text('{"id": 1, "abst": "摘要", "keyword": ["图像", "分割"], "label": "1"}\n', encoding="utf-8")
    ds = load_split(csl, "zh", "dev", [tmp_path], use_hub=False)
    assert ds[0]["keyword"] == "图像，分割"
    path.write_text('{"id": 1, "abst": "摘要", "keyword": [1, 2], "label": "1"}\n', encoding="utf-8")
    with pytest.raises(XPromptError, match="field 'keyword' is not a string"):
        load_split(csl, "zh", "dev", [tmp_path], use_hub=False)


def test_tokenisation_is_cached_by_rows_template_and_tokenizer(tokenizer, xnli, tmp_path):
    ds = load_split(xnli, "de", "dev", [TEST_DATA])
    first = encode(ds, xnli.template, tokenizer, 128, tmp_path)
    files = sorted(tmp_path.glob("encoded-*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])
    again = encode(ds, xnli.template, tokenizer, 128, tmp_path)
    assert again.cache_files[0]["filename"] == str(files[0]) and len(list(tmp_path.glob("encoded-*.arrow"))) == 1
    assert again["input_ids"][:] == encode(ds, xnli.template, tokenizer, 128)["input_ids"][:]
    # another template, max_length or set of rows is another key
    encode(ds, "{hypothesis} ? <mask> , {premise}", tokenizer, 128, tmp_path)
    encode(ds, xnli.template, tokenizer, 64, tmp_path)
    encode(ds.select(range(3)), xnli.template, tokenizer, 128, tmp_path)
    assert len(list(tmp_path.glob("encoded-*.arrow"))) == 4


def test_scores_are_scikit_learn_s_accuracy_and_macro_f1():
    """evaluation.scores computes without scikit-learn what its metrics give (it is not imported to evaluate)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from xprompt.evaluation import scores

    rng = np.random.default_rng(0)
    for k, n in ((3, 50), (4, 7), (119, 300), (2, 1)):
        labels, preds = rng.integers(0, k, n), rng.integers(0, k, n)
        preds[: n // 3] = labels[: n // 3]
        got = scores(labels, preds, k)
        assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
        assert got["macro_f1"] == pytest.approx(
            f1_score(labels, preds, average="macro", labels=list(range(k)), zero_division=0), abs=1e-12)
