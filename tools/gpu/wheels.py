"""Fill `.whl/` with the wheels tools/gpu/run.sh needs on the GPU machine and its image lacks: what ghosttrack imports
beyond the image (schedulefree) and the two peers the bench runs against (SAELens, sparsify), with their requirements,
resolved by hand because the image's own torch, transformers and numpy must stay (a resolver would fetch others).

    python tools/gpu/wheels.py                       # Python 3.12 (the image's), into .whl/
    python tools/gpu/wheels.py --python 3.11 --dest /tmp/w --with-image ...   # a rehearsal on this machine's Python

A requirement whose distribution the image has is skipped, whatever its version: the image's is used. One that has no
wheel is reported and left out (`--no-deps` installs do not check; the code paths the bench uses were checked without
them). The wheels travel with the working tree, so their total size is printed against the 64 MiB a call may carry."""
import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PEERS_TXT = Path(__file__).resolve().parents[2] / ".ci" / "peers.txt"
WANTED = ["schedulefree==1.4.1"] + [line.strip() for line in PEERS_TXT.read_text().splitlines()
                                     if line.split("==")[0].strip() in ("sae-lens", "eai-sparsify")]
"the schedule-free optimiser ghosttrack's trainer imports, and the bench's two peers at the versions .ci/peers.txt pins"

IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit
cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist
fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta
jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
"the Python packages of the GPU machine's image ('cuda'), as the device tool's KINDS.md listed them on 2026-11-17"

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]

def marker_env(python: str) -> dict:
    "The environment markers of CPython `python` (major.minor) on x86-64 Linux."
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "os_name": "posix", "extra": ""}

def requirements_of(wheel: Path, env: dict) -> list:
    "The requirements a wheel declares for `env`, extras left out."
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"): continue
        r = Requirement(line.split(":", 1)[1].strip())
        if r.marker is None or r.marker.evaluate(env): r.marker = None; out.append(str(r))
    return out

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=".whl")
    p.add_argument("--python", default="3.12", help="the target CPython's major.minor")
    p.add_argument("--with-image", nargs="*", default=None,
                   help="treat these (default: the image's list above) as already installed; an empty list: none")
    a = p.parse_args(argv)
    dest = Path(a.dest); dest.mkdir(parents=True, exist_ok=True)
    have = {canonicalize_name(n) for n in (IMAGE if a.with_image is None else a.with_image)}
    env, plat = marker_env(a.python), [x for pl in PLATFORMS for x in ("--platform", pl)]
    todo, seen, missing = list(WANTED), set(), []
    while todo:
        spec = todo.pop(0); name = canonicalize_name(Requirement(spec).name)
        if name in seen or name in have: continue
        seen.add(name)
        before = set(dest.glob("*.whl"))
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", a.python,
                            "--implementation", "cp", *plat, "--platform", "any", "-d", str(dest), spec], capture_output=True, text=True)
        got = set(dest.glob("*.whl")) - before or {w for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name}
        if r.returncode or not got:
            missing.append(spec); print(f"no wheel: {spec}", file=sys.stderr); continue
        todo += requirements_of(sorted(got)[0], env)
    size = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}, {size / 2**20:.1f} MiB (a device call carries 64 MiB with the tree)")
    if missing: print("left out (no wheel for this platform): " + ", ".join(missing))
    return 0

if __name__ == "__main__":
    sys.exit(main())
