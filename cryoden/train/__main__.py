"""Train a Noise2Noise denoiser on paired even/odd halves (micrographs or tomograms).

Examples:
  # paper recipe (2D U-net, 800 crops, batch 4, Adagrad 1e-3, 100 epochs)
  cryoden train --even even/ --odd odd/ --out runs/mydata
  # fine-tune the general model, L1 loss, 20 epochs
  cryoden train --even even/ --odd odd/ --out runs/ft --init unet --loss L1 --epochs 20
  # 3D from half tomograms (preset train-3d is picked for 3D data)
  cryoden train --even tomo_half1.rec --odd tomo_half2.rec --out runs/tomo
  # straight from movies: fresh random halves of each movie's frames every epoch
  cryoden train --movies 'movies/*.tif' --gain gain.mrc --out runs/movies --init unet
  # use the result
  cryoden infer --model runs/mydata micrographs/*.mrc -o denoised/

RUN gets config.json (resolved config), data.json (names, sizes and fingerprints of the pairs),
run.json (versions, commands), train.log, log.tsv (per-epoch train and validation loss),
checkpoints/ and model.npz (best model by validation loss; give --model RUN or
--model RUN/model.npz to cryoden infer). Every epoch adds previews/epochNNN.png (a fixed
held-out crop, raw | denoised) and rewrites report.html (loss curves and previews; open it in a
browser). --patience N stops early when the validation loss has not improved for N epochs.
Starting the same command again resumes; a run refuses other data or other settings (except
run length, patience, previews and checkpoint options). Nothing is written into RUN before
every input has been checked.

Settings: a preset (--config; train-2d, or train-3d for 3D data), then --set
section.key=value (any config field), then the flags below. Compiled steps are kept in the
persistent compilation cache (env CRYODEN_CACHE_DIR; empty disables it).
Exit codes: 0 done, 1 failed (disk full, no usable checkpoint), 2 bad input or settings,
130 interrupted (checkpoint saved; run again to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from cryoden.train.config import default_help as dflt

    g = p.add_argument_group("data")
    g.add_argument(
        "--even",
        "-a",
        help="even halves: a directory (paired with --odd by name), or a file; "
        "default: none (give --even and --odd, or --movies)",
    )
    g.add_argument(
        "--odd",
        "-b",
        help="odd halves, paired with --even by name (identical names, or names differing by "
        "an EVN/ODD, even/odd or half1/half2 token); default: none",
    )
    g.add_argument(
        "--movies",
        metavar="DIR|GLOB",
        help="train straight from movies (MRC, TIFF, EER) instead of --even/--odd: each is "
        "aligned once and split into two halves of its frames afresh for every sample; "
        "default: none",
    )
    g.add_argument(
        "--gain", metavar="F", help="gain reference of --movies (MRC or TIFF); default: none"
    )
    g.add_argument(
        "--gain-rot",
        type=int,
        choices=range(4),
        help="rotate the gain 90 degrees clockwise this many times (RELION's --gain_rot); "
        "default: 0",
    )
    g.add_argument(
        "--gain-flip",
        type=int,
        choices=range(3),
        help="flip the gain: 1 upside down, 2 left to right (RELION's --gain_flip); default: 0",
    )
    g.add_argument(
        "--defects",
        metavar="F",
        help="defect map (image, nonzero = defect) or defect list (x y w h boxes) of --movies, "
        "as cryoden movies --defects: those pixels are filled from their neighbours; "
        "default: none",
    )
    g.add_argument(
        "--split",
        choices=["random", "even-odd"],
        help="how --movies frames form two halves: random (fresh equal halves each sample) or "
        f"even-odd (the paper's pairs); {dflt('data', 'split')}",
    )
    g.add_argument("--out", "-o", required=True, metavar="RUN", help="run directory")
    g.add_argument("--crop", type=int, help=f"training crop edge in pixels; {dflt('data', 'crop')}")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"GLOBAL batch size, over all devices; {dflt('data', 'batch_size')}",
    )
    g.add_argument(
        "--holdout",
        type=float,
        help=f"fraction of pairs held out for validation; {dflt('data', 'holdout')}",
    )
    g.add_argument(
        "--samples-per-pair",
        type=int,
        help=f"crops per pair per epoch; {dflt('data', 'samples_per_pair')}",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        help=f"grain worker processes (0: threads); {dflt('data', 'num_workers')}",
    )
    g = p.add_argument_group("model and optimisation")
    g.add_argument(
        "--config",
        help="preset name in configs/ (train-2d, train-3d, train-2d-test) or a JSON file; "
        "default: train-3d for 3D data or a 3D --arch, else train-2d",
    )
    g.add_argument(
        "--arch",
        help="unet, unet-small, fcnn, affine, unet-v0.2.1, unet-3d; "
        "default: from the preset (train-2d: unet, train-3d: unet-3d)",
    )
    g.add_argument(
        "--init",
        metavar="MODEL",
        help="start from a pretrained name, weights file or run directory (its architecture "
        "is used); default: random initialisation",
    )
    g.add_argument(
        "--loss",
        choices=["L2", "L1", "L0"],
        help=f"training loss (L0: gamma annealed from 2 towards 0); {dflt('optim', 'loss')}",
    )
    g.add_argument(
        "--optim",
        choices=["adagrad", "adam", "sgd"],
        help=f"optimiser (SGD with Nesterov momentum); {dflt('optim', 'name')}",
    )
    g.add_argument("--lr", type=float, help=f"learning rate; {dflt('optim', 'lr')}")
    g.add_argument(
        "--weight-decay",
        type=float,
        help=f"L2 penalty added to the gradient; {dflt('optim', 'weight_decay')}",
    )
    g.add_argument(
        "--momentum", type=float, help=f"SGD momentum (Nesterov); {dflt('optim', 'momentum')}"
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help=f"compute dtype (parameters stay float32); {dflt('model', 'dtype')}",
    )
    g.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any config field (repeatable), e.g. --set optim.adagrad=optax; "
        "values are JSON (numbers, true/false, null) or strings",
    )
    g = p.add_argument_group("run")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"number of epochs; {dflt('run', 'epochs')}")
    length.add_argument("--steps", type=int, help="total steps, instead of --epochs; default: none")
    g.add_argument("--seed", type=int, help=f"random seed; {dflt('run', 'seed')}")
    g.add_argument(
        "--keep", type=int, help=f"latest checkpoints to keep; {dflt('run', 'keep_latest')}"
    )
    g.add_argument(
        "--keep-best",
        type=int,
        help=f"best checkpoints to keep (by validation loss); {dflt('run', 'keep_best')}",
    )
    g.add_argument(
        "--save-every",
        type=int,
        metavar="STEPS",
        help="also checkpoint every N steps (always at the end of each epoch); "
        + dflt("run", "save_every_steps"),
    )
    g.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="stop when the validation loss (training loss without a holdout) has not improved "
        "for N epochs; model.npz stays the best model; default: none (run every epoch)",
    )
    g.add_argument(
        "--no-preview",
        dest="preview",
        action="store_false",
        default=None,
        help="no RUN/previews/epochNNN.png and RUN/report.html (default: written every epoch)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g = p.add_argument_group("multi-process (see scripts/)")
    g.add_argument(
        "--distributed",
        choices=["auto", "on", "off"],
        default="auto",
        help="jax.distributed.initialize: auto = when a coordinator or several "
        "Slurm tasks are present; on = always (TPU pods, other clusters); default: auto",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address; default: env JAX_COORDINATOR_ADDRESS or cluster detection",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        help="number of processes; default: env JAX_NUM_PROCESSES or cluster detection",
    )
    g.add_argument(
        "--process-id",
        type=int,
        help="this process's index; default: env JAX_PROCESS_ID or cluster detection",
    )
    return p


def main(args: argparse.Namespace) -> int:
    from cryoden import runtime
    from cryoden.train import mesh

    runtime.keep_host_memory()  # before JAX starts its threads
    mesh.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
    runtime.setup(cache=True)  # persistent compilation cache: resumes do not recompile
    import jax

    from cryoden.progress import StderrHandler
    from cryoden.train import checkpoint, config, loop

    logger = logging.getLogger("cryoden")  # own handler: orbax/absl take over the root logger
    logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logger.propagate = False
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
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
    except (checkpoint.CheckpointError, OSError, MemoryError) as e:  # the run cannot go on
        print(f"cryoden train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(
            "cryoden train: interrupted; complete checkpoints are kept: run the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130
    return 130 if result["interrupted"] else 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if not isinstance(e, MemoryError) else f"out of memory ({text})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m cryoden.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sys.exit(main(add_args(parser).parse_args()))
