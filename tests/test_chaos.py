"""SIGKILL a training subprocess at random moments; the resumed prompt equals the uninterrupted one."""

import importlib.util
from pathlib import Path


def test_kill_and_resume_gives_the_same_prompt(capsys):
    path = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"
    spec = importlib.util.spec_from_file_location("chaos", path)
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    assert chaos.main(["--kills", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 passed, 0 failed" in out
    assert out.count("identical") == 2
