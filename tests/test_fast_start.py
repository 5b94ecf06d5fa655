"""A fast start (issue 34): help, version, the task list and every name error answer without importing
torch, in a process of their own (as a user meets them); the method list the CLI reads without torch
is the registry's."""

import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = """
import sys
from typer.testing import CliRunner
from xprompt.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print("EXIT", result.exit_code, "TORCH", "torch" in sys.modules, "DATASETS", "datasets" in sys.modules)
print(result.output)
"""


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "Zero-shot cross-lingual prompt tuning"),
    (["-h"], 0, "Zero-shot cross-lingual prompt tuning"),
    (["train", "-h"], 0, "--unlabeled-file"),
    (["--version"], 0, "xprompt 0."),
    (["tasks"], 0, "xnli"),
    (["eval", "--task", "nosuchtask", "--langs", "en"], 1, "unknown task 'nosuchtask'"),
    (["eval", "--run", "no/such/run"], 1, "holds no trained prompt"),
    (["train", "--task", "nosuchtask"], 1, "unknown task 'nosuchtask'"),
    (["train", "--lang", "xx"], 1, "unknown language(s) for the train split of xnli: xx"),
    (["train", "--unlabeled", "zz"], 1, "unknown language(s) for the test split of xnli: zz"),
    (["train", "--unlabeled", "de", "--unlabeled-file", "x/{language}.jsonl"], 1, "unknown placeholder(s) {language}"),
    (["train", "--method", "nope"], 2, "Invalid value for '--method'"),
    (["train", "--seeds", "1,x"], 2, "--seeds must be comma-separated ints"),
    (["serve", "-h"], 0, "--max-wait-ms"),
    (["serve", "--run", "no/such/run"], 1, "holds no trained prompt"),
    (["serve", "--run", "no/such/run", "--max-batch", "0"], 2, "--max-batch must be at least 1"),
])
def test_names_and_help_answer_without_importing_torch(args, code, says):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    first, _, rest = out.stdout.partition("\n")
    assert first == f"EXIT {code} TORCH False DATASETS False", out.stdout + out.stderr
    assert says in " ".join(rest.split()) and "Traceback" not in rest


def test_the_method_list_without_torch_is_the_registry_s():
    from xprompt.config import METHODS
    from xprompt.prompts import method_help, method_names

    assert method_names() == list(METHODS)
    assert method_help() == "; ".join(f"{name}: {text}" for name, text in METHODS.items())


def test_ctrl_c_while_a_model_loads_ends_with_one_line(monkeypatch, tmp_path):
    import xprompt.backbones as backbones
    from typer.testing import CliRunner

    from xprompt.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "open_backbone", interrupted)
    out = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path / "runs"), "--max-steps", "1"])
    assert out.exit_code == 130 and out.output.strip().startswith("interrupted;") and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_the_embedded_tokenizer_reads_as_autotokenizer_reads_it(tmp_path):
    """``embedded.load_tokenizer`` (tokenizer.json read directly, half AutoTokenizer's time) gives
    AutoTokenizer's tokenizer: the same backend, special tokens and ids."""
    from transformers import AutoTokenizer

    from xprompt.backbones.embedded import embedded_tokenizer, load_tokenizer

    embedded_tokenizer().save_pretrained(tmp_path)
    fast, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert fast.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    for name in ("pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                 "unk_token_id", "model_max_length", "all_special_ids", "padding_side", "truncation_side"):
        assert getattr(fast, name) == getattr(auto, name), name
    texts = ["Der Hund läuft. <mask> ja", "今天天气很好", "x " * 300]
    assert (fast(texts, ["b", "c", "d"], truncation=True, max_length=128)["input_ids"]
            == auto(texts, ["b", "c", "d"], truncation=True, max_length=128)["input_ids"])


def test_a_file_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from xprompt.backbones import embedded

    weights, memo = tmp_path / "model.safetensors", tmp_path / "cache" / "sha256.json"
    weights.write_bytes(b"a" * 1000)
    first = embedded.file_sha256(weights, memo=memo)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() == embedded.file_sha256(weights)

    class Unread:
        def __init__(self, *a):
            raise AssertionError("hashed again")

    with monkeypatch.context() as m:
        m.setattr(embedded.hashlib, "sha256", Unread)
        assert embedded.file_sha256(weights, memo=memo) == first  # remembered: not read
    weights.write_bytes(b"b" * 1000)  # same size, new content and mtime
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert embedded.file_sha256(weights, memo=memo) == hashlib.sha256(b"b" * 1000).hexdigest()


@pytest.mark.parametrize("caller", ["collecting", "not collecting", "with frozen objects"])
def test_start_up_runs_without_the_collector_and_the_command_gives_it_back(caller, monkeypatch, tmp_path):
    """Imports and loading make millions of objects and little garbage: ``command`` turns the collector
    off until the backbone is open, then (``startup_over``) freezes what start-up made and turns it on;
    at the end the caller gets the collector as it had it: on or off, and frozen only if it froze (a
    caller with frozen objects of its own: neither frozen nor unfrozen by the command)."""
    import gc

    import xprompt.backbones as backbones
    from typer.testing import CliRunner

    from xprompt.cli import app

    seen, calls = {}, []
    freeze, unfreeze = gc.freeze, gc.unfreeze

    class Opened:  # what open_backbone returns; reading its model (after startup_over) stops the command
        @property
        def model(self):
            seen["after the load"] = gc.isenabled()
            raise KeyboardInterrupt

    def opened(*args, **kwargs):
        seen["while loading"] = gc.isenabled()
        return Opened(), "fp32", {"where": "cpu", "reason": "test"}

    monkeypatch.setattr(backbones, "open_backbone", opened)
    if caller == "with frozen objects":
        freeze()
    monkeypatch.setattr(gc, "freeze", lambda: (calls.append("freeze"), freeze())[1])
    monkeypatch.setattr(gc, "unfreeze", lambda: (calls.append("unfreeze"), unfreeze())[1])
    if caller == "not collecting":
        gc.disable()
    try:
        out = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path / "runs"), "--max-steps", "1"])
        after = gc.isenabled(), gc.get_freeze_count() > 0
    finally:
        gc.enable()
        unfreeze()
    assert out.exit_code == 130, out.output
    assert seen == {"while loading": False, "after the load": True}
    assert calls == ([] if caller == "with frozen objects" else ["freeze", "unfreeze"])
    assert after == (caller != "not collecting", caller == "with frozen objects")


