"""``rims-rl compare``: curves over seeds and a score table from local run directories."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from rims_rl.agents.reports import area_under_curve, bootstrap_band
from rims_rl.agents.training import train
from rims_rl.cli import main
from rims_rl.config import CONFIG_DIR, resolve_config


def test_area_under_curve_is_the_curves_average_over_the_window():
    steps = np.array([0.0, 50.0, 100.0])
    assert area_under_curve(steps, np.array([3.0, 3.0, 3.0])) == pytest.approx(3.0)
    assert area_under_curve(steps, np.array([0.0, 5.0, 10.0])) == pytest.approx(5.0)
    assert area_under_curve(steps, np.array([0.0, 5.0, 10.0]), start=50) == pytest.approx(7.5)
    assert area_under_curve(steps, np.array([0.0, 5.0, 10.0]), start=25, end=75) == pytest.approx(5.0)
    assert area_under_curve(steps, np.array([0.0, 5.0, 10.0]), end=1000) == pytest.approx(5.0)  # not extrapolated
    curve = np.array([1.0, 4.0, 2.0])
    assert area_under_curve(steps, curve + 1) > area_under_curve(steps, curve)
    assert area_under_curve(np.array([10.0]), np.array([7.0])) == 7.0


def test_bootstrap_band_brackets_the_mean_and_vanishes_without_spread():
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(5, 30))
    low, high = bootstrap_band(samples)
    mean = samples.mean(axis=0)
    assert np.all(low <= mean) and np.all(mean <= high) and np.all(high - low > 0)
    same = np.tile(np.arange(4.0), (3, 1))
    low, high = bootstrap_band(same)
    assert np.array_equal(low, same[0]) and np.array_equal(high, same[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for policy in ("rims", "lstm"):
        for seed in (0, 1):
            cfg = resolve_config(
                "CartPoleNoVel-v1", CONFIG_DIR / "classic.yaml",
                overrides=[f"policy={policy}", f"seed={seed}", "total_timesteps=2048", "n_envs=4", "ppo.n_steps=32",
                           "ppo.batch_size=128", "ppo.n_epochs=2", "eval.freq=512", "eval.episodes=2",
                           "eval.stop_at=null", "wandb.mode=disabled"],
            )  # fmt: skip
            train(cfg, root / cfg.env / f"{policy}-s{seed}")
    return root


def test_compare_writes_curves_and_a_table_for_two_policies_and_two_seeds(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| env | policy | seeds |" in printed and "4 runs in 2 groups" in printed
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["env"], r["policy"], r["seeds"]) for r in rows] == [
        ("CartPoleNoVel-v1", "lstm", "0 1"),
        ("CartPoleNoVel-v1", "rims", "0 1"),
    ]
    assert all(r["steps"] == "2048" and "±" in r["auc"] and "±" in r["final_eval"] for r in rows)
    png = out / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    assert main(["compare", str(runs / "CartPoleNoVel-v1" / "rims-s0"), str(runs / "CartPoleNoVel-v1" / "lstm-s1"),
                 "--metric", "eval/mean_reward", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    with open(tmp_path / "eval" / "summary.csv", newline="") as f:
        assert [r["seeds"] for r in csv.DictReader(f)] == ["1", "0"]


@pytest.mark.parametrize(
    "argv, message",
    [(["compare", "/no/such/dir"], "/no/such/dir does not exist"),
     (["compare", "{tmp}"], "no run directories (config.yaml + progress.csv) in"),
     (["compare", "{runs}", "--metric", "train/nope"], "none of the 4 runs logged 'train/nope'")],
    ids=["missing", "empty", "metric"],
)  # fmt: skip
def test_compare_bad_input(argv, message, runs, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, runs=runs) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
