"""The command-line reference (``docs/cli.md``), generated from the commands themselves so that the
documentation can never name an option the CLI lacks or miss one it has:
``python -m xprompt.cli.reference > docs/cli.md`` (``tests/test_docs.py`` checks it is current)."""

from __future__ import annotations

import typer.main

HEADER = """# Command-line reference

Generated from the commands' own declarations by `python -m xprompt.cli.reference > docs/cli.md`
(`tests/test_docs.py` fails when this page and the CLI disagree). `xprompt COMMAND --help` prints
the same. Add `--debug` before a command for a traceback instead of the one-line error.
"""


def _commands(group, prefix: str = "") -> list[tuple[str, object]]:
    """Every leaf command under ``group`` as (full name, command), in declaration order."""
    return [leaf for name, command in group.commands.items()
            for leaf in (_commands(command, f"{prefix}{name} ") if hasattr(command, "commands") else [(f"{prefix}{name}", command)])]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(name: str, command) -> list[str]:
    ctx = command.context_class(command, info_name=name)  # typer carries its own click
    lines = [f"## `xprompt {name}`", "", _cell(command.help or ""), ""]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if arguments:
        lines += ["Arguments: " + ", ".join(f"`{p.name.upper()}`" for p in arguments), ""]
    records = [(p, p.get_help_record(ctx)) for p in command.params if p.param_type_name == "option" and not p.hidden]
    if records:
        lines += ["| option | what it does |", "|---|---|"]
        lines += [f"| `{_cell(record[0])}` | {_cell(record[1])} |" for _, record in records if record]
        lines.append("")
    return lines


def render() -> str:
    """The whole reference page, as markdown."""
    from . import app

    root = typer.main.get_command(app)
    body = [HEADER, *(line for name, command in _commands(root) for line in _section(name, command))]
    return "\n".join(body).rstrip() + "\n"


def options() -> dict[str, set[str]]:
    """Every command's option names (``--flag``), by full command name."""
    from . import app

    return {name: {opt for p in command.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)}
            for name, command in _commands(typer.main.get_command(app))}


if __name__ == "__main__":
    print(render(), end="")
