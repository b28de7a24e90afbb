"""The command line's usability: options declared by the registries, honest --help, run folders whose outputs are
named by what produced them, sampling and reloading a run without its data, quiet output.
Runs on a tiny synthetic dataset registered for the test (30 test examples of 12 features)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro
import pyrovae
import pyrovae.cli.commands as cli
import pyrovae.cli.registry as registry
import pyrovae.evaluate as E
from pyrovae.train.checkpoint import load_checkpoint
from pyrovae.cli import main, parser
from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.cli.registry import Arg, Entry
from tiny_data import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-cli"
D_X = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with tiny_dataset(tmp_path_factory.mktemp("data"), TINY, train=60, test=30, dim=D_X) as root:
        yield root


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A one-epoch run with a full test-set evaluation (k = 3) in evaluation.json."""
    path = tmp_path_factory.mktemp("runs") / "run"
    argv = [
        "train", "--dataset", TINY, "--data-dir", str(data_dir), "--valid-size", "10", "--z-dims", "2", "--hidden", "8",
        "--batch-size", "10", "--epochs", "1", "--device", "cpu", "--eval-samples", "3", "--no-progress", "--run-dir", str(path),
    ]
    assert main(argv) == 0
    return path


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------- 1. registries

def _train_flags() -> set[str]:
    sub = next(a for a in parser()._actions if a.dest == "command")
    return {s for a in sub.choices["train"]._actions for s in a.option_strings}


def test_every_registry_option_is_a_train_flag_and_keeps_its_config_key():
    flags = _train_flags()
    for arg in registry.all_args():
        assert arg.flag in flags, arg.flag
    # the flag names and config keys of runs trained before the registries declared them
    for old in ("--z-dims", "--hidden", "--flow-length", "--prior-flow", "--num-particles", "-k", "--geco-alpha", "--beta-schedule",
                "--free-bits", "--draw-steps", "--bayesian-decoder", "--encoder-dropout", "--word-dropout", "--analytic-kl"):
        assert old in flags, old
    assert registry.OBJECTIVE_ARGS["geco"]["alpha"] == "geco_alpha" and registry.OBJECTIVE_ARGS["beta"]["schedule"] == "beta_schedule"


def test_one_registry_entry_adds_a_model_with_its_flag(monkeypatch):
    size = Arg("--toy-width", type=int, default=3, help="width of the toy model")
    built = {}

    def toy(cfg, x_shape):
        built["width"] = cfg["toy_width"]
        return VAE(x_shape, (2,), hidden=((cfg["toy_width"],),))

    monkeypatch.setitem(registry.MODELS, "toy", Entry(toy, (size,)))
    args = parser().parse_args(["train", "--model", "toy", "--toy-width", "5"])
    cfg = cli._config(args)
    assert cfg["toy_width"] == 5
    registry.build_model(cfg, (4,))
    assert built["width"] == 5


def test_one_registry_entry_adds_an_objective_with_its_flags(monkeypatch):
    from pyrovae.objectives import IWAE

    monkeypatch.setitem(registry.OBJECTIVES, "iwae-dreg", Entry(IWAE, (registry.NUM_PARTICLES, Arg("--dreg-estimator", default="dreg", param="estimator", help="estimator"))))
    args = parser().parse_args(["train", "--objective", "iwae-dreg", "-k", "7"])
    objective = registry.build_objective(cli._config(args))
    assert isinstance(objective, IWAE) and objective.num_particles == 7 and objective.estimator == "dreg"


def test_two_different_declarations_of_one_flag_are_refused(monkeypatch):
    monkeypatch.setitem(registry.GUIDES, "clash", Entry(lambda cfg, x_shape: None, (Arg("--arch", help="another --arch"),)))
    with pytest.raises(ValueError, match="--arch differently"):
        registry.all_args()


def test_plain_functions_are_still_registry_entries(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "plain", lambda cfg, x_shape: VAE(x_shape, (2,)))
    assert isinstance(registry.build_model({"model": "plain"}, (4,)), VAE)
    assert "--model" in _train_flags()


# ---------------------------------------------------------------------------------------------- 2. --help

