import re
from pathlib import Path

import pytest
import torch

from xprompt.errors import XPromptError
from xprompt.store import new_run_dir

PACKAGE = Path(__file__).resolve().parent.parent / "xprompt"


def test_no_pickle_no_torch_load_no_eval_in_the_package():
    pattern = re.compile(r"\bpickle\b|torch\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(")
    hits = [f"{p.name}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", ""])
def test_run_names_cannot_escape(tmp_path, name):
    with pytest.raises(XPromptError, match="may hold only"):
        new_run_dir(tmp_path, name)


def test_pickled_checkpoint_is_refused(tmp_path, tiny_bert_dir):
    import shutil

    from xprompt.backbones import load_backbone

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, folder)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(XPromptError, match="cannot load backbone"):
        load_backbone(str(folder), tmp_path / "cache")
