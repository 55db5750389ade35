"""fewshot's modules import one another without a circle, and errors.py is a leaf.

Every import statement counts, at module level or inside a function, a class or an `if
TYPE_CHECKING:` block, `import x` or `from x import y`, relative or absolute: an import hidden in
a function is still a dependency, and a circle through it is still a circle."""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "fewshot"


def modules_of(package: Path) -> dict[str, Path]:
    """The modules of `package` (a folder) by dotted name, packages by their __init__.py."""
    root = package.parent
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = modules_of(PACKAGE)


def owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of `modules` that `name` is or is defined in; None: not one of them."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """The modules of `modules` that `module` imports directly, anywhere in its code; importing
    `fewshot.a.b` also runs the package `fewshot.a`, unless that package holds `module`."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(owner(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import y`
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # `from fewshot.a import b` may import module fewshot.a.b
                whole = f"{source}.{alias.name}"
                targets.add(whole if whole in modules else owner(source, modules))
    for target in list(targets - {None}):
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and not (module + ".").startswith(parent + "."):
                targets.add(parent)
    return targets - {None, module}


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    return {module: imported(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as the modules along it, the first repeated at the end; None if
    there is none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            found = visit(module)
            if found:
                return found
    return None


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """Imports inside functions, relative ones, `import x` and `from x import y` all count."""
    graph = {
        "fewshot.a": {"fewshot.b"},
        "fewshot.b": {"fewshot.c"},
        "fewshot.c": {"fewshot.a"},
        "fewshot.d": set(),
    }
    assert find_cycle(graph) == ["fewshot.a", "fewshot.b", "fewshot.c", "fewshot.a"]
    assert find_cycle({**graph, "fewshot.c": set()}) is None

    package = tmp_path / "fewshot"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from fewshot.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from . import c\n",
        "sub/c.py": "class C:\n    def g(self):\n        import fewshot.a.x\n",
        "sub/d.py": "from ..a import f\nfrom fewshot.sub.c import C\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(modules_of(package))
    assert graph["fewshot.a"] == {"fewshot.sub.b", "fewshot.sub"}
    assert graph["fewshot.sub.b"] == {"fewshot.sub.c"}
    assert graph["fewshot.sub.c"] == {"fewshot.a"}
    assert graph["fewshot.sub.d"] == {"fewshot.a", "fewshot.sub.c"}
    assert find_cycle(graph) == ["fewshot.a", "fewshot.sub.b", "fewshot.sub.c", "fewshot.a"]


def test_fewshot_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_errors_are_a_leaf():
    assert imported("fewshot.errors") == set()


def test_the_settings_vocabulary_imports_nothing_of_fewshot_but_errors():
    assert imported("fewshot.settings") <= {"fewshot.errors"}
