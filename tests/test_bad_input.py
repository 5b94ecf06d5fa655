"""Every bad input gets one line that names what and where, a non-zero exit, no traceback, and
leaves no new file behind. One row per case; each case builds what it needs under a fresh folder."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TEST_DATA, save_backbone
from xprompt.cli import app

runner = CliRunner()
GOOD = '{"premise": "a", "hypothesis": "b", "label": "neutral"}'
TRAIN = ["train", "--max-steps", "2", "--eval-every", "2", "--prompt-length", "2", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert_dir):
    runs = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, [*TRAIN, "--backbone", str(tiny_bert_dir), "--data-dir", str(TEST_DATA),
                                 "--runs-dir", str(runs), "--run-name", "done"])
    assert result.exit_code == 0, result.output
    return runs / "done"


def data_with(tmp: Path, relative: str, lines: list[str] | bytes) -> Path:
    root = tmp / "data"
    shutil.copytree(TEST_DATA, root)
    path = root / relative
    for p in root.glob(str(Path(relative).parent / (Path(relative).name.split(".")[0] + ".*"))):
        p.unlink()  # the case's file replaces the test copy (any compression)
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return root


def tasks_with(tmp: Path, edit) -> Path:
    import yaml

    root = tmp / "tasks"
    root.mkdir()
    card = yaml.safe_load((Path(__file__).parent.parent / "tasks" / "xnli.yaml").read_text())
    edit(card)
    (root / "xnli.yaml").write_text(yaml.safe_dump(card, allow_unicode=True))
    return root


def run_copy(tmp: Path, finished: Path) -> Path:
    target = tmp / "runs" / "copy"
    shutil.copytree(finished, target)
    return target


def nan_backbone(tmp: Path, tiny_bert_dir: Path) -> Path:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir)
    model.embeddings.LayerNorm.weight.data[:] = float("nan")
    return save_backbone(model, tiny_bert_dir, tmp / "nan_bert")


# (id, builder(tmp, ctx) -> argv, exit code, message)
CASES = [
    ("unknown-task", lambda t, c: ["train", "--task", "nope"], 1, "unknown task 'nope'"),
    ("unknown-train-language", lambda t, c: ["train", "--lang", "zh"], 1, "train split of xnli: zh; known: en"),
    ("unknown-method", lambda t, c: ["train", "--method", "lora"], 2, "Invalid value for '--method'"),
    ("prompt-length-zero", lambda t, c: ["train", "--prompt-length", "0"], 2, "prompt_length must be >= 1"),
    ("bad-readout", lambda t, c: ["train", "--readout", "cls"], 2, "readout must be auto, mask, mean, both or first, got 'cls'"),
    ("zero-lr", lambda t, c: ["train", "--lr", "0"], 2, "lr must be > 0"),
    ("backbone-folder-without-config", lambda t, c: (t / "empty").mkdir() or ["train", "--backbone", str(t / "empty")], 1, "has no config.json"),
    ("backbone-unknown-offline", lambda t, c: ["train", "--backbone", "no-org/no-model"], 1, "cannot load backbone 'no-org/no-model'"),
    ("data-dir-missing", lambda t, c: [*c["train"], "--data-dir", str(t / "nowhere")], 1, "is not a folder"),
    ("malformed-json", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl", [GOOD, '{"premise": ']))], 1, "train_9k.en.jsonl:2: malformed JSON"),
    ("missing-field", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl", ['{"premise": "a", "label": "neutral"}']))], 1, ":1: field 'hypothesis' is missing"),
    ("unknown-label", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl", [GOOD, GOOD.replace("neutral", "unsure")]))], 1, ":2: label 'unsure' is not a label of task xnli"),
    ("empty-split", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl", []))], 1, "the split is empty"),
    ("truncated-gzip", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl.gz", _half(gzip.compress("".join(GOOD.replace('"a"', f'"{i}"') + "\n" for i in range(300)).encode()))))], 1, "cannot read"),
    ("binary-garbage", lambda t, c: [*c["train"], "--data-dir", str(data_with(t, "mnli/train_9k.en.jsonl", b"\xff\xfe\x00garbage"))], 1, "train_9k.en.jsonl"),
    ("too-many-shots", lambda t, c: [*c["train"], "--data-dir", str(TEST_DATA), "--shots", "50"], 1, "--shots 50 asks for more examples than class 0 has (40)"),
    ("template-without-mask", lambda t, c: [*c["train"], "--tasks-dir", str(tasks_with(t, lambda d: d.update(template="{premise} {hypothesis}")))], 1, "must contain exactly one <mask>"),
    ("template-without-field", lambda t, c: [*c["train"], "--tasks-dir", str(tasks_with(t, lambda d: d.update(template="{premise} <mask>")))], 1, "lacks field(s) {hypothesis}"),
    ("duplicate-label-words", lambda t, c: [*c["train"], "--tasks-dir", str(tasks_with(t, lambda d: d["languages"]["zh"]["label_words"].update(neutral="是的")))], 1, "label word(s) 是的 used for more than one label"),
    ("bad-yaml", lambda t, c: ((t / "tasks").mkdir(), (t / "tasks" / "xnli.yaml").write_text("name: [x\n"))[0] or [*c["train"], "--tasks-dir", str(t / "tasks")], 1, "not valid YAML"),
    ("run-name-escapes", lambda t, c: [*c["train"], "--run-name", "../outside"], 1, "may hold only letters"),
    ("runs-dir-is-a-file", lambda t, c: (t / "afile").write_text("x") and [*c["train"], "--runs-dir", str(t / "afile")], 1, "cannot create a run under"),
    ("resume-finished", lambda t, c: ["train", "--resume", str(c["finished"])], 1, "already finished"),
    ("resume-not-a-run", lambda t, c: (t / "notrun").mkdir() or ["train", "--resume", str(t / "notrun")], 1, "config.json is missing"),
    ("same-name-other-config", lambda t, c: [*c["train"], "--runs-dir", str(c["finished"].parent), "--run-name", "done", "--lr", "0.5"], 1, "exists with another config"),
    ("nan-loss", lambda t, c: [*TRAIN, "--backbone", str(nan_backbone(t, c["tiny"])), "--data-dir", str(TEST_DATA), "--runs-dir", str(t / "runs")], 1, "loss became nan at step 1; lower --lr"),
    ("eval-no-runs", lambda t, c: ["eval", "--runs-dir", str(t)], 1, "no finished run under"),
    ("eval-not-a-run", lambda t, c: ["eval", "--run", str(t)], 1, "holds no trained prompt"),
    ("eval-unknown-language", lambda t, c: ["eval", "--run", str(c["finished"]), "--langs", "en,xx"], 1, "dev split of xnli: xx"),
    ("eval-unknown-split", lambda t, c: ["eval", "--run", str(c["finished"]), "--split", "valid"], 2, "unknown split 'valid'"),
    ("eval-zero-limit", lambda t, c: ["eval", "--run", str(c["finished"]), "--limit", "0"], 2, "--limit must be at least 1"),
    ("eval-other-backbone", lambda t, c: ["eval", "--run", str(c["finished"]), "--backbone", str(c["other"])], 1, "the prompt was trained on backbone"),
    ("eval-corrupt-prompt", lambda t, c: (run_copy(t, c["finished"]) / "prompt" / "prompt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad") and ["eval", "--run", str(t / "runs" / "copy")], 1, "corrupt or truncated safetensors"),
    ("eval-truncated-prompt", lambda t, c: _truncate(run_copy(t, c["finished"]) / "prompt" / "prompt.safetensors") or ["eval", "--run", str(t / "runs" / "copy")], 1, "corrupt or truncated safetensors"),
    ("eval-shape-mismatch", lambda t, c: _edit_card(run_copy(t, c["finished"]), prompt_length=5) or ["eval", "--run", str(t / "runs" / "copy")], 1, "has shape (2, 32), this model needs (5, 32)"),
    ("eval-card-not-json", lambda t, c: (run_copy(t, c["finished"]) / "prompt" / "xprompt.json").write_text("{oops") and ["eval", "--run", str(t / "runs" / "copy")], 1, "xprompt.json: not valid JSON"),
    ("eval-no-label-map", lambda t, c: ["eval", "--run", str(c["finished"]), "--task", "pawsx"], 1, "task pawsx declares no label map from xnli"),
    ("library-transfer-unlabelled-test", lambda t, c: ["library", "transfer", "--task", "xnli", "--lang", "de", "--split", "test", "--backbone", str(c["tiny"]), "--runs-dir", str(c["finished"].parent)], 1, "the test rows of xnli/de carry no labels here (300 of the first 300 unlabelled), so no transfer accuracy can be scored on them; score on labelled rows with --split dev"),
    ("library-transfer-unlabelled-test-data-dir", lambda t, c: ["library", "transfer", "--task", "xnli", "--lang", "zh", "--split", "test", "--limit", "5", "--backbone", str(c["tiny"]), "--runs-dir", str(c["finished"].parent), "--data-dir", str(TEST_DATA)], 1, "the test rows of xnli/zh carry no labels here (5 of the first 5 unlabelled)"),
    ("eval-malformed-dev", lambda t, c: ["eval", "--run", str(c["finished"]), "--langs", "de", "--data-dir", str(data_with(t, "xnli/dev.de.jsonl", [GOOD, "{"]))], 1, "dev.de.jsonl:2: malformed JSON"),
]


def _half(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _edit_card(run: Path, **changes) -> None:
    card_path = run / "prompt" / "xprompt.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), **changes}))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, finished, tiny_bert_dir, other_bert_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, build, code, message = case
    ctx = {
        "finished": finished,
        "other": other_bert_dir,
        "tiny": tiny_bert_dir,
        "train": [*TRAIN, "--backbone", str(tiny_bert_dir), "--runs-dir", str(tmp_path / "runs")],
    }
    argv = build(tmp_path, ctx)
    before_tmp, before_run = _files(tmp_path), _files(finished)
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert message in text, text
    if code == 1:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert sum(line.startswith("error:") for line in lines) == 1
    assert _files(tmp_path) == before_tmp, "a failed command left files behind"
    assert _files(finished) == before_run


def test_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    from xprompt import store
    from xprompt.errors import XPromptError

    target = tmp_path / "metrics.json"
    store.write_json(target, {"ok": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", no_space)
    with pytest.raises(XPromptError, match=r"cannot write .*metrics.json: No space left on device \(disk full"):
        store.write_json(target, {"ok": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_writers_sharing_one_store_lose_no_record(tmp_path):
    """update_json reads, merges and writes under one lock: four writers adding records to one JSON store, each
    slow between its read and its write (where an unlocked read-merge-write loses the others' records), keep all."""
    import threading
    import time

    from xprompt.fileio import update_json

    target = tmp_path / "store.json"

    def add(data, name):
        time.sleep(0.01)
        return {"runs": [*data.get("runs", []), name]}

    def writer(w):
        for i in range(5):
            update_json(target, lambda data: add(data, f"{w}-{i}"))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(json.loads(target.read_text())["runs"]) == sorted(f"{w}-{i}" for w in range(4) for i in range(5))


def test_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tmp_path, tiny_bert_dir, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, not an OSError: the training command still
    ends in one line naming the file, the checkpoint before stands, no temporary file is left, and the run
    continues from it with --resume once there is room (the same prompt as a run never interrupted)."""
    from safetensors import SafetensorError

    from xprompt import checkpoints

    real, calls = checkpoints.save_file, []

    def fills_the_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 2 is written, that of step 4 is not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    runs = tmp_path / "runs"
    cmd = ["train", "--max-steps", "4", "--eval-every", "2", "--prompt-length", "2", "--dtype", "fp32",
           "--backbone", str(tiny_bert_dir), "--data-dir", str(TEST_DATA), "--runs-dir", str(runs)]
    monkeypatch.setattr(checkpoints, "save_file", fills_the_disk)
    result = runner.invoke(app, [*cmd, "--run-name", "full"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, (result.output, repr(result.exception))
    assert "No space left on device" in lines[0] and "state-00000004.safetensors" in lines[0]
    folder = runs / "full" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["state-00000002.safetensors", "state.json"]
    monkeypatch.setattr(checkpoints, "save_file", real)
    resumed = runner.invoke(app, ["train", "--resume", str(runs / "full")])
    assert resumed.exit_code == 0, resumed.output
    whole = runner.invoke(app, [*cmd, "--run-name", "whole"])
    assert whole.exit_code == 0, whole.output
    from safetensors.torch import load_file

    a, b = (load_file(str(runs / n / "prompt" / "prompt.safetensors")) for n in ("full", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_locked_run_is_refused(finished, tmp_path, tiny_bert_dir):
    from xprompt.store import run_lock

    run = tmp_path / "runs" / "busy"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "prompt")
    with run_lock(run):
        result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 1
    assert "is being trained by another process" in " ".join(result.output.split())
