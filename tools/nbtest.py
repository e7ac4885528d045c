"""Run notebooks as `nbdev_test` does, each in a process of its own, without importing torch and transformers anew
for every notebook.

`nbdev_test --path X` per notebook starts a fresh interpreter, and the imports the notebooks make (torch,
transformers and its model classes, datasets, IPython) cost 4–8 s of CPU each time: minutes over the 51 notebooks.
`nbdev_test` on a folder instead reuses a few worker processes, so a notebook sees whatever the ones before it left
behind (seeds, environment variables, thread counts, patched modules). Here a parent imports the libraries once and
forks one child per notebook: every notebook starts from the same clean state, with the imports already done. That is
on Linux; elsewhere (macOS's system frameworks are not fork-safe), or with GHOSTTRACK_NBTEST_NO_FORK=1, each notebook
gets its own `nbdev_test --path`.

Usage: `python tools/nbtest.py --jobs 2 --flags "" --logdir DIR nb1.ipynb nb2.ipynb …` (notebooks are started in the
order given). Per notebook it writes `DIR/<name>.log` (what the notebook printed, and its traceback on failure) and
`DIR/<name>.res` (`pass SECONDS` or `fail SECONDS`). Exits 0 when every notebook passed.
"""
import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

# torch's thread pool must not exist before a fork (its children would inherit a pool whose threads are gone); with
# one thread per notebook, as the test command runs them, none is made
os.environ.setdefault("OMP_NUM_THREADS", "1")

# what the notebooks import, imported once before the forks (the model classes are most of transformers' cost)
PRELOAD = ("IPython", "numpy", "torch", "transformers", "transformers.modeling_utils", "transformers.generation",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama", "datasets",
           "safetensors.torch", "matplotlib", "execnb.shell")
# forking a process that has loaded these is safe on Linux; macOS's system frameworks are not fork-safe once loaded,
# so elsewhere every notebook gets a fresh `nbdev_test --path` (as before this script, only slower)
FORK = sys.platform == "linux" and not os.environ.get("GHOSTTRACK_NBTEST_NO_FORK")
NBDEV_TEST = str(Path(sys.executable).with_name("nbdev_test"))   # the one beside this interpreter

from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.test import test_nb


def child(nb: Path, log: Path, skip: list, force: list, basepath) -> None:
    "In the forked process: run the notebook with its output going to `log`, then leave with 0 (passed) or 1."
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        ok, _ = test_nb(nb, skip_flags=skip, force_flags=force, basepath=basepath)
        code = 0 if ok else 1
    except BaseException as e:   # anything at all: the parent must hear of it, and the child must not return
        print(f"nbtest: {nb.name}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--jobs", type=int, default=2, help="notebooks at a time")
    p.add_argument("--flags", default="", help="space-separated flags of cells to run that are normally skipped")
    p.add_argument("--logdir", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = get_config()
    if FORK:
        for module in PRELOAD: importlib.import_module(module)
    skip, force = cfg.tst_flags.split(), a.flags.split()
    todo, running, failed = [nb.resolve() for nb in a.notebooks], {}, 0
    a.logdir.mkdir(parents=True, exist_ok=True)
    with working_directory(cfg.nbs_path):
        while todo or running:
            while todo and len(running) < a.jobs:
                nb = todo.pop(0)
                sys.stdout.flush(); sys.stderr.flush()
                log = a.logdir / f"{nb.stem}.log"
                if FORK:
                    pid = os.fork()
                    if pid == 0: child(nb, log, skip, force, cfg.config_path)
                else:   # reaped by os.wait below, like a forked child
                    with open(log, "w") as f:
                        pid = subprocess.Popen([NBDEV_TEST, "--path", str(nb), "--flags", a.flags], stdout=f, stderr=subprocess.STDOUT).pid
                running[pid] = (nb, log, time.time())
            pid, status = os.wait()
            nb, log, start = running.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                with open(log, "a") as f: print(f"nbtest: {nb.name}: killed by signal {-code}", file=f)
            ok = code == 0
            failed += not ok
            (a.logdir / f"{nb.stem}.res").write_text(f"{'pass' if ok else 'fail'} {round(time.time() - start)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
