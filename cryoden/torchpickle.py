"""Read PyTorch checkpoint files without torch and without running any pickled code.

A checkpoint is a pickle whose tensors point at raw storages by persistent id. Two layouts exist:

- zip (``torch.save`` since torch 1.6): ``<prefix>/data.pkl`` holds the pickle, with persistent ids
  ``('storage', storage_type, key, location, numel)``; ``<prefix>/data/<key>`` holds the raw bytes
  and ``<prefix>/byteorder`` their endianness (little when absent). ``<prefix>`` is ``archive`` or,
  for older torch, the file's stem.
- legacy (``_use_new_zipfile_serialization=False``; Topaz's ``.sav`` files): four pickles in a row
  (magic number, protocol version 1001, sys_info, the object with persistent ids
  ``('storage', storage_type, key, location, numel, view_metadata)``), a pickled list of storage
  keys, then each storage's raw bytes prefixed by its int64 element count.

Unpickling goes through :class:`_Unpickler`, whose ``find_class`` hands out only an explicit
whitelist: our own tensor-rebuilding functions (returning numpy arrays), storage-type markers,
inert :class:`ModuleStub` classes for ``torch.nn`` and ``topaz`` modules, and plain-data builtins.
Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) raises
:class:`UnsafePickleError` before anything is called. Whole pickled modules (``torch.save(model)``,
what ``topaz denoise --save-prefix`` writes) are walked into the state dict torch would give.

Memory is bounded by the file, not by what it claims: a legacy storage's byte count is checked
against the bytes left in the file before it is read; a zip member may not inflate to more than
``MAX_INFLATION`` times its compressed size (beyond ``FREE_BYTES``; torch never compresses), and all
storages together may not exceed ``MAX_STORAGE_BYTES``; the tensors rebuilt from the storages may
together hold at most twice the storages' bytes (plus ``FREE_BYTES``), so a stride-0 view cannot
expand a tiny storage into a huge array. Nesting too deep for Python is a one-line error.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import stat
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch file
PROTOCOL_VERSION = 1001
MAX_DEPTH = 64  # module / container nesting limit when walking a loaded checkpoint
MAX_STORAGE_BYTES = 4 << 30  # all storages of one checkpoint together
MAX_INFLATION = 16  # bytes a compressed zip member may inflate to per compressed byte ...
FREE_BYTES = 16 << 20  # ... beyond this allowance (also the tensors' allowance beyond storages)


class TorchPickleError(ValueError):
    """A file that is not a readable PyTorch checkpoint."""


class UnsafePickleError(TorchPickleError):
    """A pickle that asks for a global outside the whitelist: nothing from it is ever called."""


# ----------------------------------------------------------------------------- inert objects


class ModuleStub:
    """Inert stand-in for a pickled ``torch.nn`` / ``topaz`` module: it only records its state.

    ``torch_class`` names the class it replaces (``'topaz.denoising.models.UDenoiseNet'``);
    ``state`` is the pickled ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ...).
    """

    torch_class = "torch.nn.modules.module.Module"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TorchPickleError(f"{self.torch_class}: module state is {type(state).__name__}")
        self.state = dict(state)

    def __repr__(self):
        return f"ModuleStub({self.torch_class})"


_STUBS: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    if qual not in _STUBS:
        _STUBS[qual] = type(name.replace(".", "_"), (ModuleStub,), {"torch_class": qual})
    return _STUBS[qual]


class _Sealed:
    """Base of our whitelisted objects: a pickle cannot set attributes on them (BUILD)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"pickle tried to set the state of {self!r}")


class _Func(_Sealed):
    """A whitelisted callable handed to the unpickler in place of a torch function."""

    __slots__ = ("fn", "name")

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"<whitelisted {self.name}>"


class _StorageType(_Sealed):
    """Marker for ``torch.FloatStorage`` etc.: the numpy dtype of a storage's elements."""

    __slots__ = ("dtype", "name")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _Budget:
    """Bytes the rebuilt tensors of one file may still take: twice its storages + FREE_BYTES."""

    def __init__(self, storage_bytes: int):
        self.left = 2 * storage_bytes + FREE_BYTES

    def take(self, nbytes: int, size, storage) -> None:
        if nbytes > self.left:
            raise TorchPickleError(
                f"tensor of size {size} ({nbytes:,} bytes) expands {storage!r} beyond what the "
                "file's storages hold; refusing to allocate it"
            )
        self.left -= nbytes


