"""The command line refuses bad or meaningless options before any work, with a message that names the flag (not
the Python argument behind it) and exit code 2: numbers out of range, absurd sample counts, options that nothing in
the run would read, models that cannot take the data set, and a run folder locked by another process."""
import subprocess
import sys
import time

import pytest

import pyrovae.train.runs as runs
from pyrovae.cli import MAX_NUM_SAMPLES, main


def _refused_by_argparse(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, why", [
    (["--optimizer", "natural", "--damping", "0"], "--damping", "0 must be a finite number > 0"),  # was a LinAlgError traceback
    (["--optimizer", "natural", "--damping", "-1"], "--damping", "-1 must be a finite number > 0"),
    (["--optimizer", "natural", "--kl-clip", "nan"], "--kl-clip", "nan must be a finite number > 0"),
    (["--lr", "inf"], "--lr", "inf must be a finite number > 0"),
    (["--valid-size", "-5"], "--valid-size", "-5 must be an integer >= 0 (0: no validation set)"),
    (["--epochs", "-3"], "--epochs", "-3 must be a positive integer"),
    (["--eval-samples", str(10**20)], "--eval-samples", f"{10**20} is more than the limit of {MAX_NUM_SAMPLES:,}"),
])
def test_numbers_out_of_range_are_refused_naming_the_flag(capsys, tmp_path, argv, flag, why):
    err = _refused_by_argparse(capsys, ["train", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), *argv])
    assert f"argument {flag}: {why}" in err, err
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_an_absurd_number_of_importance_samples(capsys, tmp_path):
    err = _refused_by_argparse(capsys, ["evaluate", str(tmp_path), "-k", str(10**20)])
    assert f"argument --num-samples/-k: {10**20} is more than the limit of {MAX_NUM_SAMPLES:,}" in err and "5000" in err, err
    assert _refused_by_argparse(capsys, ["evaluate", str(tmp_path), "-k", "1e20"]).count("'1e20' is not an integer") == 1


def _train_error(capsys, tmp_path, *argv) -> str:
    assert main(["train", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, unread", [
    (["--model", "convdraw", "--attention"], "--attention (read by --model draw)"),  # recorded in config.json, never used
    (["--model", "convdraw", "--read-size", "3"], "--read-size (read by --model draw)"),
    (["--model", "convdraw", "--attention-init", "unit"], "--attention-init (read by --model draw)"),
    (["--objective", "iwae", "--beta", "2"], "--beta (read by --objective beta, --objective annealed)"),
    (["--damping", "0.1"], "--damping (read by --optimizer natural)"),
    (["--max-length", "20"], "--max-length (read by text data sets: --dataset ptb)"),  # was a raw TypeError from load_dataset
])
def test_options_that_nothing_in_the_run_reads_are_refused(capsys, tmp_path, argv, unread):
    err = _train_error(capsys, tmp_path, *argv)
    assert "would not read" in err and unread in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, model", [("mnist-sum", "vae"), ("mnist-sum-hard", "draw"), ("mnist-rotate", "discrete")])
def test_an_unconditional_model_on_a_conditional_data_set_is_refused_naming_the_models_that_fit(capsys, tmp_path, dataset, model):
    # was a TypeError (vae) or an AttributeError (draw) traceback once the data was loaded; now before any data is read
    err = _train_error(capsys, tmp_path, "--dataset", dataset, "--model", model)
    assert f"--dataset {dataset!r} pairs each target image with a context" in err and f"--model {model!r} models images alone" in err, err
    assert "choose a conditional model, convdraw or cvae" in err


def test_text_length_messages_name_the_flag(capsys, tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_text("the cat sat on the mat\na dog ran far away\n" * 5)
    err = _train_error(capsys, tmp_path, "--dataset", "ptb", "--model", "sentence", "--max-length", "1", "--overlong", "drop")
    assert "no sentences within --max-length 1; pass a larger --max-length" in err and "max_length" not in err, err


def test_the_lock_message_names_the_flag_without_a_stray_python_argument(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pyrovae.train.runs import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunFolderError) as e:
            runs.RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.communicate()
    message = str(e.value)
    assert f"in use by process {holder.pid}" in message and "(run_dir=)" not in message, message
    assert message.endswith("pass another run folder (--run-dir; the run_dir argument in Python)"), message
    (tmp_path / "a-file").write_text("")
    with pytest.raises(runs.RunFolderError) as e:
        runs.make_run_dir(tmp_path / "a-file")
    assert "(run_dir=)" not in str(e.value)


@pytest.mark.parametrize("key, value, shown", [
    ("seed", "0", "seed is '0', not an integer (as --seed gives)"),  # was a raw TypeError in evaluate
    ("z_dims", "2", "z_dims is '2', not a list of integers (as --z-dims gives)"),  # was silently read as ['2']
    ("z_dims", ["2"], "z_dims is ['2'], not a list of integers"),
    ("hidden", [["16"]], "hidden is [['16']], not a list of integers"),
    ("lr", "0.1", "lr is '0.1', not a number (as --lr gives)"),
    ("analytic_kl", 1, "analytic_kl is 1, not true or false"),
    ("seed", 0.5, "seed is 0.5, not an integer"),
])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, key, value, shown):
    import json

    from pyrovae.cli import UsageError, read_config

    cfg = {"model": "vae", "seed": 0, "z_dims": [2], "hidden": [[16]], "lr": 0.001, "analytic_kl": False, "draw_steps": None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert read_config(path) == cfg
    path.write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(UsageError) as e:
        read_config(path)
    assert shown in str(e.value) and str(path) in str(e.value), str(e.value)


def test_integral_floats_in_a_config_are_read_as_integers(tmp_path):
    import json

    from pyrovae.cli import read_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"seed": 0.0, "z_dims": [2.0], "hidden": [[16.0]]}))  # was: manual_seed expected a long
    cfg = read_config(path)
    assert cfg == {"seed": 0, "z_dims": [2], "hidden": [[16]]} and all(type(v) is int for v in (cfg["seed"], cfg["z_dims"][0], cfg["hidden"][0][0]))
