"""The PyTorch multi-task model that is exported: a frozen timm ViT whose adapters and head read a task bank.

Every bank tensor carries a leading task axis ``[K, ...]``; a bank layer picks each sample's slice with
``index_select`` (an ONNX ``Gather``) and applies it per sample (a batched ``MatMul`` for linear layers).
Which tensors the bank holds, the layers around them and where they sit in the ViT come from the
checkpoints' adapter family (:meth:`~atexport.adapters.base.AdapterFamily.bank_tensors`,
:meth:`~atexport.adapters.base.AdapterFamily.bank_modules`, :meth:`~atexport.adapters.base.AdapterFamily.bank_wire`:
AdapterTune's adapter after each block, Adapter-X's shared experts and per-block routers stacked per
task, separable LoRA's q/v branches), so this module holds no family's formula; it gives the families
the per-sample operations (:class:`BankOps`) and checks that their layers' parameters are exactly the
declared bank tensors.

Parameters are named as :func:`atexport.artifact.bank.bank_layout` names the bank
(``bank.blocks.{i}.adapter.down.weight``, ``bank.head.weight``), so the export lifts them to graph
inputs of those names. torch is imported when the modules are first needed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from atexport.artifact.bank import BANK_PREFIX, bank_layout, bank_manifest, task_slices
from atexport.errors import AtexportError, IncompatibleCheckpointError


@functools.lru_cache(maxsize=None)
def _bank_ops() -> dict:
    """The per-sample bank operations a family's layers are made of, defined on first use (torch is imported
    only when exporting)."""
    import torch
    from torch import nn

    class TaskContext:
        """The per-call ``task_id``, shared by the bank layers (set by ``MultiTaskModel.forward``)."""

        task_id = None

    class BankLinear(nn.Module):
        """``y = x @ weight[task_id] + bias[task_id]`` per sample; weight ``[K, in, out]``, bias ``[K, out]``."""

        def __init__(self, ctx, tasks: int, d_in: int, d_out: int, bias: bool = True):
            super().__init__()
            self.ctx = ctx
            self.weight = nn.Parameter(torch.zeros(tasks, d_in, d_out), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(tasks, d_out), requires_grad=False) if bias else None

        def forward(self, x):  # x: [N, T, in]
            t = self.ctx.task_id
            w = torch.index_select(self.weight, 0, t)  # ONNX Gather -> [N, in, out]
            y = torch.matmul(x, w)  # batched MatMul, one GEMM per sample
            if self.bias is None:
                return y
            return y + torch.index_select(self.bias, 0, t).unsqueeze(1)  # [N, 1, out]

    class BankOps:
        """What a family's bank layers are made of (see :meth:`AdapterFamily.bank_modules`)."""

        def __init__(self, ctx, tasks: int):
            self.ctx, self.tasks = ctx, int(tasks)

        def linear(self, d_in: int, d_out: int, bias: bool = True):
            return BankLinear(self.ctx, self.tasks, d_in, d_out, bias)

        def param(self, *shape: int):
            return nn.Parameter(torch.zeros(self.tasks, *[int(v) for v in shape]), requires_grad=False)

        def select(self, p):
            return torch.index_select(p, 0, self.ctx.task_id)

    return {"TaskContext": TaskContext, "BankLinear": BankLinear, "BankOps": BankOps}


