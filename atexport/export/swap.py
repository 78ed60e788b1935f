"""Swapping a task's adapters and head into a separable ONNX model: in a file, or in a live session.

A model exported with ``--separable`` keeps each adapter and head tensor as a graph input with an
initializer of the same name (an *overridable initializer*), listed in the metadata's manifest. Swapping
a task therefore needs no PyTorch tracing and no re-export:

* :func:`swap_onnx` rewrites those initializers in the file with another checkpoint's tensors
  (``atexport swap --onnx model.onnx --ckpt other.pt -o other.onnx``);
* :class:`AdapterSession` feeds them at run time to one live ONNX Runtime session, so switching task
  is changing a dict (no session rebuild).

Both are exact: ONNX Runtime does not constant-fold through overridable initializers at any
optimisation level. (``SessionOptions.add_initializer`` is *not* used: it gives silently wrong logits
when the replaced weight feeds a Transpose that ONNX Runtime constant-folds.)

:func:`check_compatible` refuses, with every reason, a checkpoint whose backbone fingerprint, adapter
rank, placement, scale, class count or tensors do not fit the model. Loading a checkpoint needs torch
(it is a torch file); the session API works on plain numpy weights too, without torch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError, require
from atexport.metadata import META_KEY, ModelMetadata
from atexport.runtime.base import Runner

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@dataclass
class SwapResult:
    """What :func:`swap_onnx` wrote.

    Attributes:
        path: the written model.
        metadata: its metadata (task, class names and swap provenance updated).
        swapped: number of tensors replaced.
        seconds: wall time of the swap (``swap``), of the optional parity check (``verify``), ``total``.
        parity: parity rows when ``verify=True``.
    """

    path: Path
    metadata: ModelMetadata
    swapped: int
    seconds: dict = field(default_factory=dict)
    parity: list = field(default_factory=list)


def read_onnx(path: str | os.PathLike, flag: str = "--onnx"):
    """Load an ONNX file with a clear error when it is missing or not a readable ONNX model."""
    from atexport.utils.io import require_file

    onnx = require("onnx", "reading ONNX models", "onnx")
    path = require_file(path, flag, "ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise BadInputError(f"{flag} {path}: not a readable ONNX model ({msg}).") from None
    if not model.graph.node and not model.graph.input:
        raise BadInputError(f"{flag} {path}: not a readable ONNX model (empty or corrupted graph).")
    return model


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def check_compatible(meta: ModelMetadata, ckpt, where: str = "the model") -> None:
    """Refuse ``ckpt`` unless its task weights fit the separable model described by ``meta``.

    Checked: the model is separable; same backbone (name, architecture overrides, fingerprint), same
    regime, adapter rank, placement (``every``) and scale ``alpha`` (the scale is baked into the graph),
    same class count and preprocessing, and the checkpoint's tensors are exactly the manifest's, shape for
    shape.

    Raises:
        IncompatibleCheckpointError: with every reason found.
    """
    name = f"checkpoint {ckpt.path}" if getattr(ckpt, "path", None) else "the checkpoint"
    if meta.tasks:
        names = ", ".join(t["name"] for t in meta.tasks)
        raise IncompatibleCheckpointError(
            f"{where} is a multi-task model (tasks: {names}); change its tasks with "
            "'atexport tasks add --model MODEL --ckpt CKPT [--name NAME --replace]' or 'atexport tasks remove'."
        )
    if not meta.separable or not meta.manifest:
        raise IncompatibleCheckpointError(
            f"{where} was exported without --separable: its adapter and head weights are fused into the graph "
            "and cannot be swapped. Re-export it with 'atexport onnx --separable'."
        )
    reasons = []
    bb = meta.backbone or {}
    if ckpt.model.backbone != bb.get("name"):
        reasons.append(f"backbone {ckpt.model.backbone} != the model's {bb.get('name')}")
    if _canon(ckpt.model.model_args) != _canon(bb.get("model_args") or {}):
        reasons.append(f"backbone overrides {ckpt.model.model_args} != the model's {bb.get('model_args')}")
    if ckpt.fingerprint != bb.get("fingerprint"):
        reasons.append(
            f"backbone fingerprint {str(ckpt.fingerprint)[:12]} != the model's {str(bb.get('fingerprint'))[:12]} "
            "(adapters trained on another backbone)"
        )
    if meta.regime and ckpt.regime != meta.regime:
        reasons.append(f"regime {ckpt.regime!r} != the model's {meta.regime!r}")
    m_ad, c_ad = meta.adapter, ckpt.adapter.to_dict() if ckpt.adapter else None
    if (m_ad is None) != (c_ad is None):
        reasons.append(
            "the model has adapters and the checkpoint none" if m_ad else "the checkpoint has adapters, the model none"
        )
    elif m_ad and c_ad:
        if int(c_ad["rank"]) != int(m_ad["rank"]):
            reasons.append(f"adapter rank {c_ad['rank']} != the model's {m_ad['rank']}")
        if int(c_ad["every"]) != int(m_ad["every"]):
            reasons.append(f"adapter placement every={c_ad['every']} != the model's every={m_ad['every']}")
        if float(c_ad["alpha"]) != float(m_ad["alpha"]):
            reasons.append(f"adapter scale alpha={c_ad['alpha']} != the model's {m_ad['alpha']} (baked into the graph)")
    if meta.num_classes is not None and int(ckpt.model.num_classes) != int(meta.num_classes):
        reasons.append(f"{ckpt.model.num_classes} classes != the model's {meta.num_classes}")
    if meta.preprocess and _canon(ckpt.preprocess) != _canon(meta.preprocess):
        reasons.append("preprocessing differs from the model's")
    if not reasons:
        have = {k: [int(v) for v in t.shape] for k, t in ckpt.state_dict.items()}
        missing = [n for n in meta.manifest if n not in have]
        extra = [n for n in have if n not in meta.manifest]
        wrong = [
            f"{n} {have[n]} != {e['shape']}"
            for n, e in meta.manifest.items()
            if n in have and have[n] != list(e["shape"])
        ]
        if missing:
            reasons.append(f"tensors missing from the checkpoint: {missing[:5]}")
        if extra:
            reasons.append(f"checkpoint tensors the model has no place for: {extra[:5]}")
        if wrong:
            reasons.append(f"shapes differ: {wrong[:5]}")
    if reasons:
        raise IncompatibleCheckpointError(f"{name} does not fit {where}: " + "; ".join(reasons) + ".")


def _as_numpy(t, dtype) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=dtype))


def load_task_weights(ckpt, meta: ModelMetadata | None = None, where: str = "the model") -> dict[str, np.ndarray]:
    """A checkpoint's swappable tensors as numpy arrays keyed by initializer name.

    Args:
        ckpt: a checkpoint path or :class:`~atexport.checkpoint.Checkpoint`.
        meta: the target model's metadata; when given, the checkpoint is checked against it
            (:func:`check_compatible`) and the arrays take the manifest's names and dtypes.
        where: how the model is named in error messages.

    Returns:
        ``{initializer name: array}``, ready to feed or to write into the model.
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    if meta is None:
        return {
            k: _as_numpy(v, np.float32)
            for k, v in ckpt.state_dict.items()
            if ".adapter." in k or k.startswith("head.")
        }
    check_compatible(meta, ckpt, where)
    return {
        e.get("initializer", n): _as_numpy(ckpt.state_dict[n], _NP_DTYPES.get(e.get("dtype", "float32"), np.float32))
        for n, e in meta.manifest.items()
    }


