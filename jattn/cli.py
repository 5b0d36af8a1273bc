"""The `jattn` command line.

    jattn demo      contextual attention fills a hole in a bundled photo (offline)
    jattn devices   the JAX devices this process sees

JAX and the models are imported inside each command, so `jattn --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2, no traceback."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from jattn.demo import run_demo

    result = run_demo(args.output, photo=args.photo, size=args.size, block_size=args.block_size)
    print(json.dumps(result))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    del args
    import jax

    info = {
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": [str(d) for d in jax.local_devices()],
        "device_count": jax.device_count(),
    }
    print(json.dumps(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jattn", description="Attention-based image models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fill a hole in a bundled photo with contextual attention (offline)")
    demo.add_argument("--output", default="demo_out", help="folder for the PNGs (default: demo_out)")
    demo.add_argument("--photo", default="astronaut", help="a scikit-image bundled photo (default: astronaut)")
    demo.add_argument("--size", type=int, default=256, help="square size the photo is resized to (default 256)")
    demo.add_argument("--block-size", type=int, default=None, help="evaluate the attention in blocks of this many queries")
    demo.set_defaults(func=_cmd_demo)

    devices = sub.add_parser("devices", help="print the JAX devices this process sees")
    devices.set_defaults(func=_cmd_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"jattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
