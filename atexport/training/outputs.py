"""The run folder of ``atexport train``: what it holds, refusing to overwrite a run by accident, the
resolved config written beside the checkpoints, the seeds' summary, and cleaning up after a run that
failed before it wrote any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from atexport.errors import BadInputError
from atexport.training.config import TrainConfig
from atexport.utils.io import atomic_write_text

RUN, LAST, METRICS, CONFIG, SUMMARY = "run.pt", "last.pt", "metrics.jsonl", "config.yaml", "summary.json"


def remove_unused_output(out: Path) -> None:
    """Remove an output folder this run created when the run failed before writing any checkpoint.

    It then holds at most config.yaml / metrics.jsonl (and empty seed folders): nothing to resume from, and
    an empty folder would only make the next run ask for --overwrite.
    """
    import shutil

    if out.is_dir() and not any(p.name in (RUN, LAST) for p in out.rglob("*.pt")):
        shutil.rmtree(out, ignore_errors=True)


def seed_summary(runs: list, np) -> dict:
    def stats(key):
        vals = [float(r.metrics[key]) for r in runs if r.metrics.get(key) is not None]
        if not vals:
            return None
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        return {"mean": float(np.mean(vals)), "std": std, "values": vals}

    return {
        "seeds": [r.config["seed"] for r in runs],
        "test_top1": stats("test_top1"),
        "val_top1": stats("val_top1"),
        "std_ddof": 1,
        "runs": {str(r.config["seed"]): str(r.checkpoint) for r in runs},
    }


def prepare_output(out: Path, cfg: TrainConfig, env) -> None:
    if not env.is_main:
        return
    has_run = (out / LAST).exists() or (out / RUN).exists()
    if cfg.resume:
        if not (out / LAST).exists():
            raise BadInputError(f"--resume: {out / LAST} does not exist; nothing to resume (start without --resume).")
    elif has_run and not cfg.overwrite:
        raise BadInputError(
            f"-o {out} already holds a run; pass --resume to continue it, --overwrite to start over, "
            "or choose another -o."
        )
    elif has_run:
        for name in (RUN, LAST, METRICS):
            (out / name).unlink(missing_ok=True)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"-o {out}: cannot create the folder ({e.strerror}).") from None


def write_config(path: Path, cfg: TrainConfig) -> None:
    import yaml

    header = "# Resolved atexport training config; rerun with: atexport train --recipe " + str(path) + "\n"
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(record=True), sort_keys=False))

