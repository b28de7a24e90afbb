"""What a package on an index has: ``pyrovae --version``, a changelog and complete metadata (issue 25)."""

import sys
from importlib.metadata import metadata, version
from pathlib import Path

import pytest

import pyrovae

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag(capsys):
    from pyrovae.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyrovae {version('pyrovae')}"


def test_version_is_written_once_in_agreement():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pyrovae.__version__ == project["version"] == version("pyrovae")
    assert f"## {project['version']}" in (ROOT / "CHANGELOG.md").read_text()


def test_package_metadata():
    meta = metadata("pyrovae")
    classifiers = meta.get_all("Classifier") or []
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["License-Expression"] == "MIT" or "MIT" in (meta["License"] or "")
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers)
    assert meta.get_all("Project-URL"), "project URLs (documentation, source, changelog)"
