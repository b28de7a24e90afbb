"""What the paper-comparison tables put side by side: bound beside bound (DRAW), NLL rather than PPL (PTB)."""
from __future__ import annotations

import argparse
import json
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their `common` module
    try:
        spec = importlib.util.spec_from_file_location(f"pyrovae_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it runs
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


def test_benchmark_build_refuses_a_key_nothing_reads():
    """A hand-written config's misspelt or misplaced option is an error naming it, not a default in silence."""
    common = _load("common")
    with pytest.raises(ValueError, match=r"'draw_step' \(did you mean 'draw_steps'\?\)"):
        common.build({"model": "draw", "draw_step": 3}, (1, 28, 28))
    with pytest.raises(ValueError, match=r"would not read 'draw_steps' \(read by --model draw"):
        common.build({"model": "vae", "draw_steps": 3}, (1, 28, 28))
    model, _ = common.build({"model": "draw", "draw_steps": 3, "objective": "elbo"}, (1, 28, 28))
    assert model.steps == 3


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


def _run_gradient_variance(gv, argv: list[str]) -> int:
    import torch

    threads = torch.get_num_threads()  # the script sets one thread for itself
    try:
        return gv.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_gradient_variance_resumed_run_equals_an_uninterrupted_one(tmp_path, data_root, monkeypatch):
    """KSW15 Table 1's long run survives interruption: stopped after an epoch, killed in the middle of a
    measurement, continued with --resume, it ends with the uninterrupted run's weights, optimiser state and
    variances bit for bit; a checkpoint with other settings, or one met without --resume, is refused."""
    import pytest
    import torch

    gv = _load("gradient_variance")
    small = ["--quick", "--train-size", "300", "--batch-size", "50", "--reps", "4", "--epochs", "1,2", "--vae-train-size", "200",
             "--vae-epochs", "1,2", "--vae-reps", "3", "--checkpoint-minutes", "0", "--data-dir", str(data_root)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run_gradient_variance(gv, small + ["--work-dir", str(whole)]) == 0

    assert _run_gradient_variance(gv, small + ["--work-dir", str(parts), "--stop-after-epochs", "1"]) == 0
    state = torch.load(parts / "part1.pt", weights_only=False)
    assert state["epoch"] == 1 and state["results"] == {} and not (parts / "part2.pt").exists()

    class Killed(Exception):
        pass

    real, calls = gv.minibatch_gradient, {"separate": 0}

    def killed_at_the_sixth_separate_draw(net, x, y, idx, how, *rest):
        if how == "separate weight samples":
            calls["separate"] += 1
            if calls["separate"] == 6:  # epoch 2's second draw (4 draws at epoch 1)
                raise Killed
        return real(net, x, y, idx, how, *rest)

    monkeypatch.setattr(gv, "minibatch_gradient", killed_at_the_sixth_separate_draw)
    with pytest.raises(Killed):
        _run_gradient_variance(gv, small + ["--work-dir", str(parts), "--resume"])
    monkeypatch.setattr(gv, "minibatch_gradient", real)
    state = torch.load(parts / "part1.pt", weights_only=False)
    assert state["epoch"] == 2 and state["partial"]["how"] == "separate weight samples" and state["partial"]["done"] == 1
    assert list(state["results"][2]["variances"]) == ["local reparameterization"]

    with pytest.raises(SystemExit, match="reps: 4 there, 5 now"):
        _run_gradient_variance(gv, [*small, "--reps", "5", "--work-dir", str(parts), "--resume"])
    with pytest.raises(SystemExit, match="pass --resume"):
        _run_gradient_variance(gv, small + ["--work-dir", str(parts)])

    assert _run_gradient_variance(gv, small + ["--work-dir", str(parts), "--resume", "--stop-after-epochs", "1"]) == 0
    assert torch.load(parts / "part2.pt", weights_only=False)["epoch"] == 1
    assert _run_gradient_variance(gv, small + ["--work-dir", str(parts), "--resume"]) == 0

    for name in ("part1.pt", "part2.pt"):
        a, b = (torch.load(d / name, weights_only=False) for d in (whole, parts))
        for state in (a, b):
            for res in state["results"].values():
                res.pop("measure_seconds")
        assert a["results"] == b["results"] and a["epoch"] == b["epoch"] == 2 and b["partial"] is None, name
        assert a["weights"].keys() == b["weights"].keys() and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]), name
        moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in (a["opt"]["state"][i] for i in sorted(a["opt"]["state"]))]
        moments_b = [(s["exp_avg"], s["exp_avg_sq"]) for s in (b["opt"]["state"][i] for i in sorted(b["opt"]["state"]))]
        assert all(torch.equal(u, v) for pa, pb in zip(moments, moments_b) for u, v in zip(pa, pb)), name
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), name
    assert set(a["results"][2]["variances"]) == {"local reparameterization", "single weight sample"}

    with pytest.raises(SystemExit):  # a smoke run never writes the committed table
        gv.parse_args(["--quick", "--out", str(gv.DEFAULT_OUT)])


