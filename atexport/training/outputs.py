"""The run folder of ``atexport train``: what it holds, refusing to overwrite a run by accident, the
resolved config written beside the checkpoints, the seeds' summary, and cleaning up after a run that
failed before it wrote any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        output: the output folder.
        checkpoint: ``run.pt`` (best epoch by validation), the input of the export stages.
        last: ``last.pt`` (last epoch, with resume state).
        metrics: final metrics of ``run.pt`` (epoch, val_*, test_*, params).
        history: per-epoch metrics.
        config: the resolved config.
        runs: with ``seeds``, one result per seed.
        summary: with ``seeds``, mean and std of the test top-1 (also in ``summary.json``).
        model: the trained model in memory, with the weights of ``run.pt`` (eval mode); single runs.
    """

    output: Path
    checkpoint: Path | None
    last: Path | None
    metrics: dict
    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    summary: dict | None = None
    model: Any = field(default=None, repr=False, compare=False)

    def summary_line(self) -> str:
        if self.summary:
            t = self.summary["test_top1"]
            return (f"test top-1 over seeds {self.summary['seeds']}: {t['mean']:.2f} +- {t['std']:.2f}% "
                    f"(values {', '.join(f'{v:.2f}' for v in t['values'])})")
        m = self.metrics
        p = m.get("params", {})
        parts = [f"best epoch {m.get('epoch')}"]
        if m.get("val_top1") is not None:
            parts.append(f"val top-1 {m['val_top1']:.2f}%")
        if m.get("test_top1") is not None:
            parts.append(f"test top-1 {m['test_top1']:.2f}%")
        if p:
            parts.append(f"{p['trainable']:,} trainable params ({100 * p['share']:.2f}% of full fine-tuning)")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# Public entry point
