"""The pinned ONNX exporter for any ``nn.Module``, with named tensors lifted to overridable initializers.

:func:`export_module` runs ``torch.onnx.export(..., dynamo=True)`` at opset >= 20 with a dynamic batch axis
(named ``batch``); tensors named in ``lifted`` become graph inputs of the same name, which
:func:`bind_initializers` then gives default values (overridable initializers: swappable at run time or
in the file, never constant-folded). :func:`finish_proto` stamps, size-checks and ``onnx.checker``-checks
the result. Single-task (:mod:`atexport.export.onnx`) and multi-task (:mod:`atexport.export.multitask`)
export are built on these.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from atexport import __version__
from atexport.artifact.onnx import shape_of
from atexport.errors import AtexportError, BadInputError

MIN_OPSET = 20
PROTOBUF_LIMIT = 2**31 - 1
BATCH_AXIS = "batch"


def _torch_export(model, args, *, input_names, output_names, dynamic_shapes, opset):
    """The one place atexport calls ``torch.onnx.export``: dynamo exporter, pinned."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # Expected: every batch-aligned input (image, task_id) names its axis "batch", and the exporter says
            # it keeps one of the equal names. Only this message is silenced, only around this call.
            warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used", category=UserWarning)
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,  # pinned: the default changed in PyTorch 2.9, and the TorchScript exporter
                # decomposes GELU and merges equal-valued parameters (see atexport.export.onnx).
                opset_version=int(opset),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                external_data=False,
                report=False,
                verify=False,
                verbose=False,
            )
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch.export's errors put the cause under an "Exception summary" heading.
        at = next((i for i, ln in enumerate(lines) if "Exception summary" in ln), None)
        msg = (lines[at + 1] if at is not None and at + 1 < len(lines) else (lines or [type(e).__name__])[0])[:400]
        raise AtexportError(
            f"torch.onnx.export (dynamo, opset {opset}) failed: {msg}. "
            "Check that the opset is one this PyTorch supports, and that the checkpoint's preprocess input_size is "
            "the size its backbone takes."
        ) from e
    return program.model_proto


def _rename_batch_axis(model, symbol: str, name: str = BATCH_AXIS) -> None:
    """Rename the dynamic batch dimension ``symbol`` to ``name`` in inputs, outputs and value_info."""
    if not symbol or symbol == name:
        return
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = name


class _LiftedParams:
    """Factory of the wrapper module (defined lazily: torch is imported only when exporting)."""

    cls = None

    @classmethod
    def wrap(cls, module):
        if cls.cls is None:
            import torch

            class LiftedParams(torch.nn.Module):
                """``forward(x, params, extra)``: runs ``module`` with ``params`` swapped in."""

                def __init__(self, module):
                    super().__init__()
                    self.module = module

                def forward(self, x, params, extra=None):
                    return torch.func.functional_call(self.module, params, (x,), extra or {}, strict=False)

            cls.cls = LiftedParams
        return cls.cls(module).eval()


def check_opset(opset) -> None:
    """The one opset check of every ONNX export: atexport needs opset >= :data:`MIN_OPSET`."""
    if int(opset) < MIN_OPSET:
        raise BadInputError(
            f"--opset {opset}: atexport needs opset >= {MIN_OPSET}, where GELU is one Gelu node and LayerNorm "
            "one LayerNormalization node (decomposed LayerNorm overflows in FP16 on ViTs)."
        )


def export_module(
    module,
    example_input,
    lifted: Mapping[str, Any] | None = None,
    *,
    extra_inputs: Mapping[str, Any] | None = None,
    extra_dynamic: Mapping[str, Mapping[int, str]] | None = None,
    input_name: str = "input",
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    opset: int = MIN_OPSET,
):
    """Export any ``nn.Module`` with the pinned exporter, optionally lifting named tensors to graph inputs.

    The module is called as ``module(x, **extra_inputs)``. Each lifted tensor (a parameter or buffer
    of ``module``, by its ``named_parameters`` name) becomes a graph input of exactly that name and
    shape, which the exporter's optimizer and the simplifiers leave untouched; give them values with
    :func:`bind_initializers` once the graph is final.

    Args:
        module: the model, in eval mode.
        example_input: a tensor of the input's shape; for a dynamic batch its batch must be >= 2
            (tracing at 1 specialises the axis).
        lifted: name -> tensor of the parameters to lift (values only set the traced shapes).
        extra_inputs: further named inputs passed to ``module`` as keyword arguments (e.g. ``task_id``).
        extra_dynamic: per extra input, ``{axis: symbol}``; the symbol ``"batch"`` is tied to the
            batch axis of the main input.
        input_name: name of the main input.
        output_names: names of the outputs.
        dynamic_batch: make axis 0 of the input (and outputs) dynamic, named ``"batch"``.
        opset: ONNX opset (>= 20).

    Returns:
        The ``onnx.ModelProto``; its inputs are ``[input_name, *lifted, *extra_inputs]`` in that order.
    """
    check_opset(opset)
    lifted = dict(lifted or {})
    extra_inputs = dict(extra_inputs or {})
    if dynamic_batch and example_input.shape[0] < 2:
        raise BadInputError("a dynamic-batch export must be traced with batch >= 2 (batch 1 specialises the axis).")
    _check_names(module, lifted, extra_inputs, input_name, output_names)
    model, args, dyn = _traced_call(module.eval(), example_input, lifted, extra_inputs, extra_dynamic or {},
                                    dynamic_batch)
    names = [input_name, *lifted, *extra_inputs]
    proto = _torch_export(
        model, args, input_names=names, output_names=output_names, dynamic_shapes=dyn, opset=opset
    )
    got = [i.name for i in proto.graph.input]
    if got != names:
        raise AtexportError(f"the exported graph's inputs {got[:6]} are not the expected {names[:6]} (a bug).")
    for vi in proto.graph.input[1 : 1 + len(lifted)]:
        if shape_of(vi) != list(lifted[vi.name].shape):
            want = list(lifted[vi.name].shape)
            raise AtexportError(f"exported input {vi.name} has shape {shape_of(vi)}, expected {want} (a bug).")
    if dynamic_batch:
        first_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        _rename_batch_axis(proto, first_dim.dim_param)
    return proto


