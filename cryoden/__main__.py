"""Noise2Noise denoising of cryo-EM micrographs and cryo-ET tomograms: Topaz-Denoise's models
and numbers, in JAX.

examples:
  cryoden infer micrographs/*.mrc -o denoised/              denoise micrographs (model unet)
  cryoden infer tomo.rec -o denoised/ --model unet-3d-20a   denoise a tomogram
  cryoden movies movies/*.tif -o aligned/ --gain gain.mrc   align movies, write even/odd sums
  cryoden train --even even/ --odd odd/ --out runs/mine     train on your own even/odd halves
  cryoden infer micrographs/*.mrc -o denoised/ --model runs/mine
  cryoden evaluate --even even/ --odd odd/ -m unet -m runs/mine -o eval/   compare: split SNR
  cryoden convert model_epoch100.sav -o model.npz           use a model trained with Topaz
  cryoden relion denoise --o External/job003/ --in_mics MotionCorr/job002/corrected_micrographs.star
                                                            as a RELION External job

'cryoden COMMAND --help' describes a command and its options. The README and the docs/ folder
of the cryoden source (architecture, inference, training, weights, SNR) explain the details.
Denoised images are for visualisation, picking and segmentation: extract particles for
reconstruction from the raw data.
"""

# Developer note: each command is one module with ``add_args(parser)`` and ``main(args) -> int``,
# imported only when chosen, so a command that is missing or broken does not affect the others.
# Its docstring is the command's help text, shown as plain text (``_plain``).

from __future__ import annotations

import argparse
import importlib
import re
import sys

from cryoden import __version__

COMMANDS = {
    "infer": ("cryoden.infer", "denoise micrographs, image stacks and tomograms"),
    "train": (
        "cryoden.train.__main__",
        "train a denoiser on even/odd halves of micrographs or tomograms",
    ),
    "evaluate": ("cryoden.evaluate", "measure denoising on even/odd halves: split SNR, FRC..."),
    "movies": ("cryoden.movies", "align movies; write aligned sums and even/odd half sums"),
    "convert": ("cryoden.convert", "convert Topaz/PyTorch weights (.sav, .pt) to cryoden's format"),
    "relion": ("cryoden.relion", "RELION External jobs: denoise, train, tomo-denoise, tomo-train"),
}

_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|obj|exc):`~?([^`]+)`")


def _plain(doc: str | None) -> str | None:
    """A docstring as plain help text: ``:mod:`x``` and ````x```` become ``x``, ``Example::``
    becomes ``Example:``."""
    if not doc:
        return doc
    doc = _ROLE.sub(r"\1", doc).replace("``", "")
    return re.sub(r"(\S)::$", r"\1:", doc, flags=re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    summary, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="cryoden",
        description=summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cryoden {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            parser.exit(2, f"cryoden: error: command {name!r} is unavailable ({e})\n")
        p.description = _plain(mod.__doc__)
        mod.add_args(p)
        p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
