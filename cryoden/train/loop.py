"""Noise2Noise training loop: config -> mesh -> data -> state -> compiled step -> epochs.

``train(cfg)`` writes into ``RUN = cfg.run.out``::

    RUN/config.json        resolved config (a valid --config preset for a new run)
    RUN/data.json          names, sizes and fingerprints of the pairs (see datarecord)
    RUN/run.json           cryoden/jax versions, devices, and the command of every invocation
    RUN/train.log          text log
    RUN/log.tsv            epoch, step, train_loss (mean over the epoch), val_loss, best, ...
    RUN/checkpoints/<step> orbax checkpoints (state, grain iterator, meta)
    RUN/model.npz          best model by validation loss, cryoden weights format
                           (``cryoden infer --model RUN`` or ``--model RUN/model.npz``)
    RUN/previews/epochNNN.png  raw | denoised of a fixed held-out crop, every epoch
    RUN/report.html, loss.png  loss curves, epochs and previews, rewritten every epoch
                           (``run.preview``; see :mod:`cryoden.train.report`)

With ``run.patience = N`` the run stops after N epochs without a better validation loss (training
loss when nothing is held out); model.npz is the best model. The count follows from the saved
best step, so a stopped run started again stays stopped (a larger patience continues it).

Started again with the same ``RUN``, it resumes from the newest valid checkpoint; the result
is bitwise the same as an uninterrupted run on CPU. A resumed run must have the same config
(except run length and checkpoint options) and the same data.

Everything is validated (config, devices and batch size, pairs, dimensionality, crop, image
statistics, the ``--init`` model, the saved config and data of a resumed run) before anything
is written into ``RUN``: a failed start leaves no trace, and the corrected command just works.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cryoden
from cryoden import atomic, weights
from cryoden.models import init_params
from cryoden.train import checkpoint, data, datarecord, mesh, moviedata, step
from cryoden.train.config import Config, resume_conflicts

log = logging.getLogger("cryoden.train")
TSV_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "best_val_loss", "gamma", "seconds")


class _Stop:
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, exit (single process).

    A second Ctrl-C interrupts at once. Multi-process runs rely on jax's preemption sync point
    instead (all processes must stop at the same step).
    """

    def __init__(self):
        self.flag = threading.Event()
        self.old = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning(
            "signal %d: stopping after this step (checkpoint saved); again to abort", signum
        )
        self.flag.set()
        signal.signal(signum, self.old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)

    def requested(self, ckpt: checkpoint.Checkpoints, step_: int) -> bool:
        if jax.process_count() > 1:
            return ckpt.mngr.reached_preemption(step_)
        return self.flag.is_set()


