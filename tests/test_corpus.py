"""Corpus behaviour that needs a clean process: Hub failures under controlled environments, and determinism
across interpreters with different hash seeds. Notebook tests (nbs/10_data_corpus.ipynb) cover the rest."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HUB_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_DATASETS_CACHE")


def run_py(code: str, timeout: float = 60, **env) -> dict:
    "Run `code` in a fresh interpreter with only the given Hub variables set; it prints one JSON object."
    full = {k: v for k, v in os.environ.items() if k not in HUB_VARS}
    full.update(PYTHONPATH=str(ROOT), **env)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# Only the failing call is timed: `datasets` and `huggingface_hub` (seconds to import on a busy machine) are imported
# before the clock starts, so the bounds below measure waiting on the network, not imports.
TIMED_FAILURE = """
    import json, time
    import datasets, huggingface_hub.utils
    from ghosttrack.data.corpus import CorpusUnavailable, WikipediaCorpus, load_truthfulqa
    t = time.perf_counter()
    try:
        {call}
        out = dict(error=None)
    except CorpusUnavailable as e:
        out = dict(error=str(e), is_runtime_error=isinstance(e, RuntimeError))
    out["seconds"] = time.perf_counter() - t
    print(json.dumps(out))
"""


@pytest.fixture
def hf_home(tmp_path):
    "An empty Hugging Face cache, so nothing cached on this machine can make a load succeed."
    return str(tmp_path / "hf")


@pytest.fixture
def silent_endpoint():
    "A local port that accepts connections but never answers, like a firewall that drops packets."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def refusing_endpoint():
    "A local port nobody listens on: connections are refused at once."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["refusing", "silent"])
def test_wikipedia_unreachable_hub_fails_fast(kind, request, hf_home):
    endpoint = request.getfixturevalue(f"{kind}_endpoint")
    out = run_py(TIMED_FAILURE.format(call="WikipediaCorpus().get_texts()"), HF_ENDPOINT=endpoint, HF_HOME=hf_home)
    assert out["error"] is not None and out["is_runtime_error"]
    assert f"{endpoint} is unreachable" in out["error"]
    assert "--corpus text:PATH" in out["error"] and "--corpus stdlib" in out["error"]
    assert out["seconds"] < 10


def test_wikipedia_offline_mode_fails_at_once(hf_home, silent_endpoint):
    # the endpoint never answers: any request at all would wait out hub_problem's 5-second timeout
    out = run_py(TIMED_FAILURE.format(call="WikipediaCorpus().get_texts()"), HF_HUB_OFFLINE="1", HF_HOME=hf_home,
                 HF_ENDPOINT=silent_endpoint)
    assert "offline mode is on" in out["error"] and "--corpus stdlib" in out["error"]
    assert out["seconds"] < 4


@pytest.mark.parametrize("offline", [True, False])
def test_truthfulqa_from_hub_fails_fast_offline(offline, refusing_endpoint, hf_home):
    env = dict(HF_HUB_OFFLINE="1") if offline else dict(HF_ENDPOINT=refusing_endpoint)
    out = run_py(TIMED_FAILURE.format(call="load_truthfulqa(\"hub\")"), HF_HOME=hf_home, **env)
    assert "truthfulqa/truthful_qa" in out["error"] and "TruthfulQA.csv" in out["error"]
    assert out["seconds"] < 10


DIGESTS = """
    {preload}
    import hashlib, json
    from ghosttrack.data.corpus import TextCorpus, TokenSource, asset, gpt2_tokenizer, load_truthfulqa, stdlib_corpus
    tok = gpt2_tokenizer()
    h = hashlib.sha256()
    for corpus in (TextCorpus(asset("wikitext-2", "wiki.test.raw")), stdlib_corpus()):
        for b in TokenSource(corpus, tok, 128).batches(32): h.update(b.numpy().tobytes())
    split = load_truthfulqa()
    print(json.dumps(dict(rows=h.hexdigest(), test=[e.question for e in split["test"]])))
"""


def test_rows_and_split_identical_across_processes():
    "Resuming an extraction skips stored rows, so another process must produce byte-identical batches."
    a = run_py(DIGESTS.format(preload=""), PYTHONHASHSEED="1")
    # another hash seed, and libraries loaded first that patch the standard library (fastcore patches pathlib.Path)
    b = run_py(DIGESTS.format(preload="import fastcore.all, datasets, IPython"), PYTHONHASHSEED="2")
    assert a == b
    assert a["test"][0] == "How long should you wait before filing a missing person report?"
