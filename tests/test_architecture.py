"""The package's import graph: subpackages in layers, imports only downward, no circles, nothing imports the CLI,
ghosttrack imports at the top of each module. Read from the source with `ast`, as the code is, not as it runs."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ghosttrack"
LAYERS = {"core": 0, "data": 1, "tsp": 2, "dictionaries": 3, "interpret": 4, "attribution": 5, "tracking": 5, "pipeline": 6, "cli": 7}
"rank of each subpackage: a module imports from its own rank or below (attribution and tracking sit side by side)"


def modules() -> dict:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py") if p.name != "_modidx.py"}


def imports(mod: str, path: Path):
    "`(target module, node, inside a function)` for every import of ghosttrack in `path`."
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            stem = ".".join(base[:len(base) - n.level + 1] + ([n.module] if n.module else [])) if n.level else (n.module or "")
            targets = [f"{stem}.{a.name}" for a in n.names] if n.level and not n.module else [stem]
        elif isinstance(n, ast.Import): targets = [a.name for a in n.names]
        else: continue
        for t in targets:
            if t.split(".")[0] == "ghosttrack": yield t, n, id(n) in inner


def graph() -> dict:
    mods = modules()
    def owner(t):
        while t and t not in mods: t = t.rpartition(".")[0]
        return t
    return {m: {owner(t) for t, _, _ in imports(m, p) if owner(t) not in ("", m)} for m, p in mods.items()}


def layer(mod: str):
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_sits_in_a_layer():
    loose = [m for m in modules() if layer(m) is None and m not in ("ghosttrack", "ghosttrack.__main__")]
    assert not loose, f"modules outside the subpackages {sorted(LAYERS)}: {loose}"


def test_imports_run_downward_and_nothing_imports_the_cli():
    bad = [f"{m} -> {t}" for m, ts in graph().items() for t in ts
           if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))
    cli_users = [m for m, ts in graph().items() if not m.startswith("ghosttrack.cli") and m != "ghosttrack.__main__"
                 and any(t.startswith("ghosttrack.cli") for t in ts)]
    assert not cli_users, f"library modules importing the command line: {cli_users}"


def test_no_circles():
    g, index, low, stack, on, circles, i = graph(), {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            c = []
            while True:
                w = stack.pop(); on.discard(w); c.append(w)
                if w == v: break
            if len(c) > 1: circles.append(sorted(c))
    for v in g:
        if v not in index: visit(v)
    assert not circles, f"import circles: {circles}"


def test_ghosttrack_imports_are_at_the_top_of_modules():
    inner = [f"{p.relative_to(PKG.parent)}:{n.lineno} imports {t}" for m, p in modules().items() for t, n, inside in imports(m, p) if inside]
    assert not inner, "imports of ghosttrack inside functions hide the dependency graph:\n" + "\n".join(inner)


def test_the_checks_catch_what_they_claim(tmp_path, monkeypatch):
    "A circle, an upward import and an import inside a function, planted in a copy of the package, are all found."
    import shutil, sys
    pkg = tmp_path / "ghosttrack"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "core" / "io.py").write_text((pkg / "core" / "io.py").read_text() + "\nfrom ghosttrack.core.config import ConfigError\n"
                                        "def f():\n    from ghosttrack.cli.main import main\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    for check in (test_imports_run_downward_and_nothing_imports_the_cli, test_no_circles, test_ghosttrack_imports_are_at_the_top_of_modules):
        try: check()
        except AssertionError: continue
        raise AssertionError(f"{check.__name__} missed the planted problem")
