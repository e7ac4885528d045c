"""Build notebooks in nbs/ from percent-format drafts (developer convenience, optional).

    python tools/nb.py _src/20_dict_sae.py      # writes nbs/20_dict_sae.ipynb
    python tools/nb.py --to-py nbs/20_dict_sae.ipynb   # writes _src/20_dict_sae.py to edit
    python tools/nb.py _src/tutorials/sae.py        # sub-folders map too: nbs/tutorials/sae.ipynb

The notebooks in nbs/ are the source of truth; drafts are a way to edit them as text.
Needs jupytext (pip install jupytext).
"""
import subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
args = sys.argv[1:]
if args and args[0] == "--to-py":
    for a in args[1:]:
        p = Path(a)
        rel = p.resolve().relative_to(root / "nbs")
        out = root / "_src" / rel.with_suffix(".py")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["jupytext", "--to", "py:percent", "--output", str(out), str(p)], check=True)
else:
    for a in args:
        p = Path(a)
        rel = p.resolve().relative_to(root / "_src")
        out = root / "nbs" / rel.with_suffix(".ipynb")
        out.parent.mkdir(parents=True, exist_ok=True)
        update = ["--update"] if out.exists() else []   # keep cell ids (and so the exported cell markers) stable
        subprocess.run(["jupytext", "--to", "ipynb", *update, "--update-metadata",
                        '{"jupytext": null, "kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}',
                        "--output", str(out), str(p)], check=True, capture_output=True)
        subprocess.run(["nbdev_clean", "--fname", str(out)], check=True, cwd=root)
        print("wrote", out.relative_to(root))
