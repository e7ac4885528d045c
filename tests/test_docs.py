"""What can be checked of the docs site without Quarto: titles, the sidebar, links between pages, the config files."""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
NOTEBOOKS = sorted(NBS.glob("*.ipynb")) + sorted(NBS.glob("tutorials/*.ipynb"))


def cells(nb):
    return json.loads(nb.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook_has_title_and_description(nb):
    first = cells(nb)[0]
    assert first["cell_type"] == "markdown", f"{nb.name}: the first cell must be the markdown title"
    lines = source(first).strip().splitlines()
    assert re.match(r"# \S", lines[0]), f"{nb.name}: first line must be '# Title', got {lines[0]!r}"
    assert len(lines) > 1 and lines[1].startswith("> ") and len(lines[1]) > 10, f"{nb.name}: second line must be '> description'"


def sidebar_entries(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from sidebar_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from sidebar_entries(v)


def test_sidebar_lists_every_notebook_once_in_order():
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    entries = [e for e in sidebar_entries(side) if e.endswith(".ipynb")]
    assert len(entries) == len(set(entries)), "a page is listed twice"
    assert sorted(entries) == sorted(str(p.relative_to(NBS)) for p in NOTEBOOKS)
    numbered = [e for e in entries if re.match(r"\d", e)]
    assert numbered == sorted(numbered), "the numbered notebooks must appear in pipeline order"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_links_between_pages_resolve(nb):
    for cell in cells(nb):
        if cell["cell_type"] != "markdown":
            continue
        for target in LINK.findall(source(cell)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            resolved = (nb.parent / path).resolve()
            candidates = [resolved, resolved.with_suffix(".ipynb")]
            assert any(c.exists() for c in candidates), f"{nb.name}: broken link {target!r}"


def test_readme_links_resolve():
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README: broken link {target!r}"


def test_quarto_and_workflow_configs():
    for f in ("_quarto.yml", "nbs/_quarto.yml", "nbs/nbdev.yml", ".github/workflows/deploy.yaml"):
        assert isinstance(yaml.safe_load((ROOT / f).read_text()), dict), f
    q = yaml.safe_load((NBS / "_quarto.yml").read_text())
    assert "sidebar.yml" in q["metadata-files"] and (NBS / q["format"]["html"]["css"]).exists()
    steps = yaml.safe_load((ROOT / ".github/workflows/deploy.yaml").read_text())["jobs"]["docs"]["steps"]
    assert any("nbdev_docs" in s.get("run", "") for s in steps)
    settings = (ROOT / "settings.ini").read_text()
    assert re.search(r"^custom_sidebar = True$", settings, re.M), "sidebar.yml is hand-written; nbdev must not replace it"


def _directives(src):
    return {l[3:].strip().replace(" ", "") for l in src.splitlines() if l.startswith("#|")}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_docs_build_runs_no_demo_code(nb):
    """`nbdev_docs` executes every exported cell and every cell that imports something (to render `show_doc`);
    a demo cell that also imports would run there without the cells before it. Imports get cells of their own."""
    import ast
    for i, cell in enumerate(cells(nb)):
        src = source(cell)
        if cell["cell_type"] != "code" or _directives(src) & {"export", "exporti", "exports", "eval:false"}:
            continue
        tree = ast.parse("\n".join(l for l in src.splitlines() if not l.startswith(("#|", "%"))))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)):
            assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), \
                f"{nb.name} cell {i} mixes imports with other code; move the imports into a cell of their own:\n{src[:300]}"
