"""The training loop: AdapterTune adapters (or the head, or everything) on a timm ViT.

:func:`train` takes a :class:`~atexport.training.config.TrainConfig` (or a dict of its keys) and
writes, in the output folder::

    run.pt         the best epoch by validation top-1 (the checkpoint later stages use)
    last.pt        the last finished epoch, with the state to resume (optimizer, step, RNG, history)
    metrics.jsonl  one line per epoch, then the test score of run.pt
    config.yaml    the resolved config (itself a recipe)

With ``seeds``, each seed goes to ``seed_{k}/`` and ``summary.json`` holds the mean and std of the
test top-1. Resuming is exact: the data order and augmentation of each epoch are seeded from
``(seed, epoch, rank)``, so a run continued from ``last.pt`` matches an uninterrupted one (for the
same number of data-loading workers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from atexport.errors import AtexportError, BadInputError, IncompatibleCheckpointError
from atexport.training.config import TrainConfig
from atexport.training.outputs import (CONFIG, LAST, METRICS, RUN, SUMMARY, TrainResult, prepare_output,
                                       remove_unused_output, seed_summary, write_config)
from atexport.training.params import apply_regime, describe_params, param_report, reinit_head
from atexport.training.schedule import epoch_seed, lr_at, rng_state, seed_everything, set_rng_state
from atexport.utils.io import atomic_write_json, atomic_write_text

_logger = logging.getLogger("atexport.training")


def train(
    config: TrainConfig | dict,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train and evaluate one run (or one per seed), writing checkpoints atomically.

    Args:
        config: a :class:`TrainConfig`, or a dict of its keys (unknown keys are refused).
        log: receives one line per event (default: the ``atexport.training`` logger).
        on_epoch_end: called with each epoch's metrics after its checkpoints are written.

    Returns:
        A :class:`TrainResult` with the checkpoint paths and metrics.

    Example:
        >>> from atexport.training import resolve_config, train
        >>> result = train(resolve_config("digits", {"output": "runs/digits"}))
        >>> result.metrics["test_top1"]
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    if not cfg.dataset:
        raise BadInputError("no data set: pass --dataset NAME (or a recipe that names one).")
    log = log or _logger.info
    from atexport.training.device import setup_env

    env = setup_env(cfg.device, cfg.amp)
    out = cfg.output_dir()
    created = not out.exists()
    try:
        if cfg.seeds:
            return _train_seeds(cfg, env, log, on_epoch_end)
        prepare_output(out, cfg, env)
        return _Run(cfg, out, env, log, on_epoch_end, resume=cfg.resume).fit()
    except BaseException:
        if created and env.is_main:
            remove_unused_output(out)
        raise
    finally:
        env.close()


def _train_seeds(cfg: TrainConfig, env, log, on_epoch_end) -> TrainResult:
    import numpy as np

    out = cfg.output_dir()
    seed_dirs = {s: out / f"seed_{s}" for s in cfg.seeds}
    if env.is_main:
        existing = [d for d in seed_dirs.values() if (d / LAST).exists() or (d / RUN).exists()]
        if existing and not (cfg.resume or cfg.overwrite):
            raise BadInputError(
                f"-o {out} already holds runs ({', '.join(d.name for d in existing)}); pass --resume to "
                "continue them, --overwrite to start over, or choose another -o."
            )
        if cfg.resume and not existing:
            raise BadInputError(f"--resume: {out} holds no seed_*/last.pt; nothing to resume.")
        out.mkdir(parents=True, exist_ok=True)
        write_config(out / CONFIG, cfg)
    runs = []
    for s, d in seed_dirs.items():
        sub = cfg.with_seed(s, d)
        resume = cfg.resume and (d / LAST).exists()
        if env.is_main:
            prepare_output(d, sub if resume else _fresh(sub), env)
        log(f"== seed {s} ({len(runs) + 1}/{len(seed_dirs)}) -> {d}")
        runs.append(_Run(sub, d, env, log, on_epoch_end, resume=resume).fit())
        summary = seed_summary(runs, np)
        if env.is_main:
            atomic_write_json(out / SUMMARY, summary)
    t = summary["test_top1"] or {}
    metrics = {"test_top1_mean": t.get("mean"), "test_top1_std": t.get("std")}
    return TrainResult(out, None, None, metrics, config=cfg.to_dict(record=True), runs=runs, summary=summary)


def _fresh(cfg: TrainConfig) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, resume=False)


# ------------------------------------------------------------------------------------------------
# Pieces of a run


def _worker_message(e: AtexportError) -> AtexportError:
    """An error raised in a DataLoader worker arrives wrapped in a traceback; keep its message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
        return type(e)(msg)
    return e