class _Ticks:
    """A clock that advances one 'second' per reading: the draw_table budget then counts one second per training step,
    so two runs take the same steps whatever else the machine does."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _binary_images(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.2), generator=g)


def test_draw_t64_continues_its_budget_and_curve_after_a_stop(tmp_path):
    """The t64 protocol's training (in its quick form: DRAW with T = 2, 16-unit LSTMs), stopped after one curve segment and
    continued by a fresh model and Trainer from its run folder, ends where an uninterrupted run ends: the same budget,
    steps and curve (point for point, bit for bit; only the wall time differs) and the same weights, rather than starting again. 12 steps of
    batch 20 on 60 images: the curve's segments (4 steps) end inside epochs (3 steps)."""
    import torch

    from pyrovae.train.checkpoint import load_checkpoint

    dt = _load("draw_table")
    s = {**dt.PROTOCOLS["t64-quick"], "budget_s": 12.0, "curve_every_s": 4.0, "batch_size": 20, "curve_test": 20, "bound_test": 20, "nll_test": 10, "eval_samples": 3}
    train, test = _binary_images(60, 1), _binary_images(20, 2)
    whole = dt.run_model("draw", s, train, test, run_dir=tmp_path / "whole", clock=_Ticks(), protocol="t64-quick")

    assert dt.run_model("draw", s, train, test, run_dir=tmp_path / "split", stop_after=1, clock=_Ticks(), protocol="t64-quick") is None
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["cursor"]["step"] == 4 and saved["config"]["progress"]["train_cpu_s"] == 4.0
    assert [p["steps"] for p in saved["config"]["progress"]["curve"]] == [0, 4]
    try:
        dt.run_model("draw", s, train, test, run_dir=tmp_path / "split", clock=_Ticks(), protocol="t64-quick")
    except SystemExit as e:
        assert "--resume" in str(e)  # a run folder that holds a run is not trained over
    else:
        raise AssertionError("a second run into a run folder that holds a run was not refused")
    split = dt.run_model("draw", s, train, test, run_dir=tmp_path / "split", resume=True, clock=_Ticks(), protocol="t64-quick")

    assert whole["invocations"] == 1 and split["invocations"] == 2
    assert [p["steps"] for p in whole["curve"]] == [0, 4, 8, 12] and whole["train_cpu_s"] == 12.0 and whole["steps"] == 12 and whole["epochs"] == 4.0
    wall = lambda curve: [{k: v for k, v in p.items() if k != "train_wall_s"} for p in curve]  # the one thing a stop changes
    assert wall(split["curve"]) == wall(whole["curve"])
    for key in ("train_cpu_s", "steps", "epochs", "test_bound", "nll"):
        assert split[key] == whole[key], key
    assert [h["train_loss"] for h in split["history"]] == [h["train_loss"] for h in whole["history"]] and len(whole["history"]) == 4
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["params"] for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len({p["test_bound"] for p in whole["curve"]}) == 4  # the curve moves: equal curves are not four copies of one number