def check_weights(meta: ModelMetadata, weights: Mapping[str, Any], where: str = "the model") -> dict[str, np.ndarray]:
    """Validate plain arrays (keyed by checkpoint or initializer name) against the manifest; cast them."""
    by_init = {e.get("initializer", n): (n, e) for n, e in meta.manifest.items()}
    out, problems = {}, []
    for key, value in weights.items():
        if key in meta.manifest:
            init, e = meta.manifest[key].get("initializer", key), meta.manifest[key]
        elif key in by_init:
            init, e = key, by_init[key][1]
        else:
            problems.append(f"{key} is not a swappable tensor of {where}")
            continue
        a = _as_numpy(value, _NP_DTYPES.get(e.get("dtype", "float32"), np.float32))
        if list(a.shape) != list(e["shape"]):
            problems.append(f"{key} has shape {list(a.shape)}, the model needs {e['shape']}")
        out[init] = a
    lacking = [i for i in by_init if i not in out]
    if lacking:
        problems.append(f"missing tensors {lacking[:5]}")
    if problems:
        raise IncompatibleCheckpointError(f"these weights do not fit {where}: " + "; ".join(problems[:6]) + ".")
    return out


def _smoke_run(data: bytes, meta: ModelMetadata, where: str) -> None:
    """Load the model in ONNX Runtime and run one random batch: right output shape, finite logits."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    b = meta.input["shape"][0]
    b = b if isinstance(b, int) else 1
    x = np.random.default_rng(0).standard_normal((b, *meta.input["shape"][1:])).astype(np.float32)
    with OnnxRuntimeRunner(data) as r:
        y = r.infer(x)
    if y.shape != (b, meta.num_classes) or not np.isfinite(y).all():
        raise BadInputError(f"{where}: the swapped model gives {y.shape} logits (finite: {bool(np.isfinite(y).all())}).")


def swap_onnx(
    onnx_path: str | os.PathLike,
    ckpt,
    output: str | os.PathLike | None = None,
    *,
    task_name: str | None = None,
    verify: bool = False,
    backbone_weights: str | os.PathLike | None = None,
    images=None,
    config: str | Mapping = "onnx",
) -> SwapResult:
    """Write a copy of a separable model holding another checkpoint's adapters and head.

    No PyTorch tracing: the manifest's initializers are overwritten with the checkpoint's tensors, the
    metadata (task, class names) updated, the result loaded and run once in ONNX Runtime, then written
    atomically. The output may be the input file itself (it is replaced atomically).

    Args:
        onnx_path: a model exported with ``separable=True``.
        ckpt: the other task's checkpoint (path or :class:`~atexport.checkpoint.Checkpoint`).
        output: where to write; default ``<checkpoint stem>.onnx`` beside ``onnx_path``.
        task_name: the task's name in the metadata (default: the checkpoint's stem).
        verify: also rebuild the PyTorch model of ``ckpt`` and check parity (needs its backbone).
        backbone_weights: local backbone weights for ``verify``.
        images: extra parity images for ``verify``.
        config: export preset holding the parity settings.

    Raises:
        BadInputError: missing or corrupt files, unwritable output.
        IncompatibleCheckpointError: the checkpoint does not fit the model (every reason listed).
        ParityError: ``verify`` found a mismatch (nothing written).
    """
    from onnx import numpy_helper

    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.export.onnx import check_manifest
    from atexport.metadata import read_onnx_metadata, write_onnx_metadata
    from atexport.utils.io import atomic_write_bytes, check_writable

    t0 = time.perf_counter()
    proto = read_onnx(onnx_path)
    meta = read_onnx_metadata(proto, str(onnx_path))
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    if output is None:
        output = Path(onnx_path).with_name(f"{ckpt.name}.onnx")
    output = check_writable(output, "-o")
    if ckpt.path is not None and output.resolve() == Path(ckpt.path).resolve():
        raise BadInputError(f"-o {output}: that is the checkpoint itself; choose another output path.")
    where = f"--onnx {onnx_path}"
    weights = load_task_weights(ckpt, meta, where)
    check_manifest(proto, meta.manifest, where)
    replaced = 0
    for init in proto.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
            replaced += 1
    if replaced != len(weights):
        raise BadInputError(f"{where}: only {replaced} of {len(weights)} manifest initializers found in the graph.")
    previous = meta.task
    meta.task = task_name or ckpt.name
    meta.class_names = list(ckpt.model.class_names) if ckpt.model.class_names else None
    meta.extra = dict(meta.extra or {})
    meta.extra["checkpoint"] = {"file": Path(ckpt.path).name if ckpt.path else None, "metrics": ckpt.metrics}
    meta.extra["swap"] = {"from_task": previous, "from_file": Path(onnx_path).name, "tensors": replaced}
    meta.extra["parity"] = None  # the export's parity numbers were for the previous task's weights
    write_onnx_metadata(proto, meta)
    data = proto.SerializeToString()
    _smoke_run(data, meta, f"{where} swapped to {ckpt.path}")
    seconds = {"swap": time.perf_counter() - t0}
    parity = []
    if verify:
        parity = _verify_swapped(data, meta, ckpt, backbone_weights, images, config)
        seconds["verify"] = time.perf_counter() - t0 - seconds["swap"]
        meta.extra["parity"] = [r.to_dict() for r in parity]
        write_onnx_metadata(proto, meta)
        data = proto.SerializeToString()
    atomic_write_bytes(output, data)
    seconds["total"] = time.perf_counter() - t0
    return SwapResult(path=output, metadata=meta, swapped=replaced, seconds=seconds, parity=parity)


def _verify_swapped(data, meta, ckpt, backbone_weights, images, config):
    from atexport.checkpoint import build_model
    from atexport.export.onnx import load_export_config
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.verify.compare import require_passed
    from atexport.verify.parity import check_parity, photo_batch

    par = load_export_config(config)["parity"]
    model = build_model(ckpt, backbone_weights=backbone_weights)
    b = meta.input["shape"][0]
    sizes = [b] if isinstance(b, int) else [int(v) for v in par.get("batch_sizes", [1, 4])]
    photos = photo_batch(ckpt.preprocess, extra=images, max_images=par.get("max_images"))
    with TorchRunner(model) as ref, OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
        results = check_parity(
            ref, cand, photos, par.get("precision", "fp32"), random_inputs=int(par.get("random_inputs", 8)),
            seed=int(par.get("seed", 0)), batch_sizes=sizes, tolerances=par.get("tolerances", "tolerances"),
        )
    require_passed(results, "the swapped model")
    return results


class AdapterSession(Runner):
    """One live ONNX Runtime session of a separable model; task weights are swapped per call, not rebuilt.

    The swappable tensors are fed by name with every run (they are overridable initializers), so
    :meth:`swap` costs only loading the checkpoint's few MB of tensors, and several tasks can be held
    at once and picked per batch::

        sess = AdapterSession("model.onnx")
        sess.add_task("birds.pt")  # task "birds"
        sess.add_task("cars.pt")
        logits = sess.infer(batch, task="cars")
        sess.use(None)  # back to the weights stored in the file

    The weights are fed as host (numpy) arrays; with a GPU execution provider ONNX Runtime copies them
    to the device on each run (a few MB for a ViT-S with rank-16 adapters), which IO binding could avoid.

    Args:
        model: path, bytes or ``onnx.ModelProto`` of a model exported with ``separable=True``.
        ckpt: optional checkpoint (path or object) to start with instead of the file's own weights.
        threads: intra-op threads (None: ONNX Runtime's default).
        providers: execution providers (CPU by default).
        optimization: ONNX Runtime graph optimisation level (``all`` by default; swaps stay exact).
    """

    def __init__(self, model, ckpt=None, *, threads=None, providers=None, optimization="all", name="onnxruntime-adapters"):
        super().__init__()
        self.model, self.threads, self.providers, self.optimization = model, threads, providers, optimization
        self.name = name
        self.session = None
        self.metadata: ModelMetadata | None = None
        self._tasks: dict[str | None, dict[str, np.ndarray]] = {None: {}}
        self.task: str | None = None
        self._initial = ckpt
        self.where = str(model) if isinstance(model, (str, os.PathLike)) else "the model"

    def _activate(self):
        from atexport.runtime.onnxruntime import create_session

        self.session = create_session(self.model, self.threads, self.providers, self.optimization)
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise BadInputError(f"{self.where}: no atexport metadata; export the model with 'atexport onnx --separable'.")
        self.metadata = ModelMetadata.from_json(props[META_KEY], self.where)
        if not self.metadata.separable or not self.metadata.manifest:
            raise IncompatibleCheckpointError(
                f"{self.where} was exported without --separable; its task weights cannot be swapped. "
                "Re-export it with 'atexport onnx --separable'."
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._tasks[None] = {}
        self.task = None
        if self._initial is not None:
            self.swap(self._initial)

    def _deactivate(self):
        self.session = None

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks loaded (``None``, the file's own weights, is always available)."""
        return [t for t in self._tasks if t is not None]

    def add_task(self, ckpt=None, name: str | None = None, *, weights: Mapping[str, Any] | None = None) -> str:
        """Load a task's weights (checked against the model) without switching to it; returns its name.

        Args:
            ckpt: checkpoint path or :class:`~atexport.checkpoint.Checkpoint` (needs torch to read).
            name: task name; default the checkpoint's file stem.
            weights: instead of ``ckpt``, arrays keyed by tensor name (torch-free; checked against the manifest).
        """
        if self.session is None:  # (also reached from _activate, when a start checkpoint was given)
            self.activate()
        if (ckpt is None) == (weights is None):
            raise BadInputError("give either a checkpoint or a weights dict to add_task.")
        if weights is not None:
            if not name:
                raise BadInputError("a task given as a weights dict needs a name.")
            arrays = check_weights(self.metadata, weights, self.where)
        else:
            from atexport.checkpoint import Checkpoint, load_checkpoint

            if not isinstance(ckpt, Checkpoint):
                ckpt = load_checkpoint(ckpt)
            arrays = load_task_weights(ckpt, self.metadata, self.where)
            name = name or ckpt.name
        self._tasks[name] = arrays
        return name

    def use(self, name: str | None) -> None:
        """Switch to a loaded task (``None``: the weights stored in the model file)."""
        if name not in self._tasks:
            raise BadInputError(f"no task {name!r} loaded; have {self.tasks}.")
        self.task = name

    def swap(self, ckpt=None, name: str | None = None, *, weights=None) -> str:
        """Load a task and switch to it (the live swap); returns its name."""
        name = self.add_task(ckpt, name, weights=weights)
        self.use(name)
        return name

    def remove(self, name: str) -> None:
        """Forget a loaded task (back to the file's weights if it was in use)."""
        if name is None or name not in self._tasks:
            raise BadInputError(f"no task {name!r} loaded; have {self.tasks}.")
        del self._tasks[name]
        if self.task == name:
            self.task = None

    def feeds(self, task: str | None = None) -> dict[str, np.ndarray]:
        """The named inputs that select ``task`` (for callers running the session themselves)."""
        if task not in self._tasks:
            raise BadInputError(f"no task {task!r} loaded; have {self.tasks}.")
        return dict(self._tasks[task])

    def _infer(self, batch, task: Any = "__current__", **feeds):
        task = self.task if task == "__current__" else task
        if task not in self._tasks:
            raise BadInputError(f"no task {task!r} loaded; have {self.tasks}.")
        feed = {self.input_name: batch, **self._tasks[task], **feeds}
        return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)