class _Storage(_Sealed):
    """A storage: 1-d ``array`` of ``numel`` elements (None until its bytes are read); tensors
    rebuilt from it are charged to ``budget`` (shared by all storages of one file)."""

    __slots__ = ("dtype", "numel", "array", "budget")

    def __init__(self, dtype, numel, array=None, budget=None):
        self.dtype, self.numel, self.array, self.budget = dtype, numel, array, budget

    def __repr__(self):
        return f"<storage {self.dtype} x {self.numel}>"


def _bfloat16():
    import ml_dtypes  # ships with jax

    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}  # fmt: skip


# ----------------------------------------------------------------------------- rebuilding


def _ints(seq, what) -> tuple[int, ...]:
    if not isinstance(seq, tuple | list) or not all(type(v) is int for v in seq):
        raise TorchPickleError(f"tensor {what} is not a tuple of ints: {seq!r}")
    return tuple(seq)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """Tensor of ``size`` with element ``stride`` from ``storage.array[offset:]`` (a copy)."""
    if not isinstance(storage, _Storage):
        raise TorchPickleError(f"tensor without a storage ({type(storage).__name__})")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise TorchPickleError(f"bad layout: offset {offset!r}, size {size}, stride {stride}")
    if min(size + stride, default=0) < 0:
        raise TorchPickleError(f"negative tensor size or stride: {size}, {stride}")
    a = storage.array
    if a is None:  # first pass over a legacy file: data not read yet
        return None
    if 0 in size:
        return np.zeros(size, a.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= a.size:
        raise TorchPickleError(f"tensor {size} at offset {offset} overruns its storage ({a.size})")
    if storage.budget is None:
        raise TorchPickleError(f"{storage!r} has no memory budget")  # cannot happen: a bug
    storage.budget.take(int(np.prod(size, dtype=object)) * a.itemsize, size, storage)
    strides = tuple(s * a.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(a[offset:], size, strides, writeable=False).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if metadata:
        raise TorchPickleError(f"tensor metadata {metadata!r} (conj/neg views) is not supported")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


def _latin1(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_FUNCS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "device"): lambda *a: ":".join(map(str, a)),
    ("_codecs", "encode"): _latin1,
}
_PLAIN = (set, frozenset, list, dict, tuple, int, float, complex, bool, str, bytes, slice)
_TYPES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__") for t in _PLAIN},
}


# ----------------------------------------------------------------------------- unpickler


