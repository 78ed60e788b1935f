"""The one check that a model's graph computes what its metadata says, for every backend.

An ONNX model (ONNX Runtime), an OpenVINO IR or the ONNX file it is converted from, a TensorRT engine's
bindings and a Triton repository's model all carry the atexport metadata beside a graph; hand-edited
metadata, or metadata copied from another model, would make predict label by index and ``triton`` serve
the wrong classes. Each backend lists its graph's tensors as ``{name: shape}`` (static sizes as ints,
anything else for a dynamic axis) and calls :func:`check_graph_fits_metadata`.
"""

from __future__ import annotations

from typing import Any, Mapping

from atexport.errors import BadInputError

REDO = "re-export the model with atexport (its metadata was edited, or belongs to another model)."


def static_shape(shape) -> list[int] | None:
    """A shape as ints, or ``None`` when it is unknown or any axis is dynamic (a name, ``-1``, ``None``)."""
    if not isinstance(shape, (list, tuple)):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        return None
    return [int(v) for v in shape]


def check_graph_fits_metadata(meta, inputs: Mapping[str, Any], outputs: Mapping[str, Any], where: str,
                              tensors: Mapping[str, Any] | None = None) -> None:
    """Refuse a model whose graph disagrees with its own metadata.

    Checks, where the graph declares static sizes: the logits width against the class count (for a
    multi-task model: at least its largest task), the image input against ``preprocess.input_size``, and
    every swappable tensor of the manifest against the graph's tensor of that name.

    Args:
        meta: the model's validated :class:`~atexport.artifact.metadata.ModelMetadata`.
        inputs: the graph's inputs, ``{name: shape}``.
        outputs: the graph's outputs, ``{name: shape}``.
        where: flag and path for messages (the file the user gave).
        tensors: the graph's overridable tensors (initializers, exposed weights), ``{name: shape}``.

    Raises:
        BadInputError: naming the file, what the graph computes and what the metadata says.
    """
    out_shape = outputs.get((meta.output or {}).get("name")) or next(iter(outputs.values()), None)
    width = out_shape[-1] if isinstance(out_shape, (list, tuple)) and out_shape else None
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        if meta.tasks:
            most = max(int(t["num_classes"]) for t in meta.tasks)
            if width < most:
                raise BadInputError(f"{where}: the model computes {width} logits per image but its metadata lists a "
                                    f"task with {most} classes; {REDO}")
        else:
            want = meta.num_classes or (len(meta.class_names) if meta.class_names else None)
            if want and width != want:
                raise BadInputError(f"{where}: the model computes {width} logits per image but its metadata says "
                                    f"{want} classes; {REDO}")
    image = inputs.get(meta.input.get("name"))
    in_shape = static_shape(list(image)[1:]) if isinstance(image, (list, tuple)) else None
    want_in = [int(v) for v in meta.preprocess["input_size"]]
    if in_shape is not None and len(in_shape) == 3 and in_shape != want_in:
        raise BadInputError(f"{where}: the model takes images of {in_shape} but its metadata preprocesses to "
                            f"{want_in}; {REDO}")
    named = dict(tensors or {})
    named.update(inputs)
    for name, e in (meta.manifest or {}).items():
        actual = static_shape(named.get(e.get("initializer", name)))
        if actual is not None and actual != [int(v) for v in e["shape"]]:
            raise BadInputError(f"{where}: tensor {e.get('initializer', name)!r} has shape {actual} in the graph but "
                                f"{e['shape']} in the metadata; {REDO}")


__all__ = ["REDO", "check_graph_fits_metadata", "static_shape"]