def test_leaving_the_cli_freezes_the_heap_so_the_exit_does_not_collect_it():
    probe = ("import gc, sys\nfrom xprompt.cli import main\nsys.argv = ['xprompt', 'tasks']\n"
             "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT', e.code, 'FROZEN', gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "EXIT 0 FROZEN True", out.stdout + out.stderr


def test_the_embedded_tokenizer_is_read_only_when_a_split_needs_tokenising(tmp_path):
    """``LazyTokenizer``: a split already in the cache is read with the special ids and the cache key
    alone (remembered beside tokenizer.json's stamp), without reading the 12 MB file; tokenising
    reads it and gives the tokenizer's own ids; a changed file is not taken for the old one."""
    import os

    import datasets

    from xprompt.backbones.embedded import embedded_tokenizer, load_tokenizer
    from xprompt.backbones.lazy import SPECIAL_IDS, LazyTokenizer
    from xprompt.data import _tokenizer_key, encode

    folder, memo, cache = tmp_path / "tok", tmp_path / "cache" / "sha256.json", tmp_path / "encoded"
    embedded_tokenizer().save_pretrained(folder)
    real = load_tokenizer(folder)
    rows = datasets.Dataset.from_dict({"id": ["a", "b"], "premise": ["Der Hund läuft.", "今天天气很好"],
                                       "hypothesis": ["Ein Tier.", "天气"], "label": [0, 2]})
    template = "{premise} ? <mask> , {hypothesis}"
    first = LazyTokenizer(folder, memo)  # memo empty: reads the file once to learn the key and ids
    assert first._tokenizer is not None and memo.is_file()
    assert first._xprompt_key == _tokenizer_key(real)
    assert {n: getattr(first, n) for n in SPECIAL_IDS} == {n: getattr(real, n) for n in SPECIAL_IDS}
    written = encode(rows, template, first, 32, cache)

    lazy = LazyTokenizer(folder, memo)
    again = encode(rows, template, lazy, 32, cache)
    assert lazy._tokenizer is None and lazy.pad_token_id == real.pad_token_id == 1  # nothing read
    assert again["input_ids"] == written["input_ids"] == encode(rows, template, real)["input_ids"]
    assert lazy("Der Hund", add_special_tokens=False)["input_ids"] == real("Der Hund", add_special_tokens=False)["input_ids"]
    assert lazy._tokenizer is not None and len(lazy) == len(real) == 250002

    for name in ("tokenizer.json", "tokenizer_config.json"):  # either touched: the memo no longer answers
        assert LazyTokenizer(folder, memo)._tokenizer is None
        stat = os.stat(folder / name)
        os.utime(folder / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
        assert LazyTokenizer(folder, memo)._tokenizer is not None


def test_the_cli_sets_glibc_s_allocator_for_tensors_unless_the_user_did(monkeypatch):
    """``roomy_malloc`` (called first by ``xprompt``): mallopt accepts both settings where the C
    library is glibc; a user's own ``MALLOC_*`` variable leaves the allocator to them."""
    import os
    import platform

    from xprompt.cli.common import roomy_malloc

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert roomy_malloc() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert roomy_malloc() is False
