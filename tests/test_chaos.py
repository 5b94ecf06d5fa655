"""Interrupt a training subprocess (SIGTERM and SIGKILL, inside a step or a selection pass); the
resumed run's final prompt, checkpoint (AdamW moments included) and selection record equal the
uninterrupted run's. ``scripts/chaos.py`` runs more kills, signals and places."""

import importlib.util
from pathlib import Path


def test_kill_and_resume_gives_the_same_final_state(capsys):
    path = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"
    spec = importlib.util.spec_from_file_location("chaos", path)
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    assert chaos.main(["--kills", "1", "--seed", "3", "--signals", "SIGTERM,SIGKILL", "--places", "step,selection"]) == 0
    out = capsys.readouterr().out
    assert "1 kills x 2 signals: 2 identical, 0 different" in out
    assert out.count("identical (stopped at") == 2 * 2  # the line of the kill and the table
