import re
from pathlib import Path

import pytest
import torch

from xprompt.errors import XPromptError
from xprompt.store import new_run_dir

PACKAGE = Path(__file__).resolve().parent.parent / "xprompt"


def test_no_pickle_no_torch_load_no_eval_in_the_package():
    # (the one mention allowed: the --allow-bin-weights opt-in, read by transformers with weights_only=True)
    pattern = re.compile(r"\bpickle\b|torch\.load\((?!weights_only=True\))|(?<![\w.])eval\(|(?<![\w.])exec\(")
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
    with pytest.raises(XPromptError, match="only pytorch_model.bin weights"):
        load_backbone(str(folder), tmp_path / "cache")


def test_the_bin_opt_in_reads_tensors_only(tiny_bert_dir, tmp_path, monkeypatch):
    """--allow-bin-weights hands the .bin to transformers with weights_only=True (never full unpickling)."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModel

    from xprompt.backbones import load_backbone

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    seen = {}
    real = AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", classmethod(spy))
    bb = load_backbone(str(folder), tmp_path / "cache", allow_bin_weights=True)
    assert seen["weights_only"] is True and bb.bin_weights