# ------------------------------------------------------------------------------------------------
# One run


class _Run:
    """State and steps of one training run (one seed) in one output folder."""

    def __init__(self, cfg: TrainConfig, out: Path, env, log, on_epoch_end, resume: bool):
        self.cfg, self.out, self.env, self.log = cfg, out, env, log
        self.on_epoch_end = on_epoch_end
        self.resume = resume
        self.epochs_run = 0
        self.t_start = time.perf_counter()
        self.test_metrics = None  # of a finished run found when resuming
        self.split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed

    # -- setup ------------------------------------------------------------------------------------
    def _load_data(self):
        from atexport.data import load_splits, seeded_subset

        cfg, env = self.cfg, self.env
        splits = ("train", "val", "test") if cfg.val_fraction > 0 else ("train", "test")
        kw = dict(data_dir=cfg.data_dir, seed=self.split_seed, val_fraction=cfg.val_fraction, **cfg.dataset_args)
        if cfg.download and env.distributed:  # one process downloads, the others wait and read
            if env.is_main:
                load_splits(cfg.dataset, splits, download=True, **kw)
            env.barrier()
            data = load_splits(cfg.dataset, splits, download=False, **kw)
        else:
            data = load_splits(cfg.dataset, splits, download=cfg.download, **kw)
        data["train"] = seeded_subset(data["train"], cfg.limit_train, self.split_seed)
        if "val" in data:
            data["val"] = seeded_subset(data["val"], cfg.limit_eval, self.split_seed + 1)
        data["test"] = seeded_subset(data["test"], cfg.limit_eval, 0)  # the same images for every seed
        return data

    def _build_model(self, class_names):
        import torch

        from atexport.adapters import inject_adapters
        from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config
        from atexport.utils.io import sha256_file

        cfg = self.cfg
        if cfg.backbone_weights:
            wpath = Path(cfg.backbone_weights).expanduser()
            if not wpath.is_file():
                raise BadInputError(f"--backbone-weights {wpath}: no such file.")
            source = {"kind": "file", "path": str(wpath.resolve()), "sha256": sha256_file(wpath)}
        elif cfg.pretrained:
            source = {"kind": "timm"}
        else:
            source = {"kind": "random", "seed": cfg.backbone_seed}
        spec = ModelSpec(cfg.backbone, len(class_names), cfg.resolved_model_args(), source, list(class_names))
        model = create_backbone(spec)
        if source["kind"] == "timm" and "." not in spec.backbone:
            tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
            if tag:  # pin the weights actually loaded, so a later timm default cannot swap them
                spec.backbone = f"{spec.backbone}.{tag}"
        fingerprint = backbone_fingerprint(model)
        preprocess = preprocess_config(model, cfg.preprocess)
        reinit_head(model, cfg.seed)
        adapter_cfg = cfg.adapter_config()
        if adapter_cfg is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                inject_adapters(model, adapter_cfg)
        return model, spec, fingerprint, preprocess, adapter_cfg

    def _loaders(self, data, preprocess):
        import torch
        from torch.utils.data import DataLoader, Subset
        from torch.utils.data.distributed import DistributedSampler

        from atexport.data import TransformDataset, eval_transform, train_transform

        cfg, env = self.cfg, self.env
        if cfg.batch_size % env.world_size:
            raise BadInputError(
                f"--batch-size {cfg.batch_size} is the global batch; it must divide by the {env.world_size} processes."
            )
        per_rank = cfg.batch_size // env.world_size
        ttf = train_transform(preprocess, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                              color_jitter=cfg.color_jitter)
        etf = eval_transform(preprocess)
        pin = env.device.type == "cuda"
        train_ds = TransformDataset(data["train"], ttf)
        # A DistributedSampler also for one process: its order depends only on (seed, epoch).
        self.sampler = DistributedSampler(train_ds, num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.train_loader = DataLoader(train_ds, batch_size=per_rank, sampler=self.sampler,
                                       num_workers=cfg.workers, pin_memory=pin, drop_last=False,
                                       generator=torch.Generator())
        self.eval_loaders = {}
        eval_bs = max(1, (cfg.eval_batch_size or cfg.batch_size) // env.world_size)
        for s in ("val", "test"):
            if s in data:
                ds = TransformDataset(data[s], etf)
                shard = Subset(ds, range(env.rank, len(ds), env.world_size))  # no padding: exact metrics
                self.eval_loaders[s] = DataLoader(shard, batch_size=eval_bs, shuffle=False,
                                                  num_workers=cfg.workers, pin_memory=pin)

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train: build the model, resume if asked, run the epochs (saving ``run.pt`` at each best validation
        epoch and ``last.pt`` after every epoch), then test the best epoch."""
        cfg, env, out = self.cfg, self.env, self.out
        data = self._load_data()
        self.n_test = len(data["test"])
        class_names = data["train"].class_names
        model, spec, fingerprint, preprocess, adapter_cfg = self._build_model(class_names)
        params = apply_regime(model, cfg.regime)
        self.params = param_report(model, cfg.regime, adapter_cfg)
        self.model, self.spec, self.fingerprint = model, spec, fingerprint
        self.preprocess, self.adapter_cfg = preprocess, adapter_cfg
        state = self._resume_state(model) if self.resume else None
        if env.is_main:
            self._log_start(data, class_names)
        self._prepare_training(params, data)
        history, start_epoch, step = self._restore(state)
        if env.is_main:
            write_config(out / CONFIG, cfg)

        self.t_start = time.perf_counter()  # the ETA of the epoch lines counts epochs of this invocation
        for epoch in range(start_epoch, cfg.epochs):
            step = self._run_epoch(epoch, step, history)
        return self._finish(history)

    def _resume_state(self, model) -> dict:
        """The resume state of ``last.pt``, its trained tensors loaded into ``model``; refused when the run was
        started with other settings or on another backbone."""
        from atexport.checkpoint import check_fingerprint, load_checkpoint

        out = self.out
        last = load_checkpoint(out / LAST, flag="--resume", layout="trained")
        check_fingerprint(last.fingerprint, model, f"--resume {out / LAST}")
        diffs = self.cfg.differences(last.config)
        if diffs:
            raise IncompatibleCheckpointError(
                f"--resume {out / LAST}: the run was started with other settings ({'; '.join(diffs)}). "
                "Resume with the original settings, or start a new run with another -o."
            )
        if not last.resume:
            raise IncompatibleCheckpointError(f"--resume {out / LAST}: the file holds no resume state.")
        model.load_state_dict(last.state_dict, strict=False)
        return last.resume

    def _log_start(self, data, class_names) -> None:
        cfg, env, spec, log = self.cfg, self.env, self.spec, self.log
        log(f"data: {cfg.dataset}  train {len(data['train'])}  "
            + (f"val {len(data['val'])}  " if "val" in data else "(no validation split)  ")
            + f"test {len(data['test'])}  classes {len(class_names)}")
        log(f"model: {spec.backbone} {spec.model_args or ''} ({spec.source['kind']} backbone), "
            f"input {self.preprocess['input_size']}, device {env.device}, amp {env.amp_name}"
            + (f", {env.world_size} processes" if env.distributed else ""))
        log(describe_params(self.params, cfg.regime))

    def _prepare_training(self, params, data) -> None:
        """Move the model to the device (wrapped for DDP), make the optimizer, scaler, loaders, schedule, loss."""
        import torch

        cfg, env, model = self.cfg, self.env, self.model
        model.to(env.device)
        train_model = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.train_model = train_model
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = env.grad_scaler()
        self._loaders(data, self.preprocess)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _restore(self, state: dict | None) -> tuple[list, int, int]:
        """``(history, first epoch, step)``: fresh, or restored from a resume state (optimizer, scaler, random
        generators, best epoch so far and its tensors)."""
        from atexport.checkpoint import load_checkpoint

        cfg, env, out = self.cfg, self.env, self.out
        self.best = {"val_top1": None, "epoch": None}
        self.best_state = None
        if state is None:
            return [], 0, 0
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise IncompatibleCheckpointError(
                f"--resume: {state['steps_per_epoch']} steps per epoch when started, {self.steps_per_epoch} now "
                "(data set or batch size changed)."
            )
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = [dict(h) for h in state.get("history", [])]
        self.best = dict(state.get("best") or self.best)
        set_rng_state(state["rng"])
        if not (out / RUN).exists():
            raise IncompatibleCheckpointError(
                f"--resume: {out / RUN} (the best epoch so far) is missing; start over with --overwrite."
            )
        best_ckpt = load_checkpoint(out / RUN, flag="--resume", layout="trained")
        self.best_state = best_ckpt.state_dict
        if best_ckpt.metrics.get("test_top1") is not None and start_epoch >= cfg.epochs:
            self.test_metrics = best_ckpt.metrics
        if env.is_main:
            self.log(f"resuming {out} after epoch {start_epoch}/{cfg.epochs} (step {step})")
        return history, start_epoch, step

    def _run_epoch(self, epoch: int, step: int, history: list) -> int:
        """Train one epoch, validate, save ``run.pt`` if it is the best so far and ``last.pt`` always; returns
        the step count."""
        cfg, env, out = self.cfg, self.env, self.out
        row, step = self._train_epoch(epoch, step)
        if "val" in self.eval_loaders:
            row.update({f"val_{k}": v for k, v in self.evaluate("val").items()})
        self._check_finite(row)  # a diverged epoch never becomes run.pt (best) nor last.pt
        improved = "val_top1" not in row or self.best["val_top1"] is None or row["val_top1"] > self.best["val_top1"]
        row["best"] = improved
        history.append(row)
        if improved:
            self.best = {"val_top1": row.get("val_top1"), "epoch": row["epoch"]}
            self.best_state = self._trainable_state()
            if env.is_main:
                self._save(out / RUN, self.best_state, self._run_metrics(row))
        if env.is_main:
            resume_state = {
                "epoch": epoch + 1, "step": step, "steps_per_epoch": self.steps_per_epoch,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "scheduler": {"name": "warmup_cosine", "step": step, "total_steps": self.total_steps,
                              "warmup_steps": self.warmup_steps, "base_lr": cfg.lr, "min_lr": cfg.min_lr},
                "rng": rng_state(), "best": dict(self.best), "history": history,
            }
            self._save(out / LAST, self._trainable_state(), dict(row, params=self.params), resume_state)
            self._write_metrics(history)
            self.log(self._epoch_line(row))
        if self.on_epoch_end is not None:
            self.on_epoch_end(dict(row))
        return step

    def _aux_loss(self):
        """The adapter family's extra loss of the last forward (Adapter-X ``balance``), or ``None``."""
        if self.adapter_cfg is None:
            return None
        from atexport.adapters import family_of

        return family_of(self.adapter_cfg).aux_loss(self.adapter_cfg, self.model)

    def _check_finite(self, row: dict) -> None:
        """Stop with a clear error when the epoch left NaN/infinite weights or losses (e.g. --lr too high)."""
        import math

        import torch

        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        losses = [k for k in ("train_loss", "val_loss") if k in row and not math.isfinite(float(row[k]))]
        if not (bad or losses):
            return
        what = (f"{len(bad)} trained tensors hold NaN or infinite values ({', '.join(bad[:2])}"
                f"{', ...' if len(bad) > 2 else ''})") if bad else f"the {' and '.join(losses)} is not finite"
        kept = (f"{self.out / RUN} keeps epoch {self.best['epoch']}, the best finite one"
                if self.best.get("epoch") else "no checkpoint was written")
        raise BadInputError(
            f"training diverged in epoch {row['epoch']}: {what}; lower --lr (now {self.cfg.lr:g}) or keep "
            f"--clip-grad on; {kept}."
        )

    def _finish(self, history) -> TrainResult:
        cfg, env, out = self.cfg, self.env, self.out
        if not history:
            raise IncompatibleCheckpointError(f"{out}: no finished epoch to evaluate.")
        best_row = next((h for h in history if h["epoch"] == self.best["epoch"]), history[-1])
        self.model.load_state_dict(self.best_state, strict=False)
        if self.test_metrics is not None and self.epochs_run == 0:
            metrics = self.test_metrics
            if env.is_main:  # metrics.jsonl may be damaged or lost (why a sweep resumes a finished cell): rewrite it
                self._write_metrics(history, final={"event": "test", "epoch": metrics.get("epoch"), "checkpoint": RUN,
                                                    **{k: v for k, v in metrics.items() if k.startswith("test_")}})
                self.log(f"{out} was already complete: test top-1 {metrics['test_top1']:.2f}% "
                         f"(epoch {metrics.get('epoch')}); {METRICS} written again from {LAST} and {RUN}")
        else:
            metrics = self._run_metrics(best_row)
            test = self.evaluate("test")
            metrics.update({f"test_{k}": v for k, v in test.items()})
            if env.is_main:
                self._save(out / RUN, self.best_state, metrics)
                self._write_metrics(history, final={"event": "test", "epoch": metrics.get("epoch"),
                                                    "checkpoint": RUN, **{f"test_{k}": v for k, v in test.items()}})
                self.log(f"test ({self.n_test} images) with run.pt (epoch "
                         f"{metrics.get('epoch')}): top-1 {test['top1']:.2f}%  loss {test['loss']:.4f}")
        env.barrier()
        return TrainResult(out, out / RUN, out / LAST, metrics, history, cfg.to_dict(record=True),
                           model=self.model.eval())

    # -- steps ------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, step: int):
        import torch

        cfg, env = self.cfg, self.env
        self.epochs_run += 1
        seed = epoch_seed(cfg.seed, epoch, env.rank)
        seed_everything(seed)
        self.sampler.set_epoch(epoch)
        self.train_loader.generator.manual_seed(seed)
        self.train_model.train()
        bar = self._bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        loss_sum = correct = seen = 0.0
        t0 = time.perf_counter()
        lr = cfg.lr
        try:
            for images, targets in self.train_loader:
                lr = lr_at(step, cfg.lr, self.total_steps, self.warmup_steps, cfg.min_lr)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                images = images.to(env.device, non_blocking=True)
                targets = targets.to(env.device, non_blocking=True)
                with env.autocast():
                    logits = self.train_model(images)
                loss = self.criterion(logits.float(), targets)
                aux = self._aux_loss()
                if aux is not None:  # the family's extra loss (Adapter-X's load balancing), part of the reported loss
                    loss = loss + aux.float()
                if not torch.isfinite(loss):
                    raise BadInputError(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower --lr "
                        f"(now {cfg.lr}) or use --amp bf16/off."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    if cfg.clip_grad:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.clip_grad)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.clip_grad)
                    self.optimizer.step()
                step += 1
                n = targets.shape[0]
                loss_sum += loss.item() * n
                correct += (logits.argmax(-1) == targets).sum().item()
                seen += n
                if bar is not None:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.update(1, postfix=f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}% "
                                          f"{seen * env.world_size / dt:.0f} img/s lr {lr:.2e}")
        except AtexportError as e:
            raise _worker_message(e) from None
        finally:
            if bar is not None:
                bar.close()
        dt = time.perf_counter() - t0
        loss_sum, correct, seen = self.env.all_reduce_sum([loss_sum, correct, seen])
        row = {
            "event": "epoch", "epoch": epoch + 1, "step": step, "lr": lr,
            "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
            "time_s": round(dt, 3), "img_per_s": round(seen / max(dt, 1e-9), 1),
        }
        return row, step

    def evaluate(self, split: str) -> dict:
        """Loss, top-1 and top-5 (%) of the current model on ``split``, over every process."""
        import torch

        env = self.env
        loader = self.eval_loaders[split]
        self.model.eval()
        loss_sum = top1 = top5 = seen = 0.0
        k = min(5, self.spec.num_classes)
        bar = self._bar(len(loader), split)
        try:
            with torch.no_grad():
                for images, targets in loader:
                    images = images.to(env.device, non_blocking=True)
                    targets = targets.to(env.device, non_blocking=True)
                    with env.autocast():
                        logits = self.model(images)
                    logits = logits.float()
                    loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                    topk = logits.topk(k, dim=-1).indices
                    top1 += (topk[:, 0] == targets).sum().item()
                    top5 += (topk == targets[:, None]).any(-1).sum().item()
                    seen += targets.shape[0]
                    if bar is not None:
                        bar.update(1)
        except AtexportError as e:
            raise _worker_message(e) from None
        finally:
            if bar is not None:
                bar.close()
        loss_sum, top1, top5, seen = env.all_reduce_sum([loss_sum, top1, top5, seen])
        seen = max(seen, 1)
        return {"loss": loss_sum / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}

    # -- outputs ----------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        """A batch bar on a terminal; none otherwise (the epoch line is the one line per step)."""
        if not (self.cfg.progress and self.env.is_main):
            return None
        from atexport.utils.progress import Progress, progress_mode

        if progress_mode(True) != "bar":
            return None
        return Progress(total, desc, unit="batch", mode="bar")

    def _trainable_state(self) -> dict:
        from atexport.checkpoint import trainable_state

        return trainable_state(self.model, self.cfg.regime)

    def _run_metrics(self, row: dict) -> dict:
        keep = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
        return {**{k: row[k] for k in keep if k in row}, "params": self.params}

    def _save(self, path: Path, state_dict: dict, metrics: dict, resume: dict | None = None) -> None:
        from atexport.checkpoint import Checkpoint, save_checkpoint

        ckpt = Checkpoint(
            model=self.spec, adapter=self.adapter_cfg, regime=self.cfg.regime, fingerprint=self.fingerprint,
            state_dict=state_dict, preprocess=self.preprocess, metrics=metrics,
            config=self.cfg.to_dict(record=True), resume=resume,
        )
        save_checkpoint(ckpt, path)

    def _write_metrics(self, history: list, final: dict | None = None) -> None:
        lines = [json.dumps(h) for h in history] + ([json.dumps(final)] if final else [])
        atomic_write_text(self.out / METRICS, "\n".join(lines) + "\n")

    def _epoch_line(self, row: dict) -> str:
        s = (f"epoch {row['epoch']}/{self.cfg.epochs}  train loss {row['train_loss']:.4f} "
             f"top-1 {row['train_top1']:.2f}%")
        if "val_top1" in row:
            s += f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}%"
        s += f"  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s"
        left = self.cfg.epochs - row["epoch"]
        if left > 0 and self.epochs_run:
            from atexport.utils.progress import format_seconds

            per_epoch = (time.perf_counter() - self.t_start) / self.epochs_run
            s += f"  ETA {format_seconds(per_epoch * left)}"
        return s + ("  *best" if row.get("best") and "val_top1" in row else "")

