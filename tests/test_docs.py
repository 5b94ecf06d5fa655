"""The README and the docs agree with the code: the CLI reference is generated from the commands, every
option the README or a docs page names exists, every linked page exists, the results table is the one
the script renders from stored records, and the README stays short enough to read."""

import re
import runpy
from pathlib import Path

from xprompt.cli import reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# options of other programs that the docs show next to xprompt's (torchrun, accelerate, pip, make, pytest)
FOREIGN = {"--nproc_per_node", "--num_processes", "--standalone", "--run-path", "--debug", "--help", "--version"}
FLAG = r"(?<![\w-])--[a-z][a-z0-9_-]*"


def test_cli_reference_is_generated_from_the_commands():
    assert (ROOT / "docs" / "cli.md").read_text() == reference.render(), \
        "docs/cli.md is stale: python -m xprompt.cli.reference > docs/cli.md"


def script_options() -> set[str]:
    """The options scripts/*.py declare (argparse), which the docs may name beside a script."""
    return {flag for path in (ROOT / "scripts").glob("*.py")
            for flag in re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9_-]*)\"", path.read_text())}


def test_every_option_the_docs_name_exists():
    known = set().union(*reference.options().values()) | FOREIGN | script_options()
    pages = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in (ROOT / "docs").glob("*.md")}}
    spans = [(page, line) for page, text in pages.items() for block in re.findall(r"```(.*?)```|`([^`]*)`", text, re.S)
             for line in "".join(block).splitlines() if "scripts/" not in line]  # a script's options are its own
    unknown = {(page, flag) for page, line in spans for flag in re.findall(FLAG, line) if flag not in known}
    assert not unknown, f"options named in the docs that no command declares: {sorted(unknown)}"


def test_the_readme_options_of_each_command_exist_on_that_command():
    options = reference.options()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()]
    for line in (line.split("#")[0] for line in lines if line.startswith("xprompt ")):
        words = line.split()
        command = " ".join(words[1:3]) if " ".join(words[1:3]) in options else words[1]
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        assert flags <= options[command], f"README: `{line.strip()}` names {sorted(flags - options[command])}"


def test_linked_pages_exist_and_the_readme_is_short():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links and all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
    assert len(README.splitlines()) <= 200


def test_the_results_table_is_the_scripts_rendering_of_stored_records():
    table = runpy.run_path(str(ROOT / "scripts" / "results_table.py"))["headline"]()
    assert "<!-- results-table -->\n" + table + "<!-- end results-table -->" in README
    # one headline per configuration: the README states the target averages once, nowhere else
    for average in re.findall(r"\*\*(\d+\.\d) ± \d+\.\d\*\*", table):
        assert README.count(f"**{average} ±") == 1