@functools.lru_cache(maxsize=None)
def _classes() -> dict:
    """The torch modules of the multi-task model (and :func:`_bank_ops`' classes), defined on first use."""
    from torch import nn

    ops_classes = _bank_ops()
    TaskContext, BankOps = ops_classes["TaskContext"], ops_classes["BankOps"]

    class Bank(nn.Module):
        """Every bank tensor, named as the layout names it: the family's layers at their paths
        (``blocks.3.adapter``, ``shared.adapter.experts``...), then ``head``."""

        def __init__(self, modules, head):
            super().__init__()
            for path, module in modules.items():
                node, parts = self, str(path).split(".")
                for part in parts[:-1]:
                    if part not in node._modules:
                        node.add_module(part, nn.Module())
                    node = node._modules[part]
                node.add_module(parts[-1], module)
            self.head = head

    class BankHead(nn.Module):
        def __init__(self, head):
            super().__init__()
            self._head = [head]

        def forward(self, x):  # pooled features [N, D] -> [N, C]
            return self._head[0](x.unsqueeze(1)).squeeze(1)

    class MultiTaskModel(nn.Module):
        """``forward(x, task_id)``: the timm ViT with its adapters and head reading the task bank."""

        def __init__(self, vit, tasks: int, adapter_config, classes: int):
            super().__init__()
            from atexport.adapters import family_of

            self.ctx = TaskContext()
            ops = BankOps(self.ctx, tasks)
            fam = family_of(adapter_config) if adapter_config is not None else None
            modules = fam.bank_modules(adapter_config, vit, ops) if fam else {}
            self.bank = Bank(modules, ops.linear(int(vit.embed_dim), classes))
            if fam:
                fam.bank_wire(adapter_config, vit, modules)
            vit.head = BankHead(self.bank.head)
            self.vit = vit

        def forward(self, x, task_id):
            self.ctx.task_id = task_id
            try:
                return self.vit(x)
            finally:
                self.ctx.task_id = None

    return {**ops_classes, "MultiTaskModel": MultiTaskModel}


def build_multitask_model(ckpts: Sequence, max_classes: int, backbone_weights=None):
    """The PyTorch multi-task model of ``ckpts`` (bank filled) and its bank tensors by initializer name.

    Args:
        ckpts: loaded checkpoints in their export layout (``Checkpoint.for_export()``), already checked
            to share one model (:func:`atexport.artifact.fit.check_same_family`).
        max_classes: width of the logits.
        backbone_weights: as in :func:`atexport.models.create_backbone`.

    Returns:
        ``(module, layout, bank)``: the eval-mode module (``module(x, task_id)``), the bank layout
        (:func:`~atexport.artifact.bank.bank_layout`, with the family's bank tensors) and
        ``{initializer: torch tensor [K, ...]}``.
    """
    import torch

    from atexport.adapters import family_of
    from atexport.checkpoint import check_fingerprint
    from atexport.models import create_backbone

    first = ckpts[0]
    vit = create_backbone(first.model, weights=backbone_weights)
    check_fingerprint(first.fingerprint, vit, f"checkpoint {first.path or ''}".strip())
    if not hasattr(vit, "blocks") or not isinstance(vit.blocks, torch.nn.Sequential) or not hasattr(vit, "head"):
        raise IncompatibleCheckpointError(
            f"{first.model.backbone} has no 'blocks' sequence and 'head'; multi-task export needs a timm ViT-family model."
        )
    ad = first.adapter
    dim = int(vit.embed_dim)
    tensors = family_of(ad).bank_tensors(ad, dim, len(vit.blocks)) if ad is not None else []
    layout = bank_layout(dim, None, [], max_classes, tensors=tensors)
    manifest = bank_manifest(layout, len(ckpts))
    slices = [task_slices(manifest, ck.task_weights().arrays, f"checkpoint {ck.path or ck.name}") for ck in ckpts]
    model = _classes()["MultiTaskModel"](vit, len(ckpts), ad, max_classes)
    params = dict(model.named_parameters())
    banked = {n for n in params if n.startswith(BANK_PREFIX)}
    wrong = [n for n in layout if n in params and list(params[n].shape) != [len(ckpts), *layout[n]["shape"]]]
    if set(layout) != banked or wrong:
        raise AtexportError(
            f"the {type(ad).__name__} bank layers do not match its bank tensors (missing "
            f"{sorted(set(layout) - banked)[:4]}, extra {sorted(banked - set(layout))[:4]}, other shapes {wrong[:4]}); "
            "a bug in its adapter family."
        )
    bank = {}
    with torch.no_grad():
        for name in layout:
            params[name].copy_(torch.from_numpy(np.stack([s[name] for s in slices])))
            bank[name] = params[name].detach().clone()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), layout, bank