def _check_run_dir(cfg: Config, record: list[dict[str, Any]]) -> bool:
    """Raise ValueError if RUN holds a run with another config or other data; writes nothing.

    Returns whether RUN has a data record (runs of older versions have none: it is added).
    """
    out = Path(cfg.run.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        try:
            saved = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{cfg_path}: unreadable ({e}); use another --out") from None
        conflicts = resume_conflicts(saved, cfg.to_dict())
        if conflicts:
            raise ValueError(
                f"{out} holds a run with a different config ({'; '.join(conflicts)});"
                " use another --out, or the same settings to resume it"
            )
    return datarecord.check(out, record)


def _setup_run_dir(
    cfg: Config, record: list[dict[str, Any]], has_record: bool, command: list[str] | None
) -> Path:
    """Create RUN, write config.json / data.json / run.json, log to a file (checked before)."""
    out = Path(cfg.run.out)
    main = mesh.is_main_process()
    cfg_path = out / "config.json"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(out)  # left by a killed earlier invocation
        atomic.write_text(cfg_path, json.dumps(cfg.to_dict(), indent=2) + "\n")
        if not has_record:
            atomic.write_text(out / datarecord.FILE, datarecord.to_json(record))
        info_path = out / "run.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {"invocations": []}
        info["invocations"].append(
            dict(
                command=command if command is not None else sys.argv,
                started=time.time(),
                cryoden=cryoden.__version__,
                jax=jax.__version__,
                devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                processes=jax.process_count(),
            )
        )
        atomic.write_text(info_path, json.dumps(info, indent=2) + "\n")
        logger = logging.getLogger("cryoden")
        for old in [h for h in logger.handlers if isinstance(h, _RunLog)]:
            logger.removeHandler(old)  # an earlier run in this process: its log is closed
            old.close()
        handler = _RunLog(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return out


class _RunLog(logging.FileHandler):
    """RUN/train.log; one at a time per process (a new run replaces the previous one's)."""


def _rewrite_tsv(path: Path, upto_step: int) -> None:
    """Start log.tsv, or keep only rows up to the restored step (drop rows of a lost epoch)."""
    rows = path.read_text().splitlines()[1:] if path.is_file() else []
    rows = [r for r in rows if r and int(r.split("\t")[1]) <= upto_step]
    atomic.write_text(path, "\n".join(["\t".join(TSV_COLUMNS), *rows]) + "\n")


def train(cfg: Config, command: list[str] | None = None, on_epoch=None) -> dict[str, Any]:
    """Run (or resume) training.

    on_epoch: called on the main process at the end of every epoch run here as
    ``on_epoch(epoch, improved, params)``: epoch counted from 1, whether it gave a new best
    model, and a function returning the current params (numpy) when called.

    Returns ``{'step', 'best_val_loss', 'best_step', 'interrupted'}`` and, when finished,
    ``'model'`` (path of the exported best model) and ``'params'`` (final params, numpy).
    """
    cfg.validate()
    d, spec = cfg.data, cfg.model.spec
    main = mesh.is_main_process()

    # ------------------------------------------------------------------ mesh (nothing written
    # into RUN until the run directory section: every check that can fail comes first)
    devices = mesh.make_mesh()
    val_bs = d.val_batch_size or d.batch_size
    mesh.check_batch_size(d.batch_size, devices)
    mesh.check_batch_size(val_bs, devices, "validation batch size")
    log.info("mesh: %s", mesh.describe(devices))

    # ------------------------------------------------------------------ data
    if d.movies:  # movies: checked now, aligned and cached into RUN/movies once RUN is set up
        gain = moviedata.GainSpec(d.gain, d.gain_rot, d.gain_flip, d.defects)
        pairs = moviedata.find_movies(d.movies)
        train_pairs, val_pairs = data.split_holdout(pairs, d.holdout, cfg.run.seed)
        if spec.ndim != 2:
            raise ValueError(f"--movies gives 2D images: a {spec.ndim}D model cannot train on them")
        moviedata.check_movies(pairs, gain, d.crop)
        record = moviedata.describe(pairs, gain)
    else:
        pairs = data.find_pairs(d.even, d.odd)
        train_pairs, val_pairs = data.split_holdout(pairs, d.holdout, cfg.run.seed)
        first = data.open_half(train_pairs[0][0])
        if first.ndim != spec.ndim:
            raise ValueError(
                f"{train_pairs[0][0]}: {first.ndim}D data for a {spec.ndim}D model "
                f"({spec.arch}); pick a {first.ndim}D --arch/--config"
            )
        data.check_crop(train_pairs + val_pairs, d.crop, spec.ndim)
        data.check_stats(pairs)  # constant or non-finite halves, before the first epoch ends
        record = datarecord.describe(pairs)
    train_source, val_source = train_pairs, val_pairs
    samples_per_epoch = len(train_pairs) * d.samples_per_pair
    steps_per_epoch = max(1, math.ceil(samples_per_epoch / d.batch_size))
    total_steps = cfg.run.steps or cfg.run.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    def make_iterator():
        return iter(
            data.train_dataset(
                train_source,
                ndim=spec.ndim,
                crop=d.crop,
                batch_size=d.batch_size,
                seed=cfg.run.seed,
                samples_per_epoch=samples_per_epoch,
                augment=d.augment,
                swap=d.swap,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                num_workers=d.num_workers,
            )
        )

    iterator = None if d.movies else make_iterator()
    log.info(
        "data: %d training / %d validation pairs; %d steps per epoch of %d crops %s; "
        "%d steps in %d epochs",
        len(train_pairs),
        len(val_pairs),
        steps_per_epoch,
        d.batch_size,
        (d.crop,) * spec.ndim,
        total_steps,
        epochs,
    )
    if not val_pairs:
        log.warning(
            "no validation pairs (holdout %.2f of %d pairs): the best model is chosen "
            "by training loss",
            d.holdout,
            len(pairs),
        )

    init_params_, inputs = None, []
    if cfg.model.init:
        init_params_, init_spec, _ = weights.load(cfg.model.init)
        if init_spec != spec:
            raise ValueError(f"--init {cfg.model.init} is {init_spec}, the config asks {spec}")
        inputs = [weights.locate(cfg.model.init)[0]]
    # the exported model may never replace the --init file (RUN/model.npz given as --init)
    weights.check_destination(Path(cfg.run.out) / weights.MODEL_FILE, inputs)

    # ------------------------------------------------------------------ run directory
    has_record = _check_run_dir(cfg, record)
    out = _setup_run_dir(cfg, record, has_record, command)
    if d.movies:
        train_source, val_source = moviedata.prepare(
            train_pairs, val_pairs, gain, out, split=d.split, seed=cfg.run.seed
        )
        iterator = make_iterator()

    # ------------------------------------------------------------------ state (born replicated)
    optimizer = step.make_optimizer(cfg.optim)
    key = jax.random.key(cfg.run.seed)

    def fresh_state(params=None):
        k_init, k_state = jax.random.split(key)
        params = init_params(spec, k_init) if params is None else params
        return step.init_state(params, optimizer, k_state)

    abstract = jax.eval_shape(fresh_state)
    repl = mesh.replicated(devices)
    state_sh = jax.tree.map(lambda _: repl, abstract)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )

    # ------------------------------------------------------------------ checkpoints, resume
    ends = {min((e + 1) * steps_per_epoch, total_steps) for e in range(epochs)}
    ckpt = checkpoint.Checkpoints(
        out / "checkpoints",
        epoch_end_steps=ends,
        keep_latest=cfg.run.keep_latest,
        keep_best=cfg.run.keep_best,
        save_every_steps=cfg.run.save_every_steps,
        async_save=cfg.run.async_save,
    )
    restored = ckpt.restore_latest(abstract, iterator)
    if restored is not None:
        state, meta = restored
        log.info("resumed from %s at step %d", ckpt.directory, meta["step"])
    elif init_params_ is not None:
        params = mesh.replicate_from_host(init_params_, devices)
        state = jax.jit(fresh_state, out_shardings=state_sh)(params)
        meta = {}
        log.info("initialised from %s", cfg.model.init)
    else:
        state = jax.jit(fresh_state, out_shardings=state_sh)()
        meta = {}
    cur = int(mesh.to_host(state["step"]))
    best = math.inf if meta.get("best") is None else meta["best"]
    best_step = meta.get("best_step")
    ep_sum, ep_n = meta.get("epoch_loss_sum", 0.0), meta.get("epoch_loss_n", 0)
    if main:
        _rewrite_tsv(out / "log.tsv", cur)
    patience = cfg.run.patience
    stale = _epochs_without_improvement(cur, best_step, steps_per_epoch)
    stopped = patience is not None and cur % steps_per_epoch == 0 and stale >= patience
    if cur >= total_steps or stopped:
        ckpt.close()
        if stopped and cur < total_steps:
            log.info(
                "already stopped early (no improvement for %d epochs); model %s",
                stale,
                out / weights.MODEL_FILE,
            )
        else:
            log.info("already finished (%d steps); model %s", cur, out / weights.MODEL_FILE)
        return dict(
            step=cur,
            best_val_loss=best,
            best_step=best_step,
            interrupted=False,
            stopped_early=stopped and cur < total_steps,
            model=str(out / weights.MODEL_FILE),
            params=mesh.to_host(state["params"]),
        )
    shown = (val_pairs, train_pairs)
    if d.movies and main and cfg.run.preview:  # previews show a movie's even half sum
        view = (val_source, 0) if val_pairs else (train_source, 0)
        half = [(moviedata.even_half_file(*view, out),)]
        shown = (half, []) if val_pairs else ([], half)
    previewer = _previewer(cfg, *shown) if main and cfg.run.preview else None

    # ------------------------------------------------------------------ compiled steps
    bsh = mesh.batch_sharding(devices)
    shape = (d.batch_size,) + (d.crop,) * spec.ndim + (1,)
    batch_abs = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh) for k in ("source", "target")
    }
    t0, cached = time.time(), _CacheHits()
    with cached:
        train_step = (
            jax.jit(
                step.make_train_step(cfg, optimizer, steps_per_epoch, epochs),
                in_shardings=(state_sh, bsh),
                out_shardings=(state_sh, repl),
                donate_argnums=0,
            )
            .lower(abstract, batch_abs)
            .compile()
        )
    log.info(
        "compiled train step in %.1f s%s: %s",
        time.time() - t0,
        " (from the persistent compilation cache)" if cached.hits else "",
        _describe(train_step),
    )
    eval_step = jax.jit(
        step.make_eval_step(cfg), in_shardings=(state_sh["params"], bsh), out_shardings=(repl, repl)
    )

    def finished(stopped_early: bool) -> dict[str, Any]:
        """The result of a run that ended normally (the state as it is now)."""
        return dict(
            step=cur,
            best_val_loss=best,
            best_step=best_step,
            model=str(out / weights.MODEL_FILE),
            interrupted=False,
            stopped_early=stopped_early,
            params=mesh.to_host(state["params"]),
        )

    def validate(params) -> float:
        sums = [
            eval_step(params, mesh.global_batch(mesh.local_slice(b), devices))
            for b in data.val_batches(val_source, ndim=spec.ndim, crop=d.crop, batch_size=val_bs)
        ]
        s = mesh.to_host(sums)
        return float(
            np.sum([x for x, _ in s], dtype=np.float64)
            / np.sum([w for _, w in s], dtype=np.float64)
        )

    # ------------------------------------------------------------------ loop
    from tqdm.auto import tqdm

    with _Stop() as stop:
        while cur < total_steps:
            epoch = cur // steps_per_epoch
            end = min((epoch + 1) * steps_per_epoch, total_steps)
            t_epoch, losses, interrupted = time.time(), _Mean(ep_sum, ep_n), False
            bar = tqdm(
                total=end - epoch * steps_per_epoch,
                initial=cur - epoch * steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="step",
                leave=False,
                # None: tqdm shows the bar on a terminal only, not in a log file
                disable=None if main and cfg.run.progress else True,
            )
            while cur < end:
                ckpt.check()  # a failed background save stops the run at once
                batch = mesh.global_batch(next(iterator), devices)
                state, metrics = train_step(state, batch)
                cur += 1
                losses.add(metrics["loss"])
                bar.update(1)
                if cur % 10 == 0 or cur == end:
                    bar.set_postfix(loss=f"{losses.mean():.4g}")
                interrupted = stop.requested(ckpt, cur)
                if cur < end and (interrupted or ckpt.should_save(cur)):
                    part = dict(
                        epoch_loss_sum=losses.sum(),
                        epoch_loss_n=losses.n,
                        best=_finite(best),
                        best_step=best_step,
                    )
                    ckpt.save(cur, state, iterator, part, force=interrupted)
                if interrupted:
                    break
            bar.close()
            if interrupted and cur < end:
                ckpt.close()
                log.warning("interrupted at step %d; run the same command to resume", cur)
                return dict(step=cur, best_val_loss=best, best_step=best_step, interrupted=True)

            # -------------------------------------------------------------- end of epoch
            train_loss = losses.mean()
            ep_sum, ep_n = 0.0, 0
            val_loss = validate(state["params"]) if val_pairs else math.nan
            select = val_loss if val_pairs else train_loss
            improved = select < best
            if improved:
                best, best_step = select, cur
                if main:
                    weights.save(
                        out / weights.MODEL_FILE,
                        mesh.to_host(state["params"]),
                        spec,
                        inputs=inputs,
                        config=cfg.to_dict(),
                        step=cur,
                        epoch=epoch + 1,
                        val_loss=None if math.isnan(val_loss) else val_loss,
                        train_loss=train_loss,
                        cryoden_version=cryoden.__version__,
                        source="cryoden.train",
                    )
            if on_epoch is not None and main:
                on_epoch(epoch + 1, improved, lambda s=state: mesh.to_host(s["params"]))
            gamma = float(mesh.to_host(metrics["gamma"])) if cfg.optim.loss == "L0" else None
            row = (
                epoch + 1,
                cur,
                f"{train_loss:.6g}",
                f"{val_loss:.6g}",
                f"{best:.6g}",
                "-" if gamma is None else f"{gamma:.4g}",
                f"{time.time() - t_epoch:.1f}",
            )
            log.info(
                "epoch %d/%d step %d: train %.5g val %.5g best %.5g (%.1f s)",
                epoch + 1,
                epochs,
                cur,
                train_loss,
                val_loss,
                best,
                time.time() - t_epoch,
            )
            if main:
                with open(out / "log.tsv", "a") as f:
                    f.write("\t".join(map(str, row)) + "\n")
            ckpt.save(
                cur,
                state,
                iterator,
                dict(epoch_loss_sum=0.0, epoch_loss_n=0, best=_finite(best), best_step=best_step),
                metric=select,
            )
            stale = _epochs_without_improvement(cur, best_step, steps_per_epoch)
            early = patience is not None and stale >= patience and cur < total_steps
            if early:
                status = (
                    f"Stopped early after epoch {epoch + 1} of {epochs}: the "
                    f"{'validation' if val_pairs else 'training'} loss has not improved for "
                    f"{stale} epochs (--patience {patience}); "
                    + (
                        "no finite loss, no model.npz."
                        if best_step is None
                        else f"model.npz is the best model, epoch "
                        f"{math.ceil(best_step / steps_per_epoch)}, loss {best:.5g}."
                    )
                )
                log.info("early stop: %s", status)
            elif cur >= total_steps:
                status = f"Finished: {epochs} epochs; model.npz is the best model, loss {best:.5g}."
            else:
                status = f"Running: epoch {epoch + 1} of {epochs} done."
            if previewer is not None:
                _show(previewer, out, state["params"], epoch + 1, status)
            if early:
                ckpt.close()
                return finished(stopped_early=True)
            if stop.requested(ckpt, cur) and cur < total_steps:
                ckpt.close()
                log.warning("interrupted at step %d; run the same command to resume", cur)
                return dict(step=cur, best_val_loss=best, best_step=best_step, interrupted=True)
    ckpt.close()
    log.info(
        "done: %d steps; best loss %.5g at step %s; model %s",
        cur,
        best,
        best_step,
        out / weights.MODEL_FILE,
    )
    return finished(stopped_early=False)


