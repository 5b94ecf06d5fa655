"""The house stays true: no import cycle in xprompt/, and no module imports one above its floor
(face -> workflows -> transfer and library -> loops -> model parts -> store/IO, each floor
importing only from its own or lower ones); no file grows past ~400 lines; the CLI holds no loop
over runs, steps or languages."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xprompt"

# from the ground up; a module belongs to the first floor that names it or its package
FLOORS = [
    ("store/IO", ["__init__", "errors", "config", "fileio", "hardware", "distributed", "tasks", "attention", "fused", "phases", "lineage", "checks", "store",
                  "registry"]),
    ("model parts", ["backbones", "data", "prompts", "verbalizers", "generation", "peft_io", "pretraining"]),
    ("model", ["model", "mixed", "similarity", "augment", "tuning"]),
    ("loops", ["start", "evaluation", "checkpoints", "reports", "report_page", "training"]),
    ("library", ["library"]),
    ("transfer", ["transfer", "selftrain"]),
    ("workflows", ["workflows"]),
    ("face", ["cli", "__main__"]),
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _floor(module: str) -> int:
    head = module.split(".")[0]
    for index, (_, names) in enumerate(FLOORS):
        if head in names:
            return index
    raise AssertionError(f"xprompt.{module} is on no floor: add it to FLOORS")


def _imports(path: Path) -> set[str]:
    """The xprompt modules a file imports (at module level or inside functions)."""
    module = _module(path)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("xprompt"):
                    base = node.module.split(".")[1:]
                else:
                    continue
            else:
                base = (package[: len(package) - node.level + 1] if node.level > 1 else package) + \
                       (node.module.split(".") if node.module else [])
            target = ".".join(base) or "__init__"
            for alias in node.names:  # "from . import distributed" names a module
                candidate = f"{target}.{alias.name}" if target != "__init__" else alias.name
                found.add(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists()
                          or (PACKAGE / Path(*candidate.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) or "__init__" for a in node.names if a.name.startswith("xprompt.")}
    return {m for m in found if m != module}


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_floor():
    wrong = [f"xprompt.{m} ({FLOORS[_floor(m)][0]}) imports xprompt.{t} ({FLOORS[_floor(t)][0]})"
             for m, targets in GRAPH.items() for t in targets if _floor(t) > _floor(m)]
    assert wrong == []


def test_no_import_cycle():
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target in GRAPH:
                visit(target)
        stack.pop()

    for module in sorted(GRAPH):
        visit(module)
    assert cycles == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_a_god_module(path):
    assert len(path.read_text().splitlines()) <= 420


def test_the_cli_holds_no_loop_over_runs_steps_or_languages():
    """Loops belong to the workflows; the CLI only renders (its one table helper walks the rows it is given)."""
    trees = [ast.parse(path.read_text()) for path in (PACKAGE / "cli").glob("*.py")]
    loops = [(fn.name, node) for tree in trees for fn in ast.walk(tree)
             if isinstance(fn, ast.FunctionDef) and fn.name != "_table"
             for node in ast.walk(fn) if isinstance(node, (ast.For, ast.While))]
    assert loops == [], [f"{name}: {ast.unparse(node).splitlines()[0]}" for name, node in loops]
