"""The package's shape, read from its source: which way imports may run, and no cycles.

Every `import` counts, at the top of a module or inside a function alike (an import
inside a function is still a dependency, only a later one), and so does a module named in
a string to be imported later ("monofast.gpt.train:run_stage").

- `common/` imports nothing of monofast but itself and the native module;
- a stage (`data`, `gpt`, `activations`, `sae`, `analysis`, `findings`, `site`, in pipeline order)
  imports `common/`, the native module, `kernels` and earlier stages only;
- `run/` imports `common/` and the stages, never `cli/`; nothing but `cli/` (and
  `python -m monofast`) imports `cli/`;
- `kernels` imports only itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "monofast"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"
STAGES = ("data", "gpt", "activations", "sae", "analysis", "findings", "site")
SPEC = re.compile(r"^monofast(\.\w+)+(:\w+)?$")
"""A module named in a string (the stage registry, the command table, the kernel backends)."""


def module_files() -> dict[str, Path]:
    """`monofast.x.y` -> its file, for the package and the kernels it ships."""
    out: dict[str, Path] = {}
    for root, prefix in ((PACKAGE, "monofast"), (KERNELS, "monofast.kernels")):
        for path in sorted(root.rglob("*.py")):
            if root == PACKAGE and "kernels" in path.relative_to(root).parts:
                continue  # the symlink to the top-level kernels/, read from there
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The monofast modules the module `name` (its file `path`) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from .reference import x` (the kernels' own habit)
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SPEC.match(node.value):
            names = [node.value.partition(":")[0]]  # "monofast.gpt.train:run_stage", imported by name
        else:
            continue
        for name in names:
            while name and name not in modules:  # `monofast.x.Name` -> module monofast.x
                name = name.rpartition(".")[0]
            if name.startswith("monofast"):
                found.add(name)
    return found


def layer(module: str) -> str:
    """`monofast.sae.train` -> `sae`; the top-level modules are their own layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "monofast"


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if a == b or b in ("_native", "monofast"):
        return True
    if a == "kernels":
        return False
    if b == "cli":
        return a == "__main__"
    if a == "common":
        return False
    if a in STAGES:
        return b in ("common", "kernels") or (b in STAGES and STAGES.index(b) < STAGES.index(a))
    if a == "run":
        return b in ("common", "kernels") or b in STAGES
    return a in ("cli", "__main__")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def test_the_graph_is_read(graph):
    assert "monofast.run.pipeline" in graph["monofast.cli"]
    assert "monofast.gpt.model" in graph["monofast.gpt.train"]
    assert "monofast.sae.train" in graph["monofast.run.stages"]  # named in a string
    assert len(graph) > 50


def test_imports_run_one_way(graph):
    modules = module_files()
    bad = [f"{modules[src].relative_to(PACKAGE.parents[1])} imports {dst}"
           for src, dsts in sorted(graph.items()) for dst in sorted(dsts) if not allowed(src, dst)]
    assert not bad, "imports against the package's layers:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    modules = module_files()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    shown = [" -> ".join(str(modules[m].relative_to(PACKAGE.parents[1])) for m in cycle) for cycle in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


@pytest.mark.parametrize("src, dst, ok", [
    ("monofast.sae.train", "monofast.gpt.weights", True),
    ("monofast.gpt.train", "monofast.sae.model", False),
    ("monofast.common.files", "monofast.run.stages", False),
    ("monofast.run.pipeline", "monofast.cli.options", False),
    ("monofast.cli.run", "monofast.run.pipeline", True),
    ("monofast.site.build", "monofast.analysis.output", True),
    ("monofast.kernels.eager", "monofast.common.log", False),
], ids=["later-reads-earlier", "earlier-reads-later", "common-reads-run", "run-reads-cli", "cli-reads-run",
        "site-reads-analysis", "kernels-read-common"])
def test_the_rule_itself(src, dst, ok):
    assert allowed(src, dst) is ok


def test_files_stay_readable():
    """No module over ~500 lines, but the one-file model (nanoGPT's habit)."""
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if "kernels" not in path.relative_to(PACKAGE).parts
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > 520
            and path.relative_to(PACKAGE).as_posix() != "gpt/model.py"}
    assert not long, f"modules over 520 lines: {long}"