def _epochs_without_improvement(cur: int, best_step: int | None, steps_per_epoch: int) -> int:
    """Finished epochs since the epoch of the best loss (all of them while no loss was finite)."""
    if best_step is None:
        return cur // steps_per_epoch
    return cur // steps_per_epoch - math.ceil(best_step / steps_per_epoch)


def _previewer(cfg: Config, val_pairs, train_pairs):
    """The run's :class:`report.Previewer` (held-out pair first), or None with a warning."""
    from cryoden.train import report

    pair, held_out = (val_pairs[0], True) if val_pairs else (train_pairs[0], False)
    try:
        return report.Previewer(pair, cfg.model.spec, held_out, dtype=cfg.model.dtype)
    except (ValueError, OSError) as e:
        log.warning("no previews: %s", " ".join(str(e).split()))
        return None


def _show(previewer, out: Path, params, epoch: int, status: str) -> None:
    """Write this epoch's preview and rewrite report.html; a failure only warns (training goes
    on: the pictures are not worth a run)."""
    from cryoden.train import report

    try:
        previewer.render(mesh.to_host(params), out / report.preview_name(epoch), epoch)
        report.write_report(out, status, previewer.describe())
    except (ValueError, OSError, RuntimeError) as e:
        log.warning("epoch %d: preview or report not written: %s", epoch, " ".join(str(e).split()))