class _Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only whitelisted globals (see the module docstring)."""

    def __init__(self, file, persistent_load=None):
        super().__init__(file)
        self._pid = persistent_load

    def find_class(self, module, name):
        key = (module, name)
        if key in _FUNCS:
            return _Func(_FUNCS[key], f"{module}.{name}")
        if key in _TYPES:
            return _TYPES[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name == "BFloat16Storage":
            return _StorageType(name, _bfloat16())
        if module.startswith(("torch.nn.modules.", "torch.nn.parallel.", "topaz.")):
            return _stub_class(module, name)
        if module == "topaz":
            return _stub_class(module, name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: not a tensor, module or plain-data type "
            "(the file may be malicious)"
        )

    def persistent_load(self, pid):
        if self._pid is None:
            raise TorchPickleError(f"unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], str | bytes):
            raise TorchPickleError(f"bad persistent id {pid!r}")
        return self._pid(pid)


def _storage_args(pid, n):
    if len(pid) != n or pid[0] not in ("storage", b"storage"):
        raise TorchPickleError(f"unsupported persistent id {pid[:1]!r} with {len(pid)} fields")
    _, stype, key, _location, numel, *rest = pid
    if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
        raise TorchPickleError(f"bad storage record {pid!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    return stype.dtype, key, numel, rest


def _decode(raw: bytes, dtype: np.dtype, little: bool) -> np.ndarray:
    """Raw storage bytes -> 1-d native-order array of ``dtype``."""
    a = np.frombuffer(raw, np.uint8)
    unit = dtype.itemsize // (2 if dtype.kind == "c" else 1)
    if little != (sys.byteorder == "little") and unit > 1:
        a = a.reshape(-1, unit)[:, ::-1].copy()
    return a.view(dtype)


def check_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Uncompressed size of member ``info`` of ``zf`` once its claims are checked against the
    file: its compressed bytes fit in the archive, a stored member's two sizes agree, and a
    compressed member inflates to at most ``FREE_BYTES + MAX_INFLATION x`` its bytes."""
    archive_size = os.fstat(zf.fp.fileno()).st_size
    if info.compress_size > archive_size:
        raise TorchPickleError(
            f"zip member {info.filename} claims {info.compress_size:,} bytes in a file of "
            f"{archive_size:,}"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise TorchPickleError(f"zip member {info.filename}: stored sizes disagree")
    if info.file_size > FREE_BYTES + MAX_INFLATION * info.compress_size:
        raise TorchPickleError(
            f"zip member {info.filename} inflates {info.compress_size:,} bytes to "
            f"{info.file_size:,}: refusing (a zip bomb?)"
        )
    return info.file_size


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """Bytes of member ``info`` as a 1-d uint8 array, read in chunks into one buffer: memory is
    the checked size (:func:`check_zip_member`) however the member was compressed."""
    out = np.empty(check_zip_member(zf, info), np.uint8)
    pos = 0
    with zf.open(info) as f:
        while pos < out.size:
            chunk = f.read(min(1 << 24, out.size - pos))
            if not chunk:
                raise TorchPickleError(f"zip member {info.filename} is truncated")
            out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
    return out


def _load_zip(zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkl:
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise TorchPickleError(
                "a TorchScript archive (torch.jit.save), not a checkpoint; "
                "save the model's state_dict() with torch.save instead"
            )
        raise TorchPickleError("a zip file without <archive>/data.pkl: not a torch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    data = [i for i in zf.infolist() if i.filename.startswith(prefix + "data/")]
    total = sum(check_zip_member(zf, i) for i in data)
    if total > MAX_STORAGE_BYTES:
        raise TorchPickleError(
            f"storages of {total:,} bytes in all, more than the {MAX_STORAGE_BYTES:,} allowed"
        )
    budget = _Budget(total)
    order = b"little"
    if prefix + "byteorder" in names:
        order = read_zip_member(zf, zf.getinfo(prefix + "byteorder")).tobytes()
    if order not in (b"little", b"big"):
        raise TorchPickleError(f"unknown byteorder {order[:16]!r}")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        dtype, key, numel, _ = _storage_args(pid, 5)
        if key not in storages:
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise TorchPickleError(f"storage record {name} is missing") from None
            if info.file_size != numel * dtype.itemsize:
                raise TorchPickleError(
                    f"storage record {name} has {info.file_size} bytes, "
                    f"expected {numel} x {dtype.itemsize}"
                )
            arr = _decode(read_zip_member(zf, info), dtype, order == b"little")
            storages[key] = _Storage(dtype, numel, arr, budget)
        return storages[key]

    info = zf.getinfo(pkl[0])
    return _Unpickler(io.BytesIO(read_zip_member(zf, info).tobytes()), persistent_load).load()


def _legacy_magic(head: bytes) -> int | None:
    """Length of the legacy magic-number pickle at the start of ``head``, None if absent."""
    buf = io.BytesIO(head)
    try:
        magic = _Unpickler(buf).load()
    except UnsafePickleError:
        raise
    except Exception:
        return None
    return buf.tell() if type(magic) is int and magic == MAGIC_NUMBER else None


def _load_legacy(f) -> Any:
    n = _legacy_magic(f.read(64))  # the magic number's pickle is ~20 bytes: never read more
    if n is None:
        raise TorchPickleError(
            "not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save file)"
        )
    f.seek(n)
    if (version := _Unpickler(f).load()) != PROTOCOL_VERSION:
        raise TorchPickleError(f"unsupported legacy protocol version {version!r}")
    sys_info = _Unpickler(f).load()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if pid[0] in ("module", b"module"):  # ('module', class, source_file, source)
            if len(pid) < 2 or not (isinstance(pid[1], type) and issubclass(pid[1], ModuleStub)):
                raise TorchPickleError(f"bad module record {pid[:2]!r}")
            return pid[1]
        dtype, key, numel, (view,) = _storage_args(pid, 6)
        root = storages.setdefault(key, _Storage(dtype, numel))
        if root.dtype != dtype or root.numel != numel:
            raise TorchPickleError(f"storage {key} declared twice with different types")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise TorchPickleError(f"bad storage view {view!r}")
        offset, view_size = _ints(view[1:], "view")
        if not 0 <= offset <= offset + view_size <= numel:
            raise TorchPickleError(f"bad storage view {view!r} of storage {key} ({numel})")
        arr = None if root.array is None else root.array[offset : offset + view_size]
        return _Storage(dtype, view_size, arr, root.budget)

    start = f.tell()
    _Unpickler(f, persistent_load).load()  # first pass: learn each storage's dtype and size
    keys = _Unpickler(f).load()
    if not isinstance(keys, list) or set(keys) - set(storages):
        raise TorchPickleError("storage key list does not match the pickled storages")
    size = os.fstat(f.fileno()).st_size
    declared = sum(s.numel * s.dtype.itemsize for s in storages.values())
    if declared > size - f.tell():
        raise TorchPickleError(
            f"storages declare {declared:,} bytes, the file holds {size - f.tell():,} more"
        )
    budget = _Budget(declared)
    for key in keys:
        s = storages[key]
        count = int.from_bytes(f.read(8), "little" if little else "big", signed=True)
        if count != s.numel:
            raise TorchPickleError(f"storage {key}: {count} elements on disk, {s.numel} declared")
        nbytes = count * s.dtype.itemsize
        if nbytes > size - f.tell():  # checked before reading: never allocate what is not there
            raise TorchPickleError(f"file truncated inside storage {key}")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchPickleError(f"file truncated inside storage {key}")
        s.array, s.budget = _decode(raw, s.dtype, little), budget
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
        raise TorchPickleError(f"no data for storages {missing[:3]}")
    f.seek(start)
    return _Unpickler(f, persistent_load).load()  # second pass, storages filled


# ----------------------------------------------------------------------------- public API


def _clip(text: str, limit: int = 300) -> str:
    """An error message cut to ``limit`` characters (a hostile file's values can be huge)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(path: str | os.PathLike) -> Any:
    """Unpickle a torch checkpoint: tensors become numpy arrays, modules :class:`ModuleStub`.

    Raises :class:`UnsafePickleError` for a non-whitelisted global (nothing is executed) and
    :class:`TorchPickleError` for anything else unreadable; messages name the file.
    """
    where = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise TorchPickleError("not a regular file")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(zf)
        with open(path, "rb") as f:
            return _load_legacy(f)
    except TorchPickleError as e:
        raise type(e)(f"{where}: {_clip(str(e))}") from None
    except OSError as e:
        raise TorchPickleError(f"{where}: cannot read ({e.strerror or e})") from None
    except RecursionError:
        raise TorchPickleError(f"{where}: objects nested too deeply: not a checkpoint") from None
    except Exception as e:  # UnpicklingError, EOFError, TypeError, ...: a corrupt file
        raise TorchPickleError(
            f"{where}: corrupt or unsupported torch file ({type(e).__name__}: {_clip(str(e))})"
        ) from None


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a torch file by its content: a zip holding ``<prefix>/data.pkl`` (or a
    TorchScript archive), or a legacy file starting with torch's magic number. Reads little."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return any(
                    n.count("/") == 1 and n.endswith(("/data.pkl", "/constants.pkl"))
                    for n in zf.namelist()
                )
        with open(path, "rb") as f:
            return _legacy_magic(f.read(64)) is not None
    except (OSError, zipfile.BadZipFile, TorchPickleError):
        return False


def module_state_dict(module: ModuleStub, prefix: str = "", depth: int = 0) -> dict:
    """What ``module.state_dict()`` would return: parameters, persistent buffers, then children."""
    if depth > MAX_DEPTH:
        raise TorchPickleError(f"modules nested deeper than {MAX_DEPTH} at {prefix!r}")
    st = module.state
    out = {}
    skip = st.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, v in (st.get(group) or {}).items():
            if v is not None and not (group == "_buffers" and name in skip):
                if not isinstance(v, np.ndarray):
                    raise TorchPickleError(f"{prefix}{name} is a {type(v).__name__}, not a tensor")
                out[prefix + name] = v
    for name, sub in (st.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, ModuleStub):
            raise TorchPickleError(f"submodule {prefix}{name} is a {type(sub).__name__}")
        out.update(module_state_dict(sub, f"{prefix}{name}.", depth + 1))
    return out


def to_state_dict(obj: Any, where: str = "checkpoint", depth: int = 0) -> dict[str, np.ndarray]:
    """Flat ``{'enc1.0.weight': array}`` from a loaded state dict, module or training checkpoint.

    Accepts a state dict, a pickled module (``DataParallel`` keeps torch's ``module.`` prefix),
    or a dict holding one under ``state_dict`` / ``model_state_dict`` / ``model`` (nested at most
    ``MAX_DEPTH`` deep).
    """
    if depth > MAX_DEPTH:
        raise TorchPickleError(f"{where}: state dict nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, ModuleStub):
        try:
            return module_state_dict(obj)
        except TorchPickleError as e:
            raise TorchPickleError(f"{where}: {e}") from None
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
            return dict(obj)
        for k in ("state_dict", "model_state_dict", "model"):
            if k in obj:
                return to_state_dict(obj[k], where, depth + 1)
    raise TorchPickleError(
        f"{where}: no state dict or model found (top-level object is {type(obj).__name__})"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """:func:`load` then :func:`to_state_dict`: ``{'enc1.0.weight': (O, I, *k) array, ...}``."""
    return to_state_dict(load(path), str(Path(path)))
