"""The documentation site builds from the sources with no warning (``mkdocs build --strict``).

Needs the ``docs`` extra (``pip install -e ".[docs]"``, as ``.ci/run`` does); skipped without it. The build reads
docstrings by static analysis and imports only the CLI parser, so it takes about 10 s on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason='the docs extra is not installed: pip install -e ".[docs]"')
pytest.importorskip("material", reason='the docs extra is not installed: pip install -e ".[docs]"')
pytest.importorskip("mkdocstrings", reason='the docs extra is not installed: pip install -e ".[docs]"')


def test_docs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    site = tmp_path / "site"
    # the generated pages exist and hold what they are generated from
    cli = (site / "cli" / "index.html").read_text()
    assert "--num-particles" in cli and "--eval-capture" in cli
    for result in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        assert (site / "reproductions" / result.stem / "index.html").exists(), result.name
    assert "log_likelihood" in (site / "api" / "evaluate" / "index.html").read_text()
    assert "GaussianEncoder" in (site / "api" / "models" / "index.html").read_text()

