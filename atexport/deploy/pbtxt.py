"""Protobuf text format for Triton's ``config.pbtxt``: a writer of the ModelConfig subset atexport writes, and
a small reader (no tritonclient or protobuf needed) that :func:`atexport.deploy.triton.validate_triton_repo`
reads every written config back with.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError

# --------------------------------------------------------------------------------------------------
# protobuf text format: writer and a small reader


def _quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(t: dict, indent: str = "  ") -> str:
    lines = [f"{indent}{{", f"{indent}  name: {_quote(t['name'])}", f"{indent}  data_type: {t['data_type']}",
             f"{indent}  dims: {_dims(t['dims'])}"]
    if t.get("reshape") is not None:
        lines.append(f"{indent}  reshape: {{ shape: {_dims(t['reshape'])} }}")
    if t.get("label_filename"):
        lines.append(f"{indent}  label_filename: {_quote(t['label_filename'])}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def render_config(config: dict) -> str:
    """``config.pbtxt`` text of a config dict (the subset of ModelConfig atexport writes)."""
    out = [f"name: {_quote(config['name'])}"]
    if config.get("backend"):  # a backend model (e.g. openvino) names its backend and model file
        out += [f"backend: {_quote(config['backend'])}",
                f"default_model_filename: {_quote(config['default_model_filename'])}"]
    else:
        out.append(f"platform: {_quote(config['platform'])}")
    out.append(f"max_batch_size: {int(config['max_batch_size'])}")
    for key in ("input", "output"):
        out.append(f"{key} [\n" + ",\n".join(_tensor_block(t) for t in config[key]) + "\n]")
    db = config.get("dynamic_batching")
    if db is not None:
        inner = []
        if db.get("preferred_batch_size"):
            inner.append(f"  preferred_batch_size: {_dims(db['preferred_batch_size'])}")
        if db.get("max_queue_delay_microseconds") is not None:
            inner.append(f"  max_queue_delay_microseconds: {int(db['max_queue_delay_microseconds'])}")
        out.append("dynamic_batching {\n" + "\n".join(inner) + ("\n" if inner else "") + "}")
    for g in config.get("instance_group") or []:
        out.append(f"instance_group [\n  {{\n    count: {int(g.get('count', 1))}\n    kind: {g['kind']}\n  }}\n]")
    params = config.get("parameters") or {}
    for k, v in params.items():
        out.append(f"parameters {{\n  key: {_quote(k)}\n  value: {{ string_value: {_quote(v)} }}\n}}")
    return "\n".join(out) + "\n"


_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}\[\]:,;<>]|[^\s{}\[\]:,;<>"\'#]+')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise BadInputError(f"config.pbtxt: cannot read it at character {pos}: {text[pos:pos + 20]!r}.")
        tok = m.group(0)
        pos = m.end()
        if tok.strip() and not tok.startswith("#"):
            out.append(tok)
    return out


_ESCAPES = re.compile(r"\\(.)")
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r"}


def _scalar(tok: str):
    if tok[0] in "\"'":
        return _ESCAPES.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), tok[1:-1])
    if tok in ("true", "True"):
        return True
    if tok in ("false", "False"):
        return False
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        return float(tok)
    except ValueError:
        return tok  # an enum name such as TYPE_FP32 or KIND_GPU


def parse_pbtxt(text: str) -> dict:
    """Parse protobuf text format into nested dicts; repeated fields become lists.

    Enough of the grammar for Triton configs: ``key: value``, ``key { ... }``, ``key: [ v, ... ]``,
    ``key [ { ... }, { ... } ]``, strings, numbers, enums and comments.

    Raises:
        BadInputError: the text is not valid protobuf text format.
    """
    toks = _tokens(text)
    pos = 0

    def expect(t):
        nonlocal pos
        if pos >= len(toks) or toks[pos] != t:
            got = toks[pos] if pos < len(toks) else "end of file"
            raise BadInputError(f"config.pbtxt: expected {t!r}, found {got!r}.")
        pos += 1

    def value():
        nonlocal pos
        t = toks[pos]
        if t in ("{", "<"):
            return message()
        if t == "[":
            pos += 1
            items = []
            while toks[pos] != "]":
                items.append(value())
                if toks[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        return _scalar(t)

    def message():
        nonlocal pos
        close = "}" if toks[pos] == "{" else ">"
        pos += 1
        out = fields(close)
        expect(close)
        return out

    def fields(stop):
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(toks) and toks[pos] != stop:
            key = toks[pos]
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
                raise BadInputError(f"config.pbtxt: expected a field name, found {key!r}.")
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            elif pos >= len(toks) or toks[pos] not in ("{", "<", "["):
                raise BadInputError(f"config.pbtxt: field {key!r} has no value.")
            v = value()
            if key in out:
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (v if isinstance(v, list) else [v])
            else:
                out[key] = v
            if pos < len(toks) and toks[pos] in (",", ";"):
                pos += 1
        return out

    try:
        result = fields(None)
    except IndexError:
        raise BadInputError("config.pbtxt: unexpected end of file (unbalanced brackets).") from None
    if pos != len(toks):
        raise BadInputError(f"config.pbtxt: unexpected {toks[pos]!r}.")
    return result


def read_triton_config(path: str | os.PathLike) -> dict:
    """Read a ``config.pbtxt`` into a dict (``input``/``output`` always lists)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such config.pbtxt.")
    cfg = parse_pbtxt(path.read_text())
    for key in ("input", "output", "instance_group"):
        if key in cfg and isinstance(cfg[key], dict):
            cfg[key] = [cfg[key]]
    return cfg
