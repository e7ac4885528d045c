"""Package metadata comes from settings.ini, the one place nbdev and pip both read."""
import json
import re
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

for key in "version description keywords author author_email".split():
    assert key in cfg, f"settings.ini is missing {key}"
# refuse a malformed version early (a plain check: a fresh venv has setuptools but not `packaging`, and setup.py runs there)
assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", cfg["version"]), f"settings.ini: malformed version {cfg['version']!r}"

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
py_versions = "3.10 3.11 3.12 3.13".split()
min_python = cfg["min_python"]
lic = licenses[cfg["license"].lower()]


def reqs(key):
    return cfg.get(key, "").split()


def stage_notebooks():
    "The notebooks with a papermill `parameters` cell: `ghosttrack run` executes them, so wheels carry them."
    for nb in sorted(Path("nbs").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        if any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells):
            yield nb


class BuildWithStageNotebooks(build_py):
    "Copy the stage notebooks into the built package as `ghosttrack/stage_nbs/` (a checkout reads `nbs/` directly)."
    def run(self):
        super().run()
        out = Path(self.build_lib) / cfg["lib_path"] / "stage_nbs"
        out.mkdir(parents=True, exist_ok=True)
        for nb in stage_notebooks():
            self.copy_file(str(nb), str(out / nb.name))


extras = {k[: -len("_requirements")]: reqs(k) for k in cfg if k.endswith("_requirements") and k != "requirements"}


setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=lic[0],
    url=cfg["git_url"],
    keywords=cfg["keywords"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"],
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"],
    ]
    + [f"Programming Language :: Python :: {v}" for v in py_versions[py_versions.index(min_python):]],
    packages=setuptools.find_packages(include=["ghosttrack", "ghosttrack.*"]),
    package_data={"ghosttrack.data": ["assets/*", "assets/*/*"]},   # the tokenizer, WikiText-2 and TruthfulQA copies
    python_requires=">=" + min_python,
    install_requires=reqs("requirements"),
    extras_require=extras,
    cmdclass={"build_py": BuildWithStageNotebooks},
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