def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def _option_entries(text: str) -> dict[str, str]:
    """{first option string: its help text} of an argparse help page."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
def test_help_states_each_default_exactly_once(command, capsys):
    entries = _option_entries(_help(command, capsys))
    entries.pop("-h")
    assert len(entries) > (60 if command == "train" else 5)
    for option, text in entries.items():
        text = " ".join(text.split())  # argparse wraps lines anywhere
        assert len(re.findall(r"\bdefault", text)) == 1, (option, text)
        assert "(default: None)" not in text, (option, text)
    for option in {"train": ["--lr", "--batch-size", "--binarize", "--objective", "--seed", "--threads", "--valid-size"], "evaluate": ["--num-samples", "--limit"], "sample": ["--num", "--seed", "--out"]}[command]:
        assert option in entries, option


# ---------------------------------------------------------------------------------------------- 3., 5. threads and quiet output

def test_threads_sets_torch_threads(run, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["sample", str(run), "-n", "4", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "s.png")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only on a machine without CUDA")
def test_no_cuda_runtime_notice_is_silenced(tmp_path):
    code = "import torch.utils.cpp_extension"
    env = {"CUDA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", "from pyrovae.cli import quiet_torch_notices; quiet_torch_notices(); " + code], capture_output=True, text=True, env=env, timeout=120)
    assert "No CUDA runtime is found" in loud.stderr  # the notice exists here, so the next line can fail
    assert "No CUDA runtime" not in quiet.stderr and quiet.returncode == 0, quiet.stderr


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_train_and_evaluate_print_no_pyro_info_lines(objective, data_dir, tmp_path, capfd):
    argv = [
        "train", "--dataset", TINY, "--data-dir", str(data_dir), "--valid-size", "10", "--z-dims", "2", "--hidden", "8", "--batch-size", "10",
        "--epochs", "1", "--device", "cpu", "--eval-samples", "2", "--objective", objective, "--run-dir", str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    assert main(["evaluate", str(tmp_path / "run"), "-k", "2", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    out, err = capfd.readouterr()
    assert "evaluation.json" in out  # the output was captured
    assert "Guessed max_plate_nesting" not in out + err and "No CUDA runtime" not in out + err


# ---------------------------------------------------------------------------------------------- 4. progress bar

def test_log_likelihood_shows_a_bar_on_a_terminal(monkeypatch, capsys):
    import pyrovae.utils.progress as P

    model, guide = VAE((D_X,), (2,), hidden=((8,),)), GaussianEncoder((D_X,), (2,), hidden=((8,),))
    x = torch.rand(30, D_X).round()
    E.log_likelihood(model, guide, x, num_samples=4, batch_size=10, progress=True)
    assert "img/s" not in capsys.readouterr().err  # not a terminal: no bar
    monkeypatch.setattr(P, "is_terminal", lambda stream=None: True)
    bars = []
    real_bar = P.bar

    def bar(*args, **kwargs):
        bars.append(real_bar(*args, mininterval=0, **kwargs))  # redraw on every update, not at most 10 times a second
        return bars[-1]

    monkeypatch.setattr(P, "bar", bar)
    E.log_likelihood(model, guide, x, num_samples=4, batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert len(bars) == 1 and bars[0].n == bars[0].total == 30
    assert "log p(x), k=4" in err and "20/30" in err and "img/s" in err


# ---------------------------------------------------------------------------------------------- 6. outputs named by what made them

def test_a_partial_evaluation_never_replaces_the_full_one(run, data_dir, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    full = json.loads((run / "evaluation.json").read_text())
    assert full["num_test"] == 30 and full["limit"] is None
    pictures = {p: (run / p).read_bytes() for p in ("samples.png", "reconstructions.png", "latent.png")}
    assert main(["evaluate", str(run), "-k", "2", "--limit", "10", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "evaluation-limit10.json" in out
    assert "evaluating best.pt: log p(x) with k = 2 importance samples on 10 test examples" in out  # said before it starts
    assert json.loads((run / "evaluation.json").read_text()) == full
    assert {p: (run / p).read_bytes() for p in pictures} == pictures
    partial = json.loads((run / "evaluation-limit10.json").read_text())
    assert partial["num_test"] == 10 and partial["limit"] == 10
    for name in ("reconstructions-limit10.png", "latent-limit10.png", "samples-limit10.png"):
        assert (run / name).is_file(), name
    # a full evaluation replaces the full one
    assert main(["evaluate", str(run), "-k", "2", "--device", "cpu", "--data-dir", str(data_dir)]) == 0
    assert json.loads((run / "evaluation.json").read_text())["num_samples"] == 2


def test_sample_names_its_picture_and_leaves_samples_png_alone(run, tmp_path):
    run = copy_run(run, tmp_path)
    before = (run / "samples.png").read_bytes()
    assert main(["sample", str(run), "-n", "9", "--seed", "3", "--device", "cpu"]) == 0
    assert (run / "samples-seed3-n9.png").is_file() and (run / "samples.png").read_bytes() == before
    first = (run / "samples-seed3-n9.png").read_bytes()
    assert main(["sample", str(run), "-n", "9", "--seed", "3", "--device", "cpu"]) == 0
    assert (run / "samples-seed3-n9.png").read_bytes() == first  # same name, same picture: the seed fixes the draw


# ---------------------------------------------------------------------------------------------- 7. sampling without the data

def test_sample_needs_no_data(run, tmp_path, monkeypatch):
    run = copy_run(run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["x_shape"] == [D_X] and cfg["x_dtype"] == "float32" and Path(cfg["data_found_in"]).is_dir()
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    monkeypatch.setattr(cli, "_load_data", lambda *a, **k: pytest.fail("sample read the data set"))
    assert main(["sample", str(run), "-n", "4", "--device", "cpu"]) == 0
    assert (run / "samples-seed0-n4.png").is_file()


def test_an_old_config_without_x_shape_samples_through_the_data(run, data_dir, tmp_path, monkeypatch):
    run = copy_run(run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    for key in ("x_shape", "x_dtype", "data_found_in"):
        del cfg[key]
    cfg["data_dir"] = None  # trained with $PYROVAE_DATA
    (run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("PYROVAE_DATA", str(data_dir))
    assert main(["sample", str(run), "-n", "4", "--device", "cpu"]) == 0
    assert main(["evaluate", str(run), "-k", "2", "--device", "cpu"]) == 0


def test_evaluate_finds_the_data_where_training_found_it(run, tmp_path, monkeypatch):
    run = copy_run(run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data_dir"] = None  # as when $PYROVAE_DATA was used, and $PYROVAE_DATA is now unset
    (run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    assert main(["evaluate", str(run), "-k", "2", "--device", "cpu"]) == 0


# ---------------------------------------------------------------------------------------------- 8. run names

def test_default_run_name_says_dataset_model_likelihood_guide_objective():
    args = vars(parser().parse_args(["train", "--dataset", "mnist", "--objective", "iwae"]))
    assert cli.default_run_name(args, when="T") == "mnist-vae_bernoulli-gaussian_guide-iwae-T"
    args = vars(parser().parse_args(["train", "--likelihood", "gaussian", "--guide", "flow"]))
    assert cli.default_run_name(args, when="T") == "mnist-vae_gaussian-flow_guide-elbo-T"
    args = vars(parser().parse_args(["train", "--dataset", "ptb", "--model", "sentence"]))
    assert cli.default_run_name(args, when="T") == "ptb-sentence-rnn_guide-elbo-T"  # a text model has no image likelihood


# ---------------------------------------------------------------------------------------------- 9. pyrovae.load_run

def test_load_run_gives_model_guide_objective_and_config(run, data_dir):
    loaded = pyrovae.load_run(run)
    assert isinstance(loaded, pyrovae.LoadedRun)
    assert isinstance(loaded.model, VAE) and isinstance(loaded.guide, GaussianEncoder)
    assert type(loaded.objective).__name__ == "ELBO" and loaded.config["z_dims"] == [2] and loaded.x_shape == (D_X,)
    assert loaded.checkpoint.name == "best.pt" and loaded.splits is None
    # the weights are the checkpoint's
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    assert state["params"] and all(torch.equal(pyro.param(k).detach(), v) for k, v in state["params"].items())
    assert pyrovae.load_run(run, with_data=True).splits.test.shape == (30, D_X)
    with pytest.raises(ValueError, match="not a pyrovae run folder"):
        pyrovae.load_run(data_dir)


# ---------------------------------------------------------------------------------------------- 11. speed.py --quick

def test_a_quick_speed_run_never_writes_the_committed_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert speed.parse_args([]).out == speed.DEFAULT_OUT
    assert speed.parse_args(["--quick"]).out == speed.QUICK_OUT != speed.DEFAULT_OUT
    assert speed.parse_args(["--quick", "--out", "x.md"]).out == Path("x.md")