def test_draw_t64_command_stops_resumes_and_never_writes_the_committed_table(tmp_path, monkeypatch):
    """The command line of the t64 protocol: --stop-after leaves a checkpoint and no result, the same command with
    --resume finishes the model, a rerun without --resume is refused, and the table (written once every model of the
    protocol is done) goes into the work folder; a t64-quick run may not name the committed tables."""
    import types

    dt = _load("draw_table")
    committed = ROOT / "benchmarks" / "results" / "draw_t64.md"
    before = committed.read_bytes() if committed.exists() else None
    for out in ("draw_t64.md", "draw_table.md"):
        try:
            dt.parse_args(["--protocol", "t64-quick", "--out", str(ROOT / "benchmarks" / "results" / out)])
        except SystemExit:
            pass
        else:
            raise AssertionError(f"--protocol t64-quick was allowed to write results/{out}")
    data = types.SimpleNamespace(train=_binary_images(100, 1), test=_binary_images(100, 2))
    monkeypatch.setattr(dt, "load_dataset", lambda *a, **k: data)
    monkeypatch.setitem(dt.PROTOCOLS, "t64-quick", {**dt.PROTOCOLS["t64-quick"], "budget_s": 4.0, "curve_every_s": 2.0, "train_size": None})
    monkeypatch.setattr(dt, "CLOCK", _Ticks())  # one 'second' per step: 2 steps per segment
    work = tmp_path / "work"
    common = ["--protocol", "t64-quick", "--work-dir", str(work)]
    assert dt.main([*common, "--only", "draw", "--stop-after", "1"]) == 0
    run = work / "t64-quick" / "draw"
    first = json.loads((run / "progress.json").read_text())
    assert not (work / "t64-quick" / "draw.json").exists() and [p["steps"] for p in first["curve"]] == [0, 2] and first["train_cpu_s"] == 2.0
    assert dt.main([*common, "--only", "draw", "--resume"]) == 0
    result = json.loads((work / "t64-quick" / "draw.json").read_text())
    assert result["invocations"] == 2 and result["curve"][:2] == first["curve"] and result["train_cpu_s"] == 4.0
    assert [p["steps"] for p in result["curve"]] == [0, 2, 4] and [p["target_cpu_s"] for p in result["curve"]] == [0.0, 2.0, 4.0]
    assert not (work / "t64-quick" / "draw_t64.md").exists()  # draw-attention has not run
    try:
        dt.main([*common, "--only", "draw"])
    except SystemExit as e:
        assert "--resume" in str(e)
    else:
        raise AssertionError("a finished run was trained over without --resume")
    assert dt.main([*common, "--only", "draw-attention", "--resume"]) == 0
    assert not (work / "t64-quick" / "draw_t64.md").exists()  # draw-attention-clip has not run
    assert dt.main([*common, "--only", "draw-attention-clip", "--resume"]) == 0
    assert not (work / "t64-quick" / "draw_t64.md").exists()  # draw-attention-clip-lr1e-3 has not run
    assert dt.main([*common, "--only", "draw-attention-clip-lr1e-3", "--resume"]) == 0
    assert not (work / "t64-quick" / "draw_t64.md").exists()  # draw-attention-tile has not run
    assert dt.main([*common, "--only", "draw-attention-tile", "--resume"]) == 0
    tile = json.loads((work / "t64-quick" / "draw-attention-tile.json").read_text())
    assert tile["settings"]["attention_init"] == "tile" and tile["settings"]["clip_norm"] == 10.0
    assert dt.config("draw-attention-tile", tile["settings"])["attention_init"] == "tile"
    assert dt.config("draw-attention", dt.model_settings("draw-attention", dt.PROTOCOLS["t64-2h"]))["attention_init"] == "unit"
    clipped = json.loads((work / "t64-quick" / "draw-attention-clip.json").read_text())
    assert clipped["settings"]["lr"] == 3e-4 and clipped["settings"]["clip_norm"] == 10.0
    clipped = json.loads((work / "t64-quick" / "draw-attention-clip-lr1e-3.json").read_text())
    assert clipped["settings"]["lr"] == 1e-3 and clipped["settings"]["clip_norm"] == 10.0
    table = (work / "t64-quick" / "draw_t64.md").read_text()
    assert all(f"| {name} | " in table for name in dt.T64_MODELS)
    assert "| paper, final | 87.40 | 80.97 | 80.97 | 80.97 | 80.97 |" in table and "clipped to 10 before each step" in table
    assert "Adam lr 0.001, batch 50;" in table and "{s[" not in table  # every field filled in
    assert "- Model `draw-attention-tile`: the same model as `draw-attention`, trained with the global gradient norm clipped to 10 before each step, its read and write windows starting as `attention_init='tile'`" in table
    assert "- Model `draw-attention-clip-lr1e-3`: the same model as `draw-attention`, trained with the global gradient norm clipped to 10" in table
    assert table.count("NLL(no attention) - NLL(attention)") == 4
    assert (committed.read_bytes() if committed.exists() else None) == before


