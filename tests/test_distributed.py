"""Gradient accumulation and data parallelism give the same prompt as one process with the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import TEST_DATA
from xprompt.config import TrainConfig
from xprompt.workflows.runs import train

COMMON = ["--data-dir", str(TEST_DATA), "--max-steps", "6", "--batch-size", "8", "--prompt-length", "3",
          "--eval-every", "3", "--dtype", "fp32", "--seed", "5"]


def _prompt(run_dir):
    return load_file(str(run_dir / "prompt" / "prompt.safetensors"))


def _assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, (a[name] - b[name]).abs().max())


def test_grad_accumulation_equals_one_big_batch(backbone, xnli, tmp_path):
    runs = {}
    for batch, accum in ((8, 1), (8, 3), (4, 1)):
        run = tmp_path / f"b{batch}-a{accum}"
        run.mkdir()
        cfg = TrainConfig(method="deep", prompt_length=3, max_steps=6, eval_every=3, batch_size=batch, dtype="fp32",
                          seed=5, grad_accum=accum)
        train(cfg, backbone, xnli, run, [TEST_DATA])
        runs[batch, accum] = _prompt(run)
    _assert_close(runs[8, 1], runs[8, 3])
    # a different global batch gives a different prompt: the comparison can fail
    assert any(not torch.allclose(runs[8, 1][k], runs[4, 1][k], atol=1e-4) for k in runs[8, 1])


def _xprompt(args, nproc=1, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XPROMPT_DIST_BACKEND": "gloo"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    out = subprocess.run([*launch, "-m", "xprompt", *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_two_gloo_processes_equal_one_process(tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    _xprompt(["train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--run-name", "one", *COMMON])
    out = _xprompt(["train", "--backbone", tiny_bert_dir, "--runs-dir", runs, "--run-name", "ddp", *COMMON], nproc=2)
    assert "2 processes" in " ".join(out.stdout.split())
    _assert_close(_prompt(runs / "one"), _prompt(runs / "ddp"))
    one = json.loads((runs / "one" / "metrics.json").read_text())["train"]
    ddp = json.loads((runs / "ddp" / "metrics.json").read_text())["train"]
    assert ddp["processes"] == 2 and ddp["select_accuracy"] == one["select_accuracy"]
    assert ddp["best_step"] == one["best_step"]
    # one finished run folder, written once (rank 0 only)
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["ddp", "one"]

    # evaluation shares the languages out over the processes and merges them
    args = ["eval", "--run-dir", runs / "one", "--langs", "en,de,zh", "--data-dir", TEST_DATA, "--dtype", "fp32", "--json"]
    single = json.loads(_xprompt(args).stdout)["results"]
    split = json.loads(_xprompt(args, nproc=2).stdout)["results"]
    assert sorted(split) == ["de", "en", "zh"]
    for lang in single:
        assert split[lang]["accuracy"] == single[lang]["accuracy"]
        assert split[lang]["n"] == single[lang]["n"]


def test_device_map_auto_loads_sharded_and_trains_the_same(tiny_bert_dir, tmp_path):
    """On this CPU-only machine accelerate puts every layer on the CPU, so the result must equal the
    plain run's; on GPUs the same flag spreads a large backbone over them."""
    from safetensors.torch import load_file

    from conftest import TEST_DATA
    from test_cli import invoke

    runs = tmp_path / "runs"
    common = ["--backbone", tiny_bert_dir, "--data-dir", TEST_DATA, "--runs-dir", runs, "--max-steps", "3",
              "--prompt-length", "3", "--dtype", "fp32"]
    assert invoke("train", *common, "--run-name", "plain").exit_code == 0
    sharded = invoke("train", *common, "--run-name", "sharded", "--device-map", "auto")
    assert sharded.exit_code == 0, sharded.output
    a, b = (load_file(str(runs / n / "prompt" / "prompt.safetensors")) for n in ("plain", "sharded"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = invoke("eval", "--run", runs / "sharded", "--langs", "en", "--data-dir", TEST_DATA, "--backbone", tiny_bert_dir,
                "--device-map", "auto")
    assert ev.exit_code == 0, ev.output
    bad = invoke("train", *common, "--run-name", "x", "--device-map", "everywhere")
    assert bad.exit_code == 2 and "--device-map must be" in bad.output
