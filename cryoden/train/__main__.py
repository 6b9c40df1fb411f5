"""Train a Noise2Noise denoiser on paired even/odd halves (micrographs or tomograms).

Examples:
  # paper recipe (2D U-net, 800 crops, batch 4, Adagrad 1e-3, 100 epochs)
  python -m cryoden.train --even even/ --odd odd/ --out runs/mydata
  # fine-tune the general model, L1 loss, 20 epochs
  python -m cryoden.train --even even/ --odd odd/ --out runs/ft --init unet --loss L1 --epochs 20
  # 3D from half tomograms (preset train-3d is picked for 3D data)
  python -m cryoden.train --even tomo_half1.rec --odd tomo_half2.rec --out runs/tomo
  # use the result
  cryoden infer --model runs/mydata micrographs/*.mrc -o denoised/

RUN gets config.json (resolved config), run.json (versions, commands), train.log, log.tsv
(per-epoch train and validation loss), checkpoints/ and model.npz (best model by validation
loss; ``--model RUN`` or ``--model RUN/model.npz``). Starting the same command again resumes.
Flags override the preset; ``--set section.key=value`` reaches any config field.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("data")
    g.add_argument("--even", "-a", required=True, help="even halves: directory, file or list")
    g.add_argument("--odd", "-b", required=True, help="odd halves, paired with --even by name")
    g.add_argument("--out", "-o", required=True, metavar="RUN", help="run directory")
    g.add_argument("--crop", type=int, help="training crop edge in pixels (2D 800, 3D 96)")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch size, over all devices")
    g.add_argument("--holdout", type=float, help="fraction of pairs held out for validation")
    g.add_argument("--samples-per-pair", type=int, help="crops per pair per epoch (2D 1, 3D 1000)")
    g.add_argument("--num-workers", type=int, help="grain worker processes (0: threads)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--config", help="preset name in configs/ (train-2d, train-3d) or JSON path")
    g.add_argument("--arch", help="unet, unet-small, fcnn, affine, unet-v0.2.1, unet-3d")
    g.add_argument(
        "--init",
        metavar="MODEL",
        help="start from a pretrained name, weights file "
        "or run directory (its architecture is used)",
    )
    g.add_argument("--loss", choices=["L2", "L1", "L0"])
    g.add_argument("--optim", choices=["adagrad", "adam", "sgd"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float, help="SGD momentum (Nesterov)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype")
    g.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any config field, e.g. --set optim.adagrad=optax",
    )
    g = p.add_argument_group("run")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--steps", type=int, help="total steps (instead of --epochs)")
    g.add_argument("--seed", type=int)
    g.add_argument("--keep", type=int, help="latest checkpoints to keep (default 2)")
    g.add_argument("--keep-best", type=int, help="best checkpoints to keep (default 1)")
    g.add_argument("--save-every", type=int, metavar="STEPS", help="also checkpoint every N steps")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-process (see scripts/)")
    g.add_argument(
        "--distributed",
        choices=["auto", "on", "off"],
        default="auto",
        help="jax.distributed.initialize: auto = when a coordinator or several "
        "Slurm tasks are present; on = always (TPU pods, other clusters)",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def main(args: argparse.Namespace) -> int:
    from cryoden import runtime
    from cryoden.train import mesh

    runtime.keep_host_memory()  # before JAX starts its threads
    mesh.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
    import jax

    from cryoden.train import config, loop

    logger = logging.getLogger("cryoden")  # own handler: orbax/absl take over the root logger
    logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    try:
        cfg = config.from_args(args)
        if args.quiet:
            cfg = config.merge(cfg, {"run": {"progress": False}})
        result = loop.train(cfg, command=sys.argv)
    except ValueError as e:  # bad input or config: one line, no traceback
        print(f"cryoden train: error: {e}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m cryoden.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sys.exit(main(add_args(parser).parse_args()))