def _check_names(module, lifted: Mapping, extra_inputs: Mapping, input_name: str, output_names: Sequence[str]) -> None:
    """Refuse lifted tensors the module does not have (or of another shape) and names used twice."""
    known = dict(module.named_parameters())
    known.update(dict(module.named_buffers()))
    unknown = [n for n in lifted if n not in known]
    if unknown:
        raise BadInputError(f"cannot lift {unknown[:5]}: no such parameter or buffer in {type(module).__name__}.")
    clash = {input_name, *output_names} & (set(lifted) | set(extra_inputs)) or set(lifted) & set(extra_inputs)
    if clash:
        raise BadInputError(f"input/output names used twice: {sorted(clash)}.")
    for n, t in lifted.items():
        if tuple(t.shape) != tuple(known[n].shape):
            raise BadInputError(f"lifted tensor {n}: shape {tuple(t.shape)} != the module's {tuple(known[n].shape)}.")


def _traced_call(module, example_input, lifted: dict, extra_inputs: dict, extra_dynamic: Mapping, dynamic_batch: bool):
    """``(model, args, dynamic_shapes)`` for ``torch.onnx.export``: ``module`` itself, or wrapped so the lifted
    tensors are an explicit dict input (:class:`_LiftedParams`)."""
    import inspect

    import torch

    batch = torch.export.Dim(BATCH_AXIS) if dynamic_batch else None
    x_dyn = {0: batch} if dynamic_batch else None
    dims: dict[str, Any] = {}

    def dim(sym):
        if sym == BATCH_AXIS and batch is not None:
            return batch
        return dims.setdefault(sym, torch.export.Dim(sym))

    def extra_dyn(n):
        return {int(a): dim(s) for a, s in extra_dynamic.get(n, {}).items()} or None

    if not lifted:
        first = next(iter(inspect.signature(module.forward).parameters))
        dyn = {first: x_dyn, **{n: extra_dyn(n) for n in extra_inputs}}
        return module, ((example_input, dict(extra_inputs)) if extra_inputs else (example_input,)), dyn
    params = {n: (t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)) for n, t in lifted.items()}
    dyn = {"x": x_dyn, "params": {n: None for n in params}}
    if extra_inputs:
        dyn["extra"] = {n: extra_dyn(n) for n in extra_inputs}
        return _LiftedParams.wrap(module), (example_input, params, extra_inputs, {}), dyn
    return _LiftedParams.wrap(module), (example_input, params, {}), dyn


def bind_initializers(model, tensors: Mapping[str, Any]) -> None:
    """Give graph inputs default values: initializers of the same names (*overridable initializers*).

    Existing initializers of those names are replaced. Every name must be a graph input whose declared
    shape matches. Modifies ``model`` in place.
    """
    import numpy as np
    from onnx import numpy_helper

    inputs = {i.name: i for i in model.graph.input}
    arrays = {}
    for name, t in tensors.items():
        if name not in inputs:
            raise AtexportError(f"cannot bind {name}: not a graph input of the model.")
        a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        want = shape_of(inputs[name])
        if list(a.shape) != want:
            raise AtexportError(f"cannot bind {name}: shape {list(a.shape)} != the input's {want}.")
        arrays[name] = np.ascontiguousarray(a)
    keep = [i for i in model.graph.initializer if i.name not in arrays]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name, a in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(a, name))


def finish_proto(proto, meta, description: str, what: str) -> None:
    """Stamp an exported model (producer, doc string, atexport metadata), refuse one over protobuf's 2 GB limit,
    and run ``onnx.checker`` on it (a failure there is a bug of atexport, not of the user's input)."""
    import onnx

    from atexport.artifact.metadata import write_onnx_metadata

    proto.producer_name, proto.producer_version = "atexport", __version__
    proto.doc_string = f"{description}, exported by atexport {__version__}"
    write_onnx_metadata(proto, meta)
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise BadInputError(
            f"{what} is {proto.ByteSize() / 1e9:.1f} GB, over protobuf's 2 GB limit; models this large "
            "(external-data ONNX) are not supported by atexport yet."
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise AtexportError(f"{what} fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e

