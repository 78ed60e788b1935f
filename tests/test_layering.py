"""The layering of docs/architecture.md, checked: no import circles, no upward imports, and an app that has
only the ``[runtime]`` extra (numpy, Pillow, onnxruntime: no torch, timm or onnx) runs every kind of model.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "atexport"

# layer -> module prefixes it may NOT import (see docs/architecture.md)
FORBIDDEN = {
    "atexport.artifact": ("atexport.runtime", "atexport.parity", "atexport.export", "atexport.verify", "atexport.deploy",
                          "atexport.benchmark", "atexport.checkpoint", "atexport.training", "atexport.cli",
                          "atexport.models", "atexport.adapter", "atexport.data"),
    "atexport.runtime": ("atexport.export", "atexport.checkpoint", "atexport.verify", "atexport.deploy",
                         "atexport.benchmark", "atexport.training", "atexport.cli", "atexport.parity"),
    "atexport.parity": ("atexport.export", "atexport.verify", "atexport.deploy", "atexport.benchmark", "atexport.cli",
                        "atexport.training"),
    "atexport.verify": ("atexport.export", "atexport.deploy", "atexport.benchmark", "atexport.cli"),
    "atexport.deploy": ("atexport.export", "atexport.verify", "atexport.benchmark", "atexport.cli"),
    "atexport.benchmark": ("atexport.export", "atexport.verify", "atexport.deploy", "atexport.cli"),
    "atexport.utils": ("atexport.artifact", "atexport.runtime", "atexport.export", "atexport.checkpoint"),
    # the torch side (3b) and the runtime (3a) stand side by side: neither imports the other
    "atexport.adapters": ("atexport.runtime", "atexport.export", "atexport.verify", "atexport.cli"),
    "atexport.data": ("atexport.runtime", "atexport.export", "atexport.verify", "atexport.cli"),
    "atexport.training": ("atexport.runtime", "atexport.export", "atexport.verify", "atexport.cli"),
    "atexport.checkpoint": ("atexport.runtime", "atexport.export", "atexport.verify", "atexport.cli"),
    "atexport.models": ("atexport.runtime", "atexport.export", "atexport.verify", "atexport.cli"),
    "atexport.errors": ("atexport.",),
}
HEAVY = ("torch", "timm", "torchvision")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at top level)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
    return out


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_imports(path):
    name = _module_name(path)
    rules = [v for k, v in FORBIDDEN.items() if name == k or name.startswith(k + ".")]
    bad = [m for m, _ in _imports(path) for banned in rules for b in banned
           if (m == b.rstrip(".") or m.startswith(b if b.endswith(".") else b + ".") or m == b)]
    assert not bad, f"{name} imports {bad}, against docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_heavy_libraries_are_imported_lazily(path):
    top = [m for m, is_top in _imports(path) if is_top and m.split(".")[0] in HEAVY]
    name = _module_name(path)
    torch_side = name.startswith(("atexport.adapters", "atexport.training", "atexport.data", "atexport.adapter",
                                  "atexport.models", "atexport.runtime.torch"))
    assert torch_side or not top, f"{name} imports {top} at module level; import it inside the function that needs it"


def test_no_import_cycles_between_packages():
    """atexport.X -> atexport.Y edges between subpackages (top-level and lazy imports alike) form no cycle."""
    def unit(mod: str) -> str:
        parts = mod.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else mod

    graph: dict[str, set[str]] = {}
    for path in MODULES:
        src = unit(_module_name(path))
        for m, _ in _imports(path):
            if m.startswith("atexport.") and unit(m) != src and unit(m) != "atexport.errors":
                graph.setdefault(src, set()).add(unit(m))
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    allowed = {"atexport.cli"}  # the face imports everything; nothing imports it
    cycles = [c for c in cycles if not set(c) & allowed]
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_import_cycles_between_modules():
    """Module -> module edges inside and across packages (top-level and lazy imports alike) form no cycle: a
    circle inside a package is as hard to change as one between packages. A module importing its own parent
    package is not counted (the package's ``__init__`` re-exports its children)."""
    names = {_module_name(p): p for p in MODULES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in names and t != name and not name.startswith(t + ".") and not t.startswith("atexport.cli"):
                    graph.setdefault(name, set()).add(t)
    cycles = []

    def visit(n, stack, on):
        for m in sorted(graph.get(n, ())):
            if m in on:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in done:
                on.add(m)
                visit(m, stack + [m], on)
                on.discard(m)
        done.add(n)

    done: set[str] = set()
    for n in sorted(graph):
        if n not in done and not n.startswith("atexport.cli"):
            visit(n, [n], {n})
    assert not cycles, f"import cycles between modules: {cycles[:3]}"


# ------------------------------------------------------------------------------- the [runtime] extra alone


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ckpt, tiny_ckpt_b):
    """Separable FP32, FP16 and INT8 models, a fused model, a multi-task model and a task .npz."""
    from atexport.checkpoint import export_task_weights
    from atexport.export.multitask import export_multitask
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import Int8Options, convert_precision
    from atexport.export.settings import ExportSettings

    d = tmp_path_factory.mktemp("layering")
    sep = export_onnx(tiny_ckpt, d / "sep.onnx", ExportSettings(separable=True, verify=False)).path
    return {
        "separable": sep,
        "fused": export_onnx(tiny_ckpt, d / "fused.onnx", ExportSettings(verify=False)).path,
        "fp16": convert_precision(sep, "fp16", d / "sep.fp16.onnx", verify=False).path,
        "int8": convert_precision(sep, "int8", d / "sep.int8.onnx", verify=False,
                                  int8=Int8Options(calib="digits", count=32, keep_float="none")).path,
        "multitask": export_multitask([tiny_ckpt, tiny_ckpt_b], d / "tasks.onnx", ExportSettings(verify=False)).path,
        "npz": export_task_weights(tiny_ckpt_b, d / "b.npz", name="b"),
    }


_BLOCK = """
import sys, importlib.abc
class _Absent(importlib.abc.MetaPathFinder):
    # what a machine with only 'pip install atexport[runtime]' has: no torch, timm, torchvision or onnx
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision", "onnx", "onnxscript", "onnxslim"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the [runtime] extra has no {name})")
sys.meta_path.insert(0, _Absent())
"""


def test_runtime_extra_alone_runs_every_kind_of_model(models, tmp_path):
    from _helpers import real_photos

    files = []
    for i, img in enumerate(real_photos()[:3]):
        files.append(tmp_path / f"p{i}.png")
        img.convert("RGB").save(files[-1])
    script = _BLOCK + textwrap.dedent(f"""
        import json
        from atexport.runtime import load_model
        from atexport.cli import main
        files = {[str(f) for f in files]!r}
        out = {{}}
        for kind in ("separable", "fused", "fp16", "int8"):
            out[kind] = [p.index for p in load_model({{k: v for k, v in {json.dumps({k: str(v) for k, v in models.items()})}.items()}}[kind]).predict(files)]
        m = load_model({str(models["separable"])!r}, task={str(models["npz"])!r})
        out["swapped"] = [p.task for p in m.predict(files)]
        mt = load_model({str(models["multitask"])!r})
        out["multitask"] = [p.task for p in mt.predict(files, task=[t for t in mt.tasks][:1] * len(files))]
        try:
            main(["predict", "--model", {str(models["int8"])!r}, *files])
        except SystemExit as e:
            assert not e.code, e.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "onnx")
                        or m.startswith(("atexport.export", "atexport.checkpoint", "atexport.training",
                                         "atexport.adapter", "atexport.models")))
        print(json.dumps({{"out": out, "loaded": loaded}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["loaded"] == [], f"the runtime loaded {doc['loaded']}"
    assert all(len(v) == 3 for v in doc["out"].values())
    assert doc["out"]["swapped"] == ["b"] * 3
    assert doc["out"]["separable"] == doc["out"]["fused"]  # same weights, two export forms


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            yield node, params


def test_functions_stay_small_outside_the_cli():
    """No function or method of the library (the click commands of ``atexport/cli`` aside: their parameters are
    their flags) is longer than 80 lines or takes more than 10 parameters, and none hides options in ``**kwargs``
    meant for itself: many options travel as one settings object made once (``ExportSettings``, ``Int8Options``,
    ``VerifySettings``, ``BenchSettings``, ...)."""
    too_big = []
    for path in MODULES:
        if "cli" in path.relative_to(PKG.parent).parts:
            continue
        for node, params in _functions(path):
            lines = node.end_lineno - node.lineno + 1
            if lines > 80 or len(params) > 10:
                too_big.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {lines} lines, {len(params)} "
                               "parameters")
    assert not too_big, "functions over 80 lines or 10 parameters:\n" + "\n".join(too_big)


def test_modules_stay_readable_in_one_sitting():
    """Every module of the library is about 600 lines at most (a file that mixes subjects becomes a package)."""
    long = [f"{p.relative_to(PKG.parent)}: {n}" for p in MODULES if (n := len(p.read_text().splitlines())) > 650]
    assert not long, f"modules over 650 lines: {long}"
