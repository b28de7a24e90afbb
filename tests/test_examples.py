"""Every script in examples/ runs with ``--smoke`` (issue 25: examples that run).

To keep the default suite fast, the examples share one Python process (``runpy``, each as ``__main__`` with
``--smoke``): torch and pyro are imported once instead of once per example. Each example is still reported as its own
test, with its time and traceback. ``torchrun_launch.py`` starts its own processes, so it runs in a subprocess of its
own. Both are bounded in time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
OWN_PROCESS = {"torchrun_launch.py"}
SHARED = [p for p in EXAMPLES if p.name not in OWN_PROCESS]

RUNNER = r"""
import json, runpy, sys, time, traceback
import pyro
results = {}
for path in sys.argv[2:]:
    sys.argv = [path, "--smoke"]
    pyro.clear_param_store()
    start = time.perf_counter()
    try:
        runpy.run_path(path, run_name="__main__")
        error = None
    except SystemExit as e:
        error = None if e.code in (0, None) else f"SystemExit({e.code!r})"
    except BaseException:
        error = traceback.format_exc()
    results[path] = {"seconds": round(time.perf_counter() - start, 2), "error": error}
    print(f"{path}: {results[path]['seconds']} s", "ok" if error is None else "FAILED", flush=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f)
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("examples")
    results = work / "results.json"
    code = f"RESULTS = {str(results)!r}\n" + RUNNER
    proc = subprocess.run([sys.executable, "-c", code, "--", *map(str, SHARED)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=300)
    found = json.loads(results.read_text()) if results.exists() else {}
    return found, proc


def test_every_example_documents_its_commands():
    assert len(EXAMPLES) >= 9
    for path in EXAMPLES:
        text = path.read_text()
        assert text.startswith('"""'), f"{path.name}: starts with a docstring (title, what it shows, how to run it)"
        assert f"examples/{path.name} --smoke" in text and "--smoke" in text, f"{path.name}: the docstring gives the smoke command"
        assert 'if __name__ == "__main__":' in text


@pytest.mark.parametrize("path", SHARED, ids=lambda p: p.name)
def test_example_smoke(path, shared_runs):
    found, proc = shared_runs
    result = found.get(str(path))
    assert result is not None, f"{path.name} did not run (runner exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert result["error"] is None, f"{path.name} --smoke failed:\n{result['error']}"


@pytest.mark.parametrize("name", sorted(OWN_PROCESS))
def test_example_smoke_own_process(name, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--smoke"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
