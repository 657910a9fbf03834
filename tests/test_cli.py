"""The ``rims-rl`` command line, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rims_rl.cli import main

TINY = ["--total-timesteps", "256", "--n-envs", "2", "--no-progress", "--set", "ppo.n_steps=32",
        "--set", "ppo.batch_size=64", "--set", "ppo.n_epochs=1", "--set", "eval.episodes=2"]  # fmt: skip


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("rims-rl")
    env = dict(os.environ, WANDB_SILENT="true")
    # a guard against hangs, not a speed test: on a loaded CI machine (two training jobs beside the suite's two
    # workers) the Atari train-and-evaluate test took over 300 s
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=1200)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "rims"
    proc = run_cli("train", "--env", "CartPoleNoVel-v1", "--policy", "rims", "--run-dir", str(run_dir), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "evaluation: CartPoleNoVel-v1: mean return" in proc.stdout
    return run_dir


def test_train_writes_a_complete_run_directory(trained_run):
    for name in ("config.yaml", "run.json", "progress.csv", "model.zip", "eval.json"):
        assert (trained_run / name).is_file(), name
    meta = json.loads((trained_run / "run.json").read_text())
    assert meta["status"] == "finished" and meta["timesteps"] == 256 and meta["policy"] == "rims"
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["ppo"]["n_steps"] == 32 and config["rim"]["num_units"] == 6  # resolved: every key present
    rows = list(csv.DictReader((trained_run / "progress.csv").open()))
    assert rows and "rim/activation_rate/unit_0" in rows[-1]
    rim = config["rim"]
    rates = [float(rows[-1][f"rim/activation_rate/unit_{j}"]) for j in range(rim["num_units"])]
    assert sum(rates) == pytest.approx(rim["k_active"])  # exactly k_active units active at every step
    assert meta["wandb"]["mode"] == "offline"
    wandb_files = list(Path(meta["wandb"]["dir"]).glob("run-*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 0


def test_evaluate_prints_and_records_the_score(trained_run):
    proc = run_cli("evaluate", str(trained_run), "--episodes", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["episodes"] == 3 and result["deterministic"] is True and len(result["returns"]) == 3
    assert (trained_run / "evaluations.jsonl").read_text().count("\n") == 1
    proc = run_cli("evaluate", str(trained_run), "--episodes", "2", "--no-deterministic")
    assert proc.returncode == 0 and "mean return" in proc.stdout and "stochastic" in proc.stdout


def test_lstm_policy_trains_with_the_same_command(tmp_path):
    code = main(["train", "--env", "CartPoleNoVel-v1", "--policy", "lstm", "--run-dir", str(tmp_path / "lstm"),
                 "--wandb", "disabled", *TINY])  # fmt: skip
    assert code == 0
    assert yaml.safe_load((tmp_path / "lstm" / "config.yaml").read_text())["policy"] == "lstm"


def test_envs_lists_families_and_ids(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "classic:" in out and "CartPoleNoVel-v1" in out and "PendulumNoVel-v1" in out


def test_config_prints_the_resolved_configuration(capsys):
    assert main(["config", "--env", "CartPoleNoVel-v1", "--set", "rim.k_active=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rim"]["k_active"] == 5
    assert main(["config", "--keys"]) == 0
    assert "rim.k_active" in capsys.readouterr().out


BAD_INPUTS = [
    (["train", "--env", "CartPolNoVel-v1"], "unknown env id 'CartPolNoVel-v1'; did you mean CartPoleNoVel-v1"),
    (["train", "--env", "CartPoleNoVel-v1", "--policy", "gru"], "argument --policy: invalid choice: 'gru'"),
    (["train", "--env", "CartPoleNoVel-v1", "--set", "rim.k_actve=2"], "did you mean 'rim.k_active'?"),
    (
        ["train", "--env", "CartPoleNoVel-v1", "--set", "rim.k_active=7"],
        "rim.k_active=7 must be in [1, rim.num_units=6]",
    ),
    (["train", "--env", "CartPoleNoVel-v1", "--n-envs", "0"], "config key 'n_envs' = 0"),
    (["train", "--env", "tests.any_envs:TinyText-v0"], "the observation space is a Text space"),
    (["train", "--env", "TinyGraph-v0", "--gym-packages", "tests.any_envs"], "the observation space is a Graph space"),
    (["train", "--env", "no_such_module:Env-v0"], "cannot import module 'no_such_module'"),
    (["train", "--env", "Acrobot-v1", "--gym-packages", "no_such_pkg"], "cannot import gym package 'no_such_pkg'"),
    (["train", "--env", "CarRacing-v3"], "cannot make env CarRacing-v3: Box2D is not installed"),
    (["train", "--env", "CartPoleNoVel-v1", "--n-envs", "100000"], "n_envs=100000 is more env copies than"),
    (
        ["train", "--env", "CartPoleNoVel-v1", "--set", "rim.num_units=100000", "--set", "rim.k_active=4"],
        "more than the",
    ),
    (["evaluate", "/no/such/run"], "run directory /no/such/run does not exist"),
    (["train"], "the following arguments are required: --env"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_existing_run_directory_is_refused_unless_overwrite(trained_run, capsys):
    before = sorted(p.name for p in trained_run.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(trained_run), *TINY])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in trained_run.iterdir()) == before


def bad_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d: ["--config", bad_file(d, "typo.yaml", b"policy: lstm\ntotl_timesteps: 5\n")],
         "unknown config key 'totl_timesteps'"),
        (lambda d: ["--config", bad_file(d, "mixed.yaml", b"default: {seed: 1}\nseed: 2\n")],
         "unknown top-level key 'seed'"),
        (lambda d: ["--config", bad_file(d, "env.yaml", b"env: Pendulum-v1\n")], "the env is chosen with --env"),
        (lambda d: ["--config", bad_file(d, "latin1.yaml", b"policy: \xe9\n")], "is not UTF-8 text"),
        (lambda d: ["--set", "network.net_arch=[64,"], "is not a valid YAML value"),
        (lambda d: ["--set", "ppo.use_sde=true"], "the model cannot be built with this configuration"),
        (lambda d: ["--device", "tpu"], "config key 'device' = 'tpu'"),
        (lambda d: ["--device", "cuda:7"], "CUDA device"),
        (lambda d: ["--run-dir", bad_file(d, "a_file", b"")], "is a file, not a directory"),
    ],
    ids=["flat-typo", "mixed-sections", "env-in-file", "not-utf8", "bad-yaml-set", "sb3-rejects", "device",
         "no-cuda", "run-dir-file"],
)  # fmt: skip
def test_bad_train_input_writes_nothing(make_argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = make_argv(tmp_path)
    after_setup = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env", "CartPoleNoVel-v1", *argv, *TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == after_setup and "runs" not in before


def test_overwrite_with_an_unusable_device_keeps_the_old_run(trained_run, capsys):
    before = sorted(p.name for p in trained_run.iterdir())
    with pytest.raises(SystemExit):
        main(["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(trained_run), "--overwrite",
              "--device", "cuda:7", *TINY])  # fmt: skip
    assert "CUDA device" in capsys.readouterr().err
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_evaluate_rejects_damaged_models_and_bad_devices(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (broken / "model.zip").write_bytes(b"not a zip")
    for argv, message in (
        (["evaluate", str(broken)], "cannot load the model"),
        (["evaluate", str(trained_run), "--device", "bogus"], "--device 'bogus' is not valid"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    (broken / "model.zip").unlink()  # no final model: the newest whole checkpoint is evaluated
    final = broken / "checkpoints" / "ckpt_256_steps"
    assert final.is_dir()
    shutil.copytree(final, broken / "checkpoints" / "ckpt_512_steps")
    (broken / "checkpoints" / "ckpt_512_steps" / "state.pkl").write_bytes(b"damaged")
    assert main(["evaluate", str(broken), "--episodes", "1"]) == 0
    assert "ckpt_256_steps/model.zip" in capsys.readouterr().out


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(tmp_path), "--overwrite", *TINY])
    assert "is not a rims-rl run directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_console_script_reports_bad_input_without_traceback():
    proc = run_cli("train", "--env", "NoSuchEnv-v0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("rims-rl: error: unknown env id 'NoSuchEnv-v0'")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input around run directories: one line, exit code 2, and the run directory exactly as it was.
def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    import hashlib

    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_config(run: Path, section: str | None, key: str, value: Any) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    (config[section] if section else config)[key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def interrupted(run: Path) -> Path:
    edit_json(run / "run.json", status="interrupted")
    return run


RUN_BAD_INPUTS = {
    "resume-with-config-flags": (
        lambda run: ["train", "--resume", str(interrupted(run)), "--policy", "lstm", "--set", "seed=3"],
        "--resume continues a run with its saved config: drop --policy, --set",
    ),
    "resume-missing": (lambda run: ["train", "--resume", str(run / "nope")], "nope does not exist"),
    "resume-not-a-run": (lambda run: ["train", "--resume", str(run / "checkpoints")], "is not a rims-rl run directory"),
    "resume-finished": (lambda run: ["train", "--resume", str(run)], "is finished (256 steps): nothing to resume"),
    "resume-other-version": (
        lambda run: (
            edit_json(run / "run.json", rims_rl_version="0.1.0", status="interrupted"),
            ["train", "--resume", str(run)],
        )[1],
        "was written by rims-rl 0.1.0; this is",
    ),
    "resume-invalid-config": (
        lambda run: (edit_config(interrupted(run), "rim", "k_active", 9), ["train", "--resume", str(run)])[1],
        "is not a config this version can run",
    ),
    "resume-changed-config": (
        lambda run: (edit_config(interrupted(run), None, "seed", 3), ["train", "--resume", str(run)])[1],
        "differs from the config its checkpoints were made with (seed)",
    ),
    "resume-no-checkpoint": (
        lambda run: (shutil.rmtree(interrupted(run) / "checkpoints"), ["train", "--resume", str(run)])[1],
        "has no whole checkpoint to resume from",
    ),
    "existing-run-dir": (
        lambda run: ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), *TINY],
        "already exists and is not empty (use --resume",
    ),
    "unknown-key": (
        lambda run: ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), "--set", "rim.unit_sise=4"],
        "unknown config key 'rim.unit_sise' in --set (did you mean 'rim.unit_size'?)",
    ),
    "negative-size": (
        lambda run: ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), "--set", "rim.unit_size=-1"],
        "config key 'rim.unit_size' = -1 in --set: input should be greater than or equal to 1",
    ),
    "unknown-cell": (
        lambda run: ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), "--set", "rim.cell=rnn"],
        "config key 'rim.cell' = 'rnn' in --set: input should be 'lstm' or 'gru'",
    ),
    "k-active-above-units": (
        lambda run: ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), "--set", "rim.k_active=7"],
        "rim.k_active=7 must be in [1, rim.num_units=6]",
    ),
    "unknown-env": (
        lambda run: ["train", "--env", "DemonAtack-v5", "--run-dir", str(run)],
        "unknown env id 'DemonAtack-v5'; did you mean",
    ),
}


@pytest.mark.parametrize("case", list(RUN_BAD_INPUTS))
def test_bad_run_input_is_refused_and_the_run_directory_untouched(case, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # with the .lock its training left
    make_argv, message = RUN_BAD_INPUTS[case]
    argv = make_argv(run)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_run_in_use_is_neither_resumed_nor_overwritten(trained_run, tmp_path, capsys):
    from rims_rl.agents.checkpoints import RunLock

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".lock"))
    interrupted(run)
    with RunLock(run):
        before = snapshot(tmp_path)
        for argv in (["train", "--resume", str(run)],
                     ["train", "--env", "CartPoleNoVel-v1", "--run-dir", str(run), "--overwrite", *TINY]):  # fmt: skip
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and f"run directory {run} is in use by pid {os.getpid()}" in err
        assert snapshot(tmp_path) == before


def test_a_diverging_run_stops_with_one_line_and_writes_no_bad_checkpoint(tmp_path, capsys):
    # an absurd learning rate: the first update leaves finite weights whose outputs overflow to NaN
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env", "CartPoleNoVel-v1", "--policy", "lstm", "--run-dir", str(run), "--wandb", "disabled",
              *TINY, "--set", "ppo.learning_rate=1e30", "--set", "ppo.max_grad_norm=1e30",
              "--set", "checkpoint.every_steps=64"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "training diverged at step 64: the policy's output on the current observations is not finite" in err
    assert not (run / "checkpoints").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_evaluate_with_dropped_units_reports_both_scores(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["evaluate", str(run), "--episodes", "2", "--drop-unit", "2", "--drop-unit", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dropped_units"] == [0, 2] and record["with_dropped_units"]["episodes"] == 2
    assert main(["evaluate", str(run), "--episodes", "1", "--drop-unit", "1"]) == 0
    assert "without unit 1: CartPoleNoVel-v1: mean return" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(run), "--drop-unit", "6"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--drop-unit takes unit indices in [0, 5], got [6]" in err


def test_an_ablation_preset_trains_the_ablated_rim(tmp_path):
    from rims_rl.agents.ppo import RecurrentPPO

    run = tmp_path / "run"
    assert main(["train", "--env", "CartPoleNoVel-v1", "--ablation", "no_communication", "--ablation", "all_active",
                 "--run-dir", str(run), "--wandb", "disabled", *TINY]) == 0  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["ablations"] == ["all_active", "no_communication"] and config["rim"]["communication"] is False
    rim = RecurrentPPO.load(run / "model.zip").policy.lstm_actor
    assert rim.communication is False and rim.k_active == rim.num_units == 6
