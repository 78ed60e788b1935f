"""The ``atexport`` command line: thin commands over the library.

Each command parses its options and calls one public function. Errors derived from
:class:`~atexport.errors.AtexportError` become one message on stderr and the error's exit code; a
traceback means a bug. Commands live one module each in this package.
"""

from __future__ import annotations

import sys

import click

from atexport import __version__
from atexport.errors import AtexportError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtexportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial files were left behind.", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="atexport")
def cli():
    """Train AdapterTune adapters on frozen timm ViTs and export them to verified ONNX, FP16/INT8 and TensorRT.

    \b
    Typical pipeline:
      atexport train --dataset digits -o runs/digits        # adapters + head, a ~1 MB run.pt
      atexport onnx --ckpt runs/digits/run.pt -o model.onnx # export + parity check
      atexport trt --onnx model.onnx --precision int8 --calib digits
      atexport verify --ckpt runs/digits/run.pt --onnx model.onnx --dataset digits
    """


def _register():
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(mod, "COMMANDS", ()):
            cli.add_command(getattr(mod, name))


_register()


def main(argv=None):
    cli.main(args=argv, prog_name="atexport")


if __name__ == "__main__":
    main()
