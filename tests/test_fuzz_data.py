"""Property tests: whatever bytes or JSON a data file holds, the loader returns rows or raises a
one-line XPromptError naming the file, never another exception."""

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xprompt.data import read_jsonl
from xprompt.errors import XPromptError
from xprompt.tasks import load_task

XNLI = load_task("xnli")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
rows = st.dictionaries(
    st.sampled_from(["id", "premise", "hypothesis", "label", "extra"]),
    json_values | st.sampled_from(["entailment", "neutral", "contradiction"]),
    max_size=5,
)


def _load(blob: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"dev.en.jsonl{suffix}"
        path.write_bytes(blob)
        try:
            ds = read_jsonl(path, XNLI)
        except XPromptError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return None
        assert set(ds.column_names) == {"id", "premise", "hypothesis", "label"}
        assert all(-1 <= label < 3 for label in ds["label"])
        return ds


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(blob):
    _load(blob, "")


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_gzip(blob):
    _load(blob, ".gz")
    _load(gzip.compress(blob), ".gz")


@SETTINGS
@given(st.lists(rows, max_size=6))
def test_random_json_rows(objs):
    blob = "\n".join(json.dumps(o) for o in objs).encode()
    ds = _load(blob, "")
    valid = [o for o in objs]
    if ds is not None:
        assert len(ds) == len(valid)
