"""``python -m disco_jax.convert FORMAT ARCH INPUT OUTPUT_DIR``: a torch checkpoint -> encoder dir.

The output directory is what ``teacher.init`` takes. The other way round,
``python -m disco_jax.convert export ENCODER_DIR OUTPUT [--to torchvision|detectron2]`` writes
an encoder directory (e.g. a trained student's ``W/encoder``) as a torch state dict or a
detectron2 ResNet backbone (``.pkl``). Bad input prints one ``error: ...`` line and exits with
status 2; so does a missing PyTorch (``pip install 'disco_jax[torch]'``). Installed, the same
command is ``disco-jax-convert``. XLA's C++ start-up lines are hidden (``TF_CPP_MIN_LOG_LEVEL=2``
where unset, before the backend starts); ``DISCO_JAX_VERBOSE=1`` shows them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from disco_jax import cli as cli_lib
from disco_jax.errors import ConfigError

_NO_TORCH = ("reading or writing PyTorch checkpoints needs torch, which is not installed:"
             " pip install 'disco_jax[torch]'")


def _kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers and booleans; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, int | None]:
    """(fn's result, None), or (None, BAD_INPUT) after one `error:` line for bad input or a
    missing torch; any other error propagates."""
    try:
        return fn(*args, **kwargs), None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"error: {_NO_TORCH}", file=sys.stderr)
    return None, cli_lib.BAD_INPUT


def export_main(argv: list[str]) -> int:
    from disco_jax import convert

    parser = argparse.ArgumentParser(
        prog="python -m disco_jax.convert export",
        description="Write a disco_jax encoder directory as a PyTorch / detectron2 checkpoint.",
    )
    parser.add_argument("encoder_dir", help="encoder directory (manifest + variables)")
    parser.add_argument("output", help="output file (.pth; .pkl for a detectron2 pickle)")
    parser.add_argument("--to", default="torchvision", choices=("torchvision", "detectron2"))
    parser.add_argument("--prefix", default="", help="prefix for every key (torchvision only)")
    args = parser.parse_args(argv)
    manifest, status = _guarded(convert.export_encoder, args.encoder_dir, args.output, args.to,
                                args.prefix)
    if status is not None:
        return status
    print(f"wrote {args.output}: {manifest['model']} as {args.to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from disco_jax import convert, models

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])

    parser = argparse.ArgumentParser(
        prog="python -m disco_jax.convert",
        description="Convert a PyTorch checkpoint into a disco_jax encoder directory.",
    )
    parser.add_argument("format", help=f"source format: {', '.join(convert.FORMATS)}")
    parser.add_argument("arch", help=f"architecture: {', '.join(models.list_models())}")
    parser.add_argument("input", help="the .pth / .pth.tar file (loaded with weights_only=True)")
    parser.add_argument("output_dir", help="encoder directory to write")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="checkpoint key or fnmatch pattern to skip on purpose (repeatable)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier width in the checkpoint (default: read from it)",
    )
    parser.add_argument(
        "--model-kwarg",
        action="append",
        default=[],
        type=_kwarg,
        metavar="KEY=VALUE",
        help="model option, e.g. width=0.5 or stem=cifar (repeatable)",
    )
    args = parser.parse_args(argv)
    manifest, status = _guarded(
        convert.convert_file,
        args.format,
        args.arch,
        args.input,
        args.output_dir,
        num_classes=args.num_classes,
        ignore=args.ignore,
        **dict(args.model_kwarg),
    )
    if status is not None:
        return status
    print(
        f"wrote {args.output_dir}: {manifest['model']} + {manifest['head']} head"
        f" (embed_dim {manifest['embed_dim']}), source sha256 {manifest['source_sha256'][:12]}..."
    )
    return 0


def cli() -> None:
    """The program (`python -m disco_jax.convert`, `disco-jax-convert`); argparse's own usage
    errors exit 2 as well."""
    cli_lib.quiet_start()
    sys.exit(main())


if __name__ == "__main__":
    cli()
