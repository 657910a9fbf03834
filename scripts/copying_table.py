"""The copying task's tables (paper Table 1 and Table 5), resumably: RIM vs LSTM, and RIM ablations.

    python scripts/copying_table.py [--rows table1] [--seeds 0 1 2] [--updates 5000] [--jobs 2] [--out runs/copying]

Rows (each trained with ``rims-rl copying``'s defaults: span 50, test span 200, batch 64, Adam 1e-3):

- ``table1``: RIM (k_T 6 x 100, k_A 4) and LSTM (600): Table 1's copying rows;
- ``table5``: Table 5's RIMs without communication over its (k_T, k_A) grid (600 units split over k_T);
- ``all-active``: the RIM with k_A = k_T = 6 (the "all active" ablation).

A run already trained to ``--updates`` is read, not retrained; a stopped one, or one trained to fewer updates,
continues from its checkpoint (``rims-rl copying --resume RUN --updates N``), so the script can be stopped and started
again, and a budget raised later. ``--jobs N`` trains N runs at once, one torch thread each (the default: the
machine's cores); ``--match TEXT ...`` keeps the rows whose label contains one of the texts (e.g. ``--rows table5
--match "k_T=6 k_A=4,"``). Prints, and writes to ``OUT/table_<rows>.md``: cross-entropy over all steps and copy
accuracy at the training and the test span, mean +- std over seeds, beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from _jobs import run_jobs  # scripts/_jobs.py

# (label, overrides, paper's CE at span 50 and 200): Table 1 and Table 5
TABLE1 = [
    ("RIM k_T=6 k_A=4", {"model": "rims"}, "0.00", "0.00"),
    ("LSTM 600", {"model": "lstm"}, "0.00", "3.56"),
]
TABLE5_GRID = [  # (k_T, k_A, paper's CE at span 50, at span 200)
    (4, 2, "0.23", "0.16"), (4, 3, "0.17", "0.43"), (5, 2, "0.25", "0.47"), (5, 3, "0.04", "0.40"),
    (5, 4, "0.02", "0.07"), (6, 2, "0.33", "0.24"), (6, 3, "0.12", "0.10"), (6, 4, "0.07", "0.50"),
    (6, 5, "0.22", "0.56"),
]  # fmt: skip
TABLE5 = [
    (
        f"RIM k_T={k} k_A={a}, no communication",
        {
            "model": "rims",
            "rim.num_units": k,
            "rim.unit_size": 600 // k,
            "rim.k_active": a,
            "ablations": ["no_communication"],
        },
        ce50,
        ce200,
    )
    for k, a, ce50, ce200 in TABLE5_GRID
]
ALL_ACTIVE = [("RIM k_T=6 k_A=6 (all active)", {"model": "rims", "ablations": ["all_active"]}, "", "")]
ROWS = {"table1": TABLE1, "table5": TABLE5, "all-active": ALL_ACTIVE}


def run_dir_name(overrides: dict, seed: int) -> str:
    if overrides["model"] != "rims":
        return f"{overrides['model']}-s{seed}"
    shape = f"K{overrides.get('rim.num_units', 6)}k{overrides.get('rim.k_active', 4)}"
    return "-".join(["rims", shape, *overrides.get("ablations", []), f"s{seed}"])


def run_one(run_dir: str, overrides: dict, seed: int, updates: int) -> dict | None:
    """Train (or continue) one run to ``updates``; returns its final evaluation row (None if a signal stopped it)."""
    import torch

    torch.set_num_threads(1)
    from rims_rl.agents.copying import CopyingInterrupted, train_copying
    from rims_rl.config import CopyingConfig, resolve_copying_config

    path = Path(run_dir)
    meta = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    resume = (path / "checkpoint.pt").is_file()
    if resume:
        import yaml

        cfg = CopyingConfig.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
        if meta.get("status") == "finished" and meta.get("updates") == updates:
            return meta["final"]
        cfg.updates = updates
    else:
        cfg = resolve_copying_config(flags={**overrides, "seed": seed, "updates": updates, "wandb.mode": "disabled"})
    try:
        return train_copying(cfg, path, resume=resume)["final"]
    except CopyingInterrupted:
        return None  # checkpointed: the next call continues it


def _cell(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["table1"], choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--updates", type=int, default=5000, help="updates per run (default 5000)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs trained at once")
    parser.add_argument("--out", type=Path, default=Path("runs/copying"))
    parser.add_argument("--match", nargs="+", metavar="TEXT", help="only the rows whose label contains one of these")
    args = parser.parse_args()
    rows = [row for name in args.rows for row in ROWS[name] if not args.match or any(m in row[0] for m in args.match)]
    if not rows:
        labels = "; ".join(row[0] for name in args.rows for row in ROWS[name])
        parser.error(f"--match {' '.join(args.match)} selects no row of {' '.join(args.rows)} (rows: {labels})")
    runs = {
        (label, seed): (str(args.out / run_dir_name(o, seed)), o, seed, args.updates)
        for label, o, _, _ in rows
        for seed in args.seeds
    }
    finals = run_jobs(run_one, runs, args.jobs)
    lines = [
        "| model | CE span 50 | CE span 200 | copy accuracy span 50 | copy accuracy span 200 | paper CE 50 / 200 |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, ce50, ce200 in rows:
        runs = [finals[label, s] for s in args.seeds]
        cells = [_cell(runs, k) for k in ("train/ce", "test/ce", "train/copy_accuracy", "test/copy_accuracy")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ce50} / {ce200} |")
    seeds = " ".join(map(str, args.seeds))
    text = "\n".join(lines) + f"\n\nmean +- std over seeds {seeds}; {args.updates} updates of 64 sequences per run\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"table_{'_'.join(args.rows)}.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
