"""Generate README.md from nbs/index.ipynb, offline (nbdev_readme needs Quarto).

Markdown cells are copied, code cells become ```python blocks followed by their text output, cells marked
`#| hide` are left out and `#|` directive lines are dropped. CI runs this and fails if README.md changes.
"""
import json
import re
from pathlib import Path

root = Path(__file__).resolve().parents[1]


def directives(src: str) -> list:
    return [l[3:].strip() for l in src.splitlines() if l.startswith("#|")]


def repoint(md: str) -> str:
    "Links between notebooks (`20_dict_sae.ipynb`) are relative to nbs/; the README sits one level up."
    return re.sub(r"\]\((?![a-z]+:|/|#)([^)]+\.ipynb)", r"](nbs/\1", md)


def cell_text(cell) -> str:
    src = "".join(cell["source"])
    if cell["cell_type"] == "markdown":
        return repoint(src.strip())
    if "hide" in directives(src) or "eval: false" in directives(src) and "echo: false" in directives(src):
        return ""
    code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
    if not code:
        return ""
    parts = [f"```python\n{code}\n```"]
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append("".join(o["text"]))
        elif "data" in o and "text/plain" in o["data"]:
            out.append("".join(o["data"]["text/plain"]))
    if out:
        parts.append("```\n" + "".join(out).rstrip() + "\n```")
    return "\n\n".join(parts)


def main():
    nb = json.loads((root / "nbs" / "index.ipynb").read_text())
    blocks = [t for t in (cell_text(c) for c in nb["cells"]) if t]
    head = "<!-- generated from nbs/index.ipynb by tools/readme.py; edit the notebook, not this file -->\n\n"
    (root / "README.md").write_text(head + "\n\n".join(blocks) + "\n")


if __name__ == "__main__":
    main()
