"""What the paper-comparison tables put side by side: bound beside bound (DRAW), NLL rather than PPL (PTB)."""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their `common` module
    try:
        spec = importlib.util.spec_from_file_location(f"pyrovae_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_draw_table_puts_our_bound_beside_the_papers_bound():
    dt = _load("draw_table")
    curve = [{"train_cpu_s": 0.0, "test_bound": -200.0}]
    results = {name: {"steps": 10, "epochs": 0.1, "test_bound": -150.0 - i, "nll": 140.0 - i, "nll_stderr": 1.5, "nll_per_image": [140.0 - i, 142.0 - 2 * i],
                      "curve": curve, "train_cpu_s": 1.0, "train_wall_s": 1.0, "eval_wall_s": 1.0, "capture": ""} for i, name in enumerate(dt.MODELS)}
    args = argparse.Namespace(quick=False, full=False, device="cpu", jobs=3)
    lines = dt.report(results, args, 60.0).splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    bound, paper, nll = cols.index("test NLL bound (-ELBO)"), cols.index("paper NLL bound (64 steps)"), cols.index("NLL, importance sampled (k = 50) ± s.e.")
    assert paper == bound + 1 and nll == paper + 1
    row = [c.strip() for c in next(line for line in lines if line.startswith("| draw |")).strip("|").split("|")]
    assert row[bound] == "<= 150.00" and row[paper] == "<= 87.40" and row[nll].startswith("140.00")
    assert "ELBO(analytic_kl=True)" in "\n".join(lines) and "bound 62.6 nats above the paper's bound 87.4" in "\n".join(lines)


def test_draw_table_trains_with_the_closed_form_kl():
    dt = _load("draw_table")
    for name in dt.MODELS:
        objective = dt.build_objective(dt.config(name, dt.PROTOCOLS["quick"]))
        assert type(objective).__name__ == "ELBO" and objective.analytic_kl, name


def test_benchmarks_build_what_the_registry_builds():
    """The scripts' models come from pyrovae.cli.registry: DRAW with its own guide, the paper's sizes."""
    dt = _load("draw_table")
    model, guide = dt.build(dt.config("draw-attention", dt.PROTOCOLS["quick"]), (1, 28, 28))
    assert type(model).__name__ == "DRAW" and model.attention and model.steps == 3 and type(guide).__name__ == "DRAWGuide"


def test_paired_difference_and_nll_summary():
    common = _load("common")
    import torch

    d, se = common.paired_difference(torch.tensor([3.0, 5.0, 7.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert d == 3.0 and math.isclose(se, 1.0 / math.sqrt(3), rel_tol=1e-6)  # differences 2, 3, 4: sd 1
    assert math.isnan(common.paired_difference(torch.tensor([1.0]), torch.tensor([0.0]))[1])
    s = common.nll_summary(torch.tensor([1.0, 3.0]), torch.tensor([0.3, 0.4]))
    assert s["test_nll"] == 2.0 and math.isclose(s["test_nll_importance_stderr"], math.sqrt(0.125) / math.sqrt(2), rel_tol=1e-6)
    assert common.fmt(None) == common.fmt(float("nan")) == "—" and common.fmt(1.234, 1) == "1.2"


def test_sentence_table_states_what_ppl_counts():
    st = _load("sentence_table")
    note = st.ppl_note({"LM": {"result": {"nll": 100.0, "perplexity": math.exp(100.0 / 21.917)}}})  # the full PTB test set: 21.917 tokens per sentence
    assert "paper's convention" not in note and "`<eos>`" in note and "21.9 tokens per sentence" in note
    assert "Compare the NLL" in note
    assert "NLL 100 is PPL 95.8" in note  # not the paper's 116
    committed = (ROOT / "benchmarks" / "results" / "sentence_table.md").read_text()
    assert "the paper's convention" not in committed and "Compare the NLL with the paper's" in committed


def test_recorded_commands_name_no_machine_folder(monkeypatch):
    """A results file records its command: absolute paths become repository-relative, or the folder's last name."""
    common = _load("common")
    monkeypatch.setattr(sys, "argv", ["iwae_table.py", "--work-dir", "/scratch/me/runs", f"--out={ROOT / 'benchmarks' / 'results' / 'x.md'}", "--stages", "5"])
    line = common.command_line()
    assert "--work-dir .../runs" in line and "--out=benchmarks/results/x.md" in line and "/scratch" not in line and str(ROOT) not in line
