"""The ``cryoden`` command line: ``cryoden COMMAND [options]``; ``cryoden COMMAND -h`` for help.

Commands (each one module with ``add_args(parser)`` and ``main(args) -> int``, imported only
when chosen, so one that is missing or broken does not affect the others):

- ``infer``: denoise micrographs, stacks and tomograms (:mod:`cryoden.infer`);
- ``convert``: convert Topaz weights to cryoden's format (:mod:`cryoden.convert`);
- ``train``: train a Noise2Noise denoiser (:mod:`cryoden.train.__main__`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryoden import __version__

COMMANDS = {
    "infer": ("cryoden.infer", "denoise micrographs, stacks and tomograms"),
    "convert": ("cryoden.convert", "convert Topaz weights to cryoden's format"),
    "train": ("cryoden.train.__main__", "train a Noise2Noise denoiser"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="cryoden", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cryoden {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            parser.exit(2, f"cryoden: error: command {name!r} is unavailable ({e})\n")
        p.description = mod.__doc__
        mod.add_args(p)
        p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
