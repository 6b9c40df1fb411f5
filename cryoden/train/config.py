"""Training configuration: frozen dataclasses, JSON presets in ``configs/``, flag overrides.

A config has four sections (``model``, ``data``, ``optim``, ``run``). It is resolved from, in
increasing priority: dataclass defaults (the paper's 2D recipe), a preset (``configs/NAME.json``
or any JSON path; a partial dict of sections), ``--set section.key=value`` pairs, and the named
flags of ``python -m cryoden.train``. The resolved config is written to ``RUN/config.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # cryoden.models imports flax: not needed for --help
    from cryoden.models import ModelSpec


def config_dir() -> Path:
    """The presets: ``cryoden/configs`` in an installed wheel (where setuptools puts configs/),
    else the checkout's configs/."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if any(installed.glob("*.json")) else package.parent / "configs"


# --arch names (docs/architecture.md) -> ModelSpec fields
ARCHS: dict[str, dict[str, Any]] = {
    "unet": dict(arch="unet", ndim=2, base_width=11, top_width=5),
    "unet-v0.2.1": dict(arch="unet", ndim=2, base_width=7, top_width=3),
    "unet-small": dict(arch="unet-small", ndim=2, base_width=11, top_width=5),
    "fcnn": dict(arch="fcnn", ndim=2, base_width=11, top_width=5),
    "affine": dict(arch="affine", ndim=2, base_width=31, top_width=5),
    "unet-3d": dict(arch="unet", ndim=3, base_width=7, top_width=3),
    "unet-3d-10a": dict(arch="unet", ndim=3, base_width=7, top_width=3),
    "unet-3d-20a": dict(arch="unet", ndim=3, base_width=7, top_width=3),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (a :class:`ModelSpec`), optional pretrained start and compute dtype."""

    arch: str = "unet"
    ndim: int = 2
    base_width: int = 11
    top_width: int = 5
    init: str | None = None  # pretrained name, weights file or run directory to start from
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

    @property
    def spec(self) -> ModelSpec:
        from cryoden.models import ModelSpec

        return ModelSpec(self.arch, self.ndim, self.base_width, self.top_width)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Paired halves (or movies) and sampling. ``batch_size`` is global (all devices of all
    processes). ``movies``: a folder or glob of movies to train from instead of ``even``/``odd``
    (with ``gain``, ``gain_rot``, ``gain_flip`` as in RELION, ``defects``: a defect map or
    box list as ``cryoden movies --defects``, and ``split``: ``random`` or ``even-odd``
    partitions of each movie's frames)."""

    even: str = ""
    odd: str = ""
    movies: str = ""
    gain: str | None = None
    gain_rot: int = 0
    gain_flip: int = 0
    defects: str | None = None
    split: str = "random"
    crop: int = 800
    batch_size: int = 4
    val_batch_size: int | None = None  # default: batch_size
    holdout: float = 0.1
    samples_per_pair: int = 1  # training crops per training pair per epoch (Topaz 3D: 1000)
    augment: bool = True
    swap: bool = True
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Loss and optimiser. ``adagrad='torch'`` reproduces torch.optim.Adagrad exactly."""

    name: str = "adagrad"  # adagrad | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0  # added to the gradient (torch semantics)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    adagrad: str = "torch"  # torch (acc from 0, eps 1e-10 outside sqrt) | optax
    loss: str = "L2"  # L2 | L1 | L0 (gamma annealed 2 -> 0 over the epochs)
    l0_eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, seed, checkpoint policy."""

    out: str = ""
    epochs: int = 100
    steps: int | None = None  # total steps; overrides epochs when set
    seed: int = 0
    keep_latest: int = 2  # latest checkpoints kept
    keep_best: int = 1  # best-by-validation checkpoints kept
    save_every_steps: int | None = None  # extra checkpoints within epochs
    async_save: bool = True
    progress: bool = True
    patience: int | None = None  # stop after this many epochs without a better validation loss
    preview: bool = True  # RUN/previews/epochNNN.png and RUN/report.html every epoch


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return merge(cls(), d)

    def validate(self) -> Config:
        """Raise ValueError on values no run can use; returns self."""
        m, d, o, r = self.model, self.data, self.optim, self.run
        m.spec  # noqa: B018 (ModelSpec validates arch/ndim/widths)
        checks = [
            (m.dtype in ("float32", "bfloat16"), f"model.dtype {m.dtype!r}: float32 or bfloat16"),
            (d.crop > 0 and d.batch_size > 0, "data.crop and data.batch_size must be positive"),
            (
                d.crop >= m.spec.stride,
                f"data.crop {d.crop} is smaller than the {m.arch} network's stride "
                f"{m.spec.stride} (its poolings need at least that many pixels per axis)",
            ),
            (0.0 <= d.holdout < 1.0, f"data.holdout {d.holdout} must be in [0, 1)"),
            (d.samples_per_pair > 0, "data.samples_per_pair must be positive"),
            (
                d.val_batch_size is None or d.val_batch_size > 0,
                "data.val_batch_size must be positive",
            ),
            (d.num_workers >= 0, f"data.num_workers {d.num_workers} must be >= 0"),
            (d.split in ("random", "even-odd"), f"data.split {d.split!r}: random or even-odd"),
            (
                not (d.movies and (d.even or d.odd)),
                "give either --movies or --even/--odd, not both",
            ),
            (not d.gain or d.movies, "--gain applies to --movies only"),
            (not d.defects or d.movies, "--defects applies to --movies only"),
            (0 <= d.gain_rot <= 3, f"data.gain_rot {d.gain_rot} must be 0..3"),
            (0 <= d.gain_flip <= 2, f"data.gain_flip {d.gain_flip} must be 0..2"),
            (
                o.weight_decay >= 0 and o.momentum >= 0,
                "optim.weight_decay and momentum must be >= 0",
            ),
            (0 <= r.seed < 2**32, f"run.seed {r.seed} must be in [0, 2**32)"),
            (
                r.save_every_steps is None or r.save_every_steps > 0,
                f"run.save_every_steps {r.save_every_steps} must be positive",
            ),
            (o.name in ("adagrad", "adam", "sgd"), f"optim.name {o.name!r}: adagrad|adam|sgd"),
            (o.adagrad in ("torch", "optax"), f"optim.adagrad {o.adagrad!r}: torch|optax"),
            (o.loss in ("L2", "L1", "L0"), f"optim.loss {o.loss!r}: L2|L1|L0"),
            (o.lr > 0, "optim.lr must be positive"),
            (r.epochs > 0 and (r.steps is None or r.steps > 0), "epochs/steps must be positive"),
            (r.keep_latest >= 1 and r.keep_best >= 0, "run.keep_latest >= 1, keep_best >= 0"),
            (
                r.patience is None or r.patience >= 1,
                f"run.patience {r.patience} must be at least 1 epoch",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _typed(section: str, field: dataclasses.Field, value: Any) -> Any:
    """``value`` checked against the field's annotation (``int``, ``float | None``, ...).

    Integers are accepted for floats (and integral floats for ints); anything else of the wrong
    type, and non-finite numbers, raise ValueError naming ``section.key``.
    """
    kind = str(field.type).replace(" | None", "").strip()
    optional = "None" in str(field.type)
    if value is None and optional:
        return value
    ok = False
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind in ("int", "float") and type(value) in (int, float):
        if kind == "float":
            ok, value = math.isfinite(value), float(value)
        else:
            ok = type(value) is int or (math.isfinite(value) and value.is_integer())
            value = int(value) if ok else value
    elif kind == "str":
        ok = isinstance(value, str)
    if not ok:
        want = _KINDS.get(kind, kind) + (" or null" if optional else "")
        raise ValueError(f"{section}.{field.name} = {value!r}: expected {want}")
    return value


def merge(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with ``{section: {key: value}}`` applied; unknown sections or keys, and values
    of the wrong type, are errors (ValueError, one line)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"a config must be an object of sections {list(SECTIONS)}")
    changes = {}
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}; expected {list(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be an object of keys")
        sub = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(sub)}
        bad = sorted(set(values) - set(fields))
        if bad:
            raise ValueError(
                f"unknown config key(s) {bad} in section {section!r}; known: {sorted(fields)}"
            )
        typed = {k: _typed(section, fields[k], v) for k, v in values.items()}
        changes[section] = dataclasses.replace(sub, **typed)
    return dataclasses.replace(cfg, **changes)


def load_preset(name: str) -> dict[str, Any]:
    """Preset name (``train-2d`` -> ``configs/train-2d.json``) or JSON path -> overrides dict.

    Raises ValueError (one line naming the file) when it is missing, unreadable, not JSON, or
    not an object of known sections and keys with values of the right types.
    """
    path, presets = Path(name), config_dir()
    if not path.is_file():
        path = presets / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        known = sorted(p.stem for p in presets.glob("*.json")) if presets.is_dir() else []
        raise ValueError(f"{name}: no such config file or preset (presets: {known})")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        raise ValueError(
            f"{path}: a config is a JSON object of sections {list(SECTIONS)}, "
            f"not {kind.get(type(d), 'a number')}"
        )
    d.pop("description", None)
    try:
        merge(Config(), d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return d


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``['optim.lr=3e-4', 'data.augment=false']`` -> ``{'optim': {'lr': 3e-4}, ...}``.

    Values are parsed as JSON when possible (numbers, true/false, null), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def arch_fields(name: str) -> dict[str, Any]:
    """``--arch`` name -> ModelConfig fields (arch, ndim, base_width, top_width)."""
    if name not in ARCHS:
        raise ValueError(f"unknown --arch {name!r}; expected one of {sorted(ARCHS)}")
    return dict(ARCHS[name])


def with_init_spec(cfg: Config, spec: ModelSpec, arch_given: bool) -> Config:
    """Adopt a pretrained model's spec; an explicitly chosen architecture must match it."""
    if arch_given and cfg.model.spec != spec:
        raise ValueError(
            f"--init {cfg.model.init}: its architecture {spec} differs from the "
            f"requested {cfg.model.spec}; drop --arch or pick a matching model"
        )
    return merge(cfg, {"model": spec.to_dict()})


# Keys that may change when a run is resumed (the rest must equal the saved config).
RESUMABLE = {
    "run": {
        "epochs",
        "steps",
        "keep_latest",
        "keep_best",
        "save_every_steps",
        "async_save",
        "progress",
        "out",
        "patience",
        "preview",
    },
    "data": {"num_workers", "even", "odd", "movies", "gain", "defects"},
}


def resume_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: saved -> new`` for every difference a resumed run cannot absorb."""
    out = []
    for section, values in new.items():
        for k, v in values.items():
            old = saved.get(section, {}).get(k)
            if old != v and k not in RESUMABLE.get(section, ()):
                out.append(f"{section}.{k}: {old!r} -> {v!r}")
    return out


# flag dest -> (section, key); a flag left at None keeps the preset's value
FLAGS = {
    "even": ("data", "even"),
    "odd": ("data", "odd"),
    "movies": ("data", "movies"),
    "gain": ("data", "gain"),
    "gain_rot": ("data", "gain_rot"),
    "gain_flip": ("data", "gain_flip"),
    "defects": ("data", "defects"),
    "split": ("data", "split"),
    "out": ("run", "out"),
    "init": ("model", "init"),
    "dtype": ("model", "dtype"),
    "loss": ("optim", "loss"),
    "optim": ("optim", "name"),
    "lr": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "momentum": ("optim", "momentum"),
    "crop": ("data", "crop"),
    "batch_size": ("data", "batch_size"),
    "holdout": ("data", "holdout"),
    "samples_per_pair": ("data", "samples_per_pair"),
    "num_workers": ("data", "num_workers"),
    "epochs": ("run", "epochs"),
    "steps": ("run", "steps"),
    "seed": ("run", "seed"),
    "keep": ("run", "keep_latest"),
    "keep_best": ("run", "keep_best"),
    "save_every": ("run", "save_every_steps"),
    "patience": ("run", "patience"),
    "preview": ("run", "preview"),
}


def from_args(args: Any) -> Config:
    """Resolve the config of ``python -m cryoden.train`` arguments (see ``__main__``).

    Preset: ``--config``, else ``train-3d`` for 3D data (or a 3D ``--arch``), else ``train-2d``.
    With ``--init`` the architecture comes from the pretrained model.
    """
    from pathlib import Path as _P

    movies = getattr(args, "movies", None)
    if not movies and not (args.even and args.odd):
        raise ValueError("no training data: give --even and --odd, or --movies")
    if movies and (args.even or args.odd):
        raise ValueError("give either --movies or --even/--odd, not both")
    for flag in ("gain", "gain_rot", "gain_flip", "defects", "split"):
        if not movies and getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --movies only")
    arch = arch_fields(args.arch) if args.arch else None
    preset = args.config
    if preset is None:
        ndim = arch["ndim"] if arch else 2 if movies else _data_ndim(args.even, args.odd)
        preset = "train-3d" if ndim == 3 else "train-2d"
    cfg = merge(Config(), load_preset(preset))
    cfg = merge(cfg, parse_set(args.set or []))
    over: dict[str, dict[str, Any]] = {"model": dict(arch or {})}
    for dest, (section, key) in FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            over.setdefault(section, {})[key] = v
    for section, key in (
        ("data", "even"),
        ("data", "odd"),
        ("data", "movies"),
        ("data", "gain"),
        ("data", "defects"),
        ("run", "out"),
    ):
        if key in over.get(section, {}):
            over[section][key] = str(_P(over[section][key]).absolute())
    from cryoden import weights

    if args.init and weights.is_path(args.init) and _P(args.init).expanduser().exists():
        over["model"]["init"] = str(_P(args.init).expanduser().absolute())
    cfg = merge(cfg, over)
    if cfg.model.init:
        _, spec, _ = weights.load(cfg.model.init)
        cfg = with_init_spec(cfg, spec, arch_given=arch is not None)
    if not cfg.run.out:
        raise ValueError("no output directory: give --out RUN")
    return cfg.validate()


def _data_ndim(even: str, odd: str) -> int:
    from cryoden.train import data

    return data.open_half(data.find_pairs(even, odd)[0][0]).ndim


# ----------------------------------------------------------------------------- --help text
HELP_PRESETS = ("train-2d", "train-3d")


@functools.cache
def _help_preset(name: str) -> Config:
    try:
        return merge(Config(), load_preset(name))
    except ValueError:  # a broken preset must not break --help
        return Config()


def default_help(section: str, key: str) -> str:
    """``'default: 0'``, or ``'default: from the preset (train-2d: 800, train-3d: 96)'`` when
    the presets of :data:`HELP_PRESETS` differ (read from configs/, so --help cannot drift)."""

    def show(v: Any) -> str:
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    values = [getattr(getattr(_help_preset(n), section), key) for n in HELP_PRESETS]
    if all(v == values[0] for v in values):
        return f"default: {show(values[0])}"
    return (
        "default: from the preset ("
        + ", ".join(f"{n}: {show(v)}" for n, v in zip(HELP_PRESETS, values, strict=True))
        + ")"
    )
