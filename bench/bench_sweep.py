"""Rank sweep on the digits transfer task: where does accuracy stop growing with the adapter rank?

The backbone (a 4-block, 128-wide ViT) is pretrained on every weight on digits 0-4
(``bench/transfer_task.py``); adapters + head are then trained on digits 5-9 at ranks 1..64 with 3
seeds each, through ``atexport.analysis.run_sweep`` (resumable: rerun the same command to finish an
interrupted sweep). Writes ``sweep.json``/``.md``/``.png`` in the output folder and
``bench_sweep.json`` with the machine, the command and the wall time.

    python bench/bench_sweep.py -o runs/bench_sweep            # about 15-25 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer_task import build_transfer_backbone  # noqa: E402

TASK = dict(regime="adapter", epochs=3, warmup_epochs=0, batch_size=64, lr=1e-2, weight_decay=0.05,
            scale=[0.85, 1.0], ratio=[0.9, 1.1], hflip=0.0, workers=0, val_fraction=0.1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="runs/bench_sweep")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=TASK["epochs"])
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--tolerance", type=float, default=0.5)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    from atexport.analysis import run_sweep
    from atexport.analysis.sweep import sweep_markdown
    from atexport.utils.machine import describe_machine, machine_line
    from atexport.training import TrainConfig
    from atexport.utils.io import atomic_write_json

    out = Path(a.output)
    t0 = time.perf_counter()
    task = build_transfer_backbone(out / "transfer", seed=0)
    t_pre = time.perf_counter() - t0
    base = TrainConfig.from_dict({**TASK, **task["train_args"], "dataset": task["task_dataset"],
                                  "epochs": a.epochs, "limit_train": a.limit_train, "progress": not a.no_progress})
    res = run_sweep(base, ranks=a.ranks, seeds=a.seeds, output=out / "sweep", tolerance=a.tolerance)
    wall = time.perf_counter() - t0
    machine = describe_machine()
    record = {"command": "python bench/bench_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "wall_s": round(wall, 1), "pretrain_s": round(t_pre, 1),
              "pretrain_top1_digits_0_4": task["pretrain_top1"], "trained_cells": len(res.trained),
              "skipped_cells": len(res.skipped), "summary": res.summary}
    atomic_write_json(out / "bench_sweep.json", record)
    print(f"Machine: {machine_line(machine)}. Date: {machine['date']}.")
    print(f"Wall time {wall / 60:.1f} min (pretraining {t_pre / 60:.1f} min; {len(res.trained)} cells trained, "
          f"{len(res.skipped)} found finished). Pretrained backbone: {task['pretrain_top1']:.2f}% on digits 0-4.")
    print(sweep_markdown(res.summary))
    for n in res.notes:
        print(n)
    print(json.dumps({k: str(v) for k, v in res.files.items()}))


if __name__ == "__main__":
    main()
