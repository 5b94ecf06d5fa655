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
