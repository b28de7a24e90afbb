"""Every ```python block of the README and of docs/ runs (issue 25: no example goes stale).

The blocks of one page run in order in one namespace, as a reader would paste them. A block preceded by
``<!-- doc-test: skip (reason) -->`` is a fragment and is not run; the main examples carry no such mark.

Smoke mode, so that the suite stays fast: ``load_dataset`` returns 96 synthetic examples of the named data
set's shape, ``Trainer.fit`` trains at most 2 epochs and ``log_likelihood`` draws at most 20 samples. The
code on the page is what runs; only the sizes shrink.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\s*$")
SKIP = re.compile(r"<!--\s*doc-test:\s*skip")
SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "binarized-mnist": (1, 28, 28), "color-mnist": (3, 28, 28)}


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, skipped) for each ```python block of a Markdown file, indented blocks included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append((start, textwrap.dedent("\n".join(body)), bool(SKIP.search(before))))
        i += 1
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def _smoke(monkeypatch):
    import pyrovae.data
    import pyrovae.data.core
    import pyrovae.evaluate
    import pyrovae.evaluate.likelihood
    from pyrovae.train import Trainer

    def load_dataset(name, *args, binarize="none", device="cpu", **kwargs):
        if name not in SHAPES:
            pytest.skip(f"no synthetic stand-in for data set {name!r}")
        g = torch.Generator().manual_seed(0)
        x = torch.rand(96, *SHAPES[name], generator=g)
        return pyrovae.data.from_array(x[:64], test=x[64:80], valid=x[80:], binarize=binarize, device=device)

    monkeypatch.setattr(pyrovae.data, "load_dataset", load_dataset)
    monkeypatch.setattr(pyrovae.data.core, "load_dataset", load_dataset)

    fit = Trainer.fit

    def short_fit(self, *args, epochs=1, **kwargs):
        return fit(self, *args, epochs=min(epochs, 2), **kwargs)

    monkeypatch.setattr(Trainer, "fit", short_fit)
    log_likelihood = pyrovae.evaluate.log_likelihood

    def few_samples(*args, num_samples=5000, **kwargs):
        return log_likelihood(*args, num_samples=min(num_samples, 20), **kwargs)

    monkeypatch.setattr(pyrovae.evaluate, "log_likelihood", few_samples)


def test_every_page_with_code_is_collected():
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"README.md", "contract.md", "getting-started.md", "objectives.md", "training.md"} <= names
    runnable = sum(not skipped for p in PAGES_WITH_CODE for _, _, skipped in python_blocks(p))
    assert runnable >= 7


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    import pyro

    import pyrovae.cli.registry  # noqa: F401  (the library's models, guides and objectives registered first)
    from pyrovae.utils import registry

    monkeypatch.chdir(tmp_path)  # runs/ folders the examples write land here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _smoke(monkeypatch)
    for reg in (registry.OBJECTIVES, registry.MODELS, registry.GUIDES, registry.MODEL_GUIDES):  # a page's own registrations end with it
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    pyro.clear_param_store()
    namespace: dict = {"__name__": "__doc__"}
    for line, code, skipped in python_blocks(page):
        if skipped:
            continue
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.relative_to(ROOT)}, the python block at line {line}: {error!r}") from error