def test_speed_flop_limit_has_a_row_per_timed_implementation():
    sp = _load("speed")
    row = sp.Row("cpu", sp.Config("draw", "elbo", 100), rates={"hand": [1.0], "pyrovae": [1.0], "compile": [1.0]},
                 cpu_rates={"hand": [1 / 1.2], "pyrovae": [1 / 1.1], "compile": [1 / 0.9]}, flops=int(100e9), mm_rates=[150e9])
    lines = sp.flop_section([row], 125e9).splitlines()
    rows = {c[5]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines if line.startswith("| DRAW"))}
    # the FLOP time at the best rate of the run (150 GFLOP/s): 667 ms
    assert rows["hand-written"][4] == "667" and rows["hand-written"][8] == "**1.80**" and rows["hand-written"][9] == "**no**"
    assert rows["pyrovae (capture replay, the default)"][6:8] == ["1100", "0.92"]
    assert rows["pyrovae, capture compile"][6:] == ["900", "0.75", "**1.35**", "yes"]


def test_speed_flop_limit_shows_the_floor_against_the_flop_time():
    sp = _load("speed")
    row = sp.Row("cpu", sp.Config("draw", "elbo", 100), rates={"hand": [1.0]}, cpu_rates={"hand": [1 / 1.2]}, flops=int(150e9),
                 mm_rates=[150e9], floor={"products alone": 1.3, "optimiser alone": 0.05})

    def floor_row():
        lines = sp.flop_section([row], 125e9).splitlines()
        return [c.strip() for c in next(x for x in lines if x.startswith("| DRAW") and x.count("|") == 10).strip("|").split("|")][3:]

    # FLOP time 1000 ms at 150 GFLOP/s; no profile: the products alone, 1300 + 50 ms
    assert floor_row() == ["1000", "1300", "—", "50.0", "1350", "**1.35**"]
    # a step whose products ran faster than they did alone (a compiled step's batched products): the floor takes those
    common = _load("common")
    row.breakdown = {"hand": {**dict.fromkeys(common.TIME_LABELS, 0.0), "matrix products": 1400.0},
                     "compile": {**dict.fromkeys(common.TIME_LABELS, 0.0), "matrix products": 1100.0}}
    assert floor_row() == ["1000", "1300", "1100", "50.0", "1150", "**1.15**"]
    row.floor = {}
    assert "The floor" not in sp.flop_section([row], 125e9)


def test_text_speed_floor_takes_the_lower_product_time():
    ts = _load("text_speed")
    parts = {"products alone": 0.082, "products in the step": 0.090, "optimiser alone": 0.013, "softmax alone": 0.020}
    assert ts.floor_ms(parts) == pytest.approx(115.0)
    assert ts.floor_ms({**parts, "products in the step": 0.070}) == pytest.approx(103.0)


def test_products_alone_replays_the_steps_products_at_their_layouts():
    common = _load("common")
    a, b, w = torch.randn(64, 32), torch.randn(32, 16), torch.randn(48, 32, requires_grad=True)
    bias = torch.zeros(48, requires_grad=True)

    def step():
        torch.relu(a @ b).sum()  # one mm, and elementwise ops that are not products
        torch.nn.functional.linear(a, w, bias).sum().backward()  # addmm forward (w transposed), mm for w's gradient

    seconds, count, flops = common.products_alone(step)
    assert count == 3 and seconds > 0
    assert flops == 2 * (64 * 32 * 16 + 64 * 32 * 48 + 48 * 64 * 32)
    seen = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm.default:
                seen.append(args[2].stride())
            return func(*args, **(kwargs or {}))

    with Spy():
        common.products_alone(step, repeats=1)
    assert seen and all(s == (1, 32) for s in seen)  # w.t(): the transposed view, replayed transposed


def test_adam_alone_steps_copies_not_the_parameters():
    common = _load("common")
    p = torch.nn.Parameter(torch.ones(1000, 10))
    assert common.adam_alone([p], repeats=2) > 0
    assert p.grad is None and bool((p == 1).all())
