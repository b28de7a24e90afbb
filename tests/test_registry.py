"""The CLI's registries: one list of objectives (``pyrovae.objectives.OBJECTIVES``), which the CLI reads."""
import pyrovae.cli.registry as registry
from pyrovae.objectives import OBJECTIVES, make_objective


def test_every_cli_objective_builds_with_make_objective():
    # the CLI used to list 9 objectives and make_objective 7: make_objective("annealed") raised
    assert list(registry.OBJECTIVES) == list(OBJECTIVES) and {"annealed", "token-geco"} <= set(OBJECTIVES)
    for name, entry in registry.OBJECTIVES.items():
        obj = make_objective(name)
        assert type(obj) is entry.build is OBJECTIVES[name]
        assert type(registry.build_objective({"objective": name})) is type(obj)


# ---------------------------------------------------------------------------------------------- one registry, defaults written once
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyrovae.cli import main, parser
from pyrovae.utils.registry import GUIDES, MODEL_GUIDES, MODELS, Option, Registered, load_plugin
from pyrovae.utils.registry import OBJECTIVES as REGISTRY
from tiny_data import tiny_dataset

# the README's "Add your own objective" file, under names of its own (the doc-code test registers the README's)
_README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PLUGIN = _README[_README.index("# my_objective.py"):].split("```")[0]
PLUGIN = PLUGIN.replace('"kl-weighted"', '"kl-weighted-test"').replace('"kl_weight"', '"kl_weight_test"')
TINY, D_X = "tiny-registry", 12


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_objective.py"
    path.write_text(PLUGIN)
    yield path
    REGISTRY.pop("kl-weighted-test", None)  # the other test modules see the registry as it was


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with tiny_dataset(tmp_path_factory.mktemp("data"), TINY, train=40, test=20, dim=D_X) as root:
        yield root


def _train_actions() -> dict:
    sub = next(a for a in parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_parser_defaults_are_the_constructors_signature_defaults():
    # every registered entry, every option: the parser's default is the signature's, or None when entries differ
    # and --help then states each entry's (so a default cannot drift from its constructor)
    actions = _train_actions()
    for registry in (MODELS, GUIDES, MODEL_GUIDES, REGISTRY):
        for name, entry in registry.items():
            if not isinstance(entry, Registered):
                continue
            signature = {p.name: p.default for p in entry.parameters()}
            for arg in entry.options():
                if not isinstance(arg, Option):
                    continue  # declared by hand (a switch whose constructor default is on)
                action = actions[arg.key]
                expected = signature[arg.param]
                if arg.action == "store_true":
                    assert expected in (False, None) and action.default is False, (name, arg.flag)
                elif action.default is None and expected is not None:
                    assert f"{expected} for " in action.help and name in action.help, (name, arg.flag, action.help)
                else:
                    assert action.default == expected, (name, arg.flag, action.default, expected)


def test_help_states_the_per_entry_defaults(capsys):
    text = _help(capsys)
    assert "(default 64 for draw; 8 for convdraw)" in text
    assert "(default 0.1 for geco; 4.5 for token-geco)" in text
    assert "5 for iwae, renyi" in text and "8 for variance, logvariance" in text


def test_renamed_flags_feed_their_constructor_arguments():
    from pyrovae.cli import _config
    from pyrovae.cli.registry import build_model, build_objective

    args = parser().parse_args(["train", "--objective", "geco", "--geco-alpha", "0.5", "--geco-nu", "2", "--geco-multiplier-step", "clamped", "-k", "3"])
    geco = build_objective(_config(args))
    assert (geco.alpha, geco.nu, geco.multiplier_step, geco.num_particles) == (0.5, 2.0, "clamped", 3)
    beta = build_objective(_config(parser().parse_args(["train", "--objective", "beta", "--beta-schedule", "linear"])))
    assert beta.schedule == "linear"
    draw = build_model(_config(parser().parse_args(["train", "--model", "draw", "--draw-steps", "3", "--draw-z", "5", "--lstm-size", "7"])), (1, 28, 28))
    assert (draw.steps, draw.z_dim, draw.hidden) == (3, 5, 7)
    lm = build_model(_config(parser().parse_args(["train", "--model", "lm", "--rnn-layers", "2", "--embed-dim", "6", "--hidden", "9"])), (20,))
    assert (lm.decoder.num_layers, lm.decoder.hidden_dim, lm.decoder.embed.embedding_dim) == (2, 9, 6)


def test_a_plugin_objective_shows_in_help_with_its_signature_default(plugin_file, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--plugin", str(plugin_file), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "kl-weighted-test" in text
    assert "--kl-weight-test KL_WEIGHT_TEST weight of the KL term (1: the ELBO) (default: 0.5)" in text


def test_a_plugin_objective_trains_and_its_run_evaluates(plugin_file, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train", "--plugin", str(plugin_file), "--objective", "kl-weighted-test", "--kl-weight-test", "0.25", "--dataset", TINY,
        "--data-dir", str(data_dir), "--valid-size", "10", "--z-dims", "2", "--hidden", "8", "--batch-size", "10", "--epochs", "1",
        "--device", "cpu", "--eval-samples", "2", "--no-progress", "--run-dir", str(run),
    ]
    assert main(argv) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["objective"] == "kl-weighted-test" and cfg["kl_weight_test"] == 0.25 and cfg["plugins"] == [str(plugin_file.resolve())]
    # a new process knows nothing of the plugin until evaluate imports what the run recorded
    code = f"import sys; from pyrovae.cli import load_run; r = load_run({str(run)!r}); print(type(r.objective).__name__, r.objective.weight)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["KLWeightedELBO", "0.25"]
    # what it logs: the weighted loss, and the true ELBO beside it (recon - KL)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    recon = record["train_elbo"] + record["train_kl"]
    assert record["train_loss"] == pytest.approx(-(recon - 0.25 * record["train_kl"]), rel=1e-4)


def test_runs_without_plugins_keep_their_config_keys():
    from pyrovae.cli import _config

    assert "plugins" not in _config(parser().parse_args(["train"]))


@pytest.mark.parametrize("spec, says", [
    ("no/such/objective.py", "there is no file"),
    ("no_such_module_for_pyrovae", "no module 'no_such_module_for_pyrovae'"),
])
def test_a_bad_plugin_is_refused_with_the_fix(spec, says, capsys):
    assert main(["train", "--plugin", spec, "--objective", "elbo"]) == 2
    err = capsys.readouterr().err
    assert says in err and "--plugin ./my_objective.py" in err and "register_objective" in err


def test_a_plugin_that_registers_nothing_or_fails_is_named(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="registered no objective, model or guide"):
        load_plugin(str(empty))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing .*broken.py raised RuntimeError: boom; fix the file"):
        load_plugin(str(broken))


def test_registering_a_taken_name_or_an_underivable_parameter_is_refused():
    from pyrovae.objectives import ELBO
    from pyrovae.utils.registry import register_objective

    with pytest.raises(ValueError, match="'elbo' is registered already"):
        register_objective("elbo")(type("Other", (ELBO,), {}))
    with pytest.raises(ValueError, match="does not take"):
        register_objective("typo-test", flags={"num_particle": "k"})(type("Typo", (ELBO,), {}))

    class NoDefault(ELBO):
        def __init__(self, size: int, **kwargs):
            super().__init__(**kwargs)

    register_objective("no-default-test")(NoDefault)
    try:
        with pytest.raises(ValueError, match="'size' .* has no default.*exclude"):
            REGISTRY["no-default-test"].options()
    finally:
        del REGISTRY["no-default-test"]
    assert inspect.isclass(REGISTRY.classes()["elbo"])
