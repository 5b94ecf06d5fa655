"""Prompt similarity measures on constructed tensors, and the `library similar` command."""

import json

import pytest
import torch

from conftest import TEST_DATA
from xprompt.errors import XPromptError
from xprompt.similarity import activated_neurons, flat_cosine, mean_cosine, neuron_overlap


def _prompt(embeddings, layers=None):
    out = {"prompt_embeddings": torch.tensor(embeddings, dtype=torch.float32), "verbalizer.weight": torch.zeros(3, 2)}
    if layers is not None:
        out["layer_prompts"] = torch.tensor(layers, dtype=torch.float32)
    return out


def test_identical_prompts_are_one_orthogonal_are_zero():
    a = _prompt([[1.0, 0.0], [0.0, 2.0]], [[[3.0, 1.0], [1.0, 1.0]]])
    assert flat_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(a, a) == pytest.approx(1.0)
    x, y = _prompt([[1.0, 0.0], [1.0, 0.0]]), _prompt([[0.0, 1.0], [0.0, -1.0]])
    assert flat_cosine(x, y) == pytest.approx(0.0)
    # opposite vectors: flattened cosine -1; their mean vectors (1,0) and (0,0) -> the mean differs
    assert flat_cosine(x, _prompt([[-1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_mean_cosine_by_hand():
    a = _prompt([[1.0, 0.0], [0.0, 1.0]])  # mean (0.5, 0.5)
    b = _prompt([[2.0, 0.0], [2.0, 0.0]])  # mean (2, 0)
    assert mean_cosine(a, b) == pytest.approx(2 ** -0.5)
    # the same vectors in another order: flattened differ, means agree
    c = _prompt([[0.0, 1.0], [1.0, 0.0]])
    assert flat_cosine(a, c) == pytest.approx(0.0)
    assert mean_cosine(a, c) == pytest.approx(1.0)


def test_shapes_must_match_but_label_sets_may_differ():
    a, b = _prompt([[1.0, 0.0]]), _prompt([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(XPromptError, match="different shapes"):
        flat_cosine(a, b)
    c = {**_prompt([[2.0, 0.0]]), "verbalizer.weight": torch.zeros(15, 2)}
    assert flat_cosine(a, c) == pytest.approx(1.0)


def test_neuron_overlap_is_intersection_over_union():
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[True, False, True, False]])
    assert neuron_overlap(a, b) == pytest.approx(1 / 3)
    assert neuron_overlap(a, a) == 1.0
    assert neuron_overlap(a, ~a) == 0.0


def test_activated_neurons_follow_the_prompt(backbone, tokenizer):
    from xprompt.model import build_model

    model = build_model(backbone, 3, "deep", 3, "mask")
    torch.manual_seed(0)
    model.prompt.embeddings.data.normal_()
    model.prompt.layer_prompts.data.normal_()
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    first = activated_neurons(model, *ids)
    assert first.shape == (backbone.num_layers, backbone.model.config.intermediate_size)
    assert neuron_overlap(first, activated_neurons(model, *ids)) == 1.0
    model.prompt.layer_prompts.data.normal_()
    model.prompt.embeddings.data.normal_()
    assert neuron_overlap(first, activated_neurons(model, *ids)) < 1.0


def test_library_similar_ranks_the_other_runs(tiny_bert_dir, tmp_path):
    from conftest import TEST_DATA
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
              "--prompt-length", "3", "--dtype", "fp32"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert invoke("train", *common, "--run-name", name, "--seed", str(seed)).exit_code == 0
    result = invoke("library", "similar", runs / "a", "--runs-dir", runs, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["run"] for r in out["similar"]] == ["b", "c"]  # b is a's twin (same seed)
    assert out["similar"][0]["flat"] == pytest.approx(1.0) and out["similar"][0]["neurons"] == 1.0
    assert out["similar"][1]["flat"] < 1.0
    bad = invoke("library", "similar", runs / "a", "--runs-dir", runs, "--measure", "nope")
    assert bad.exit_code == 2


def test_library_export_import_and_refusals(tiny_bert_dir, other_bert_dir, tmp_path):
    from conftest import TEST_DATA
    from safetensors.torch import load_file, save_file
    from test_cli import invoke

    runs, shelf, other_runs = tmp_path / "runs", tmp_path / "shelf", tmp_path / "other"
    assert invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
                  "--prompt-length", "3", "--dtype", "fp32", "--run-name", "p").exit_code == 0
    assert invoke("library", "export", runs / "p", "--out", shelf).exit_code == 0
    assert (shelf / "p" / "prompt" / "prompt.safetensors").read_bytes() == (runs / "p" / "prompt" / "prompt.safetensors").read_bytes()
    again = invoke("library", "export", runs / "p", "--out", shelf)
    assert again.exit_code == 1 and "exists" in again.output

    # other weights of the same shape: refused with both hashes named, nothing written
    bad = invoke("library", "import", shelf / "p", "--backbone", other_bert_dir, "--runs-dir", other_runs)
    assert bad.exit_code == 1 and "only works on its own backbone" in bad.output
    assert not other_runs.exists() or not any(other_runs.iterdir())

    ok = invoke("library", "import", shelf / "p", "--backbone", tiny_bert_dir, "--runs-dir", other_runs)
    assert ok.exit_code == 0, ok.output
    assert load_file(str(other_runs / "p" / "prompt" / "prompt.safetensors")).keys() == \
        load_file(str(runs / "p" / "prompt" / "prompt.safetensors")).keys()
    listed = invoke("library", "list", "--runs-dir", other_runs)
    assert listed.exit_code == 0 and "3x32" in listed.output  # the imported prompt's shape

    # a prompt of another width cannot sit in this backbone
    path = shelf / "p" / "prompt" / "prompt.safetensors"
    tensors = load_file(str(path))
    tensors["prompt_embeddings"] = torch.zeros(3, 16)
    save_file(tensors, str(path))
    wide = invoke("library", "import", shelf / "p", "--backbone", tiny_bert_dir, "--runs-dir", tmp_path / "third")
    assert wide.exit_code == 1 and "'prompt_embeddings' has width 16" in wide.output


def test_train_init_from_flags(tiny_bert_dir, tmp_path):
    from conftest import TEST_DATA
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "2",
              "--prompt-length", "3", "--dtype", "fp32"]
    assert invoke("train", *common, "--run-name", "src").exit_code == 0
    lonely = invoke("train", *common, "--run-name", "x", "--init-weights", "1")
    assert lonely.exit_code == 2 and "--init-from" in lonely.output
    ok = invoke("train", *common, "--run-name", "dst", "--init-from", f"{runs / 'src'},{runs / 'src'}",
                "--init-weights", "0.5,0.5")
    assert ok.exit_code == 0, ok.output
    summary = json.loads((runs / "dst" / "metrics.json").read_text())["train"]
    assert summary["init_from"] == f"{runs / 'src'},{runs / 'src'}" and "weighted average" in summary["init"]
    lib = invoke("train", *common, "--run-name", "lib", "--init-from", "library", "--top-k", "1", "--same-task")
    assert lib.exit_code == 0, lib.output
    choice = json.loads((runs / "lib" / "library_init.json").read_text())
    assert len(choice["sources"]) == 1 and choice["transfer"] == "best"
    nope = invoke("train", *common, "--run-name", "z", "--init-from", "library", "--transfer", "nope")
    assert nope.exit_code == 2 and "transfer must be" in nope.output
    other = invoke("train", *common, "--run-name", "w", "--init-from", "library")
    assert other.exit_code == 1 and "no prompt of another task" in other.output
    missing = invoke("train", *common, "--run-name", "y", "--init-from", runs / "nope")
    assert missing.exit_code == 1 and "not a finished run folder" in missing.output  # checked before the backbone loads


def test_similarity_compares_what_each_method_trains():
    """A prefix prompt trains keys and values (its placeholder vectors are fixed); a unified prompt
    trains its vectors and its tower: two prompts that differ only there are not 'identical'."""
    from xprompt.similarity import flat_cosine, mean_cosine

    torch.manual_seed(0)
    placeholders = torch.randn(2, 4)
    a = {"prompt_embeddings": placeholders, "keys": torch.randn(3, 2, 4), "values": torch.randn(3, 2, 4)}
    b = {"prompt_embeddings": placeholders, "keys": torch.randn(3, 2, 4), "values": torch.randn(3, 2, 4)}
    expected = torch.nn.functional.cosine_similarity(torch.cat([a["keys"].flatten(), a["values"].flatten()]),
                                                     torch.cat([b["keys"].flatten(), b["values"].flatten()]), dim=0)
    assert flat_cosine(a, b, "prefix") == pytest.approx(expected.item(), abs=1e-6)
    assert flat_cosine(a, b, "prefix") < 0.9 and flat_cosine(a, b, "soft") == pytest.approx(1.0)  # placeholders only
    assert flat_cosine(a, a, "prefix") == pytest.approx(1.0)

    vectors = torch.randn(2, 4)
    tower = {"tower.0.weight": torch.randn(4, 4), "tower.0.bias": torch.randn(4)}
    c = {"prompt_embeddings": vectors, **tower}
    d = {"prompt_embeddings": vectors, **{k: -v for k, v in tower.items()}}  # the same vectors, another tower
    assert flat_cosine(c, d, "unified") < 0.5 and mean_cosine(c, d, "unified") < 0.5
    assert flat_cosine(c, c, "unified") == pytest.approx(1.0) and mean_cosine(c, c, "unified") == pytest.approx(1.0)


def test_library_similar_uses_the_methods_tensors(tiny_bert_dir, tmp_path):
    """Two prefix prompts of different seeds: `library similar` reports the cosine of their keys and
    values, not of their placeholders."""
    from safetensors.torch import load_file
    from test_cli import invoke

    from xprompt.similarity import flat_cosine

    runs = tmp_path / "runs"
    for seed in (5, 6):
        out = invoke("train", "--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--method",
                     "prefix", "--max-steps", 2, "--prompt-length", 2, "--dtype", "fp32", "--seed", seed,
                     "--run-name", f"p{seed}")
        assert out.exit_code == 0, out.output
    out = invoke("library", "similar", runs / "p5", "--runs-dir", runs, "--json")
    (row,) = json.loads(out.stdout)["similar"]
    a, b = (load_file(str(runs / f"p{s}" / "prompt" / "prompt.safetensors")) for s in (5, 6))
    assert row["flat"] == pytest.approx(flat_cosine(a, b, "prefix"), abs=1e-6)