class _CacheHits:
    """Counts jax's persistent compilation cache hits while active (``with``)."""

    EVENT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.hits = 0

    def _listen(self, event: str, **kwargs) -> None:
        self.hits += event == self.EVENT

    def __enter__(self):
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._listen)


def _describe(compiled) -> str:
    """FLOPs and device memory of a compiled step, for the log (whatever the backend reports)."""
    parts = []
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        parts.append(f"{float(cost.get('flops', 0.0)) / 1e9:.3g} GFLOP per step")
        mem = compiled.memory_analysis()
        total = sum(getattr(mem, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
        parts.append(f"{total / 2**20:.0f} MiB per device (args + outputs + temporaries)")
    except Exception:  # analyses are optional per backend
        pass
    return ", ".join(parts) or "no cost analysis"


class _Mean:
    """Running mean of replicated scalar losses; fetched to the host in float64 lazily."""

    def __init__(self, total: float = 0.0, n: int = 0):
        self.total, self.n, self.pending = float(total), int(n), []

    def add(self, x: jax.Array) -> None:
        self.pending.append(x)

    def sum(self) -> float:
        if self.pending:
            self.total += float(np.sum(np.asarray(mesh.to_host(self.pending), np.float64)))
            self.n += len(self.pending)
            self.pending = []
        return self.total

    def mean(self) -> float:
        s = self.sum()
        return s / self.n if self.n else math.nan


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x
