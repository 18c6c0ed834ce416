"""Saving without pickle: checksummed, atomically written safetensors files.

Two layers:

* :func:`write_tensors` / :func:`read_tensors`: one safetensors file holding named tensors and a
  JSON-able ``meta`` mapping. The header metadata carries a format tag and version and SHA-256
  digests of the meta JSON and of the tensors (names, dtypes, shapes and bytes), so corruption
  or edits are detected on reading. Writing goes through a temporary file in the same folder
  (flush, ``fsync``, ``os.replace``, ``fsync`` of the folder): a crash leaves either the old file
  or the new one, never a partial file. The digests detect damage and edits, they are not a
  signature: whoever can write the file can recompute them.
* :func:`save` / :func:`load`: pruned plain models. A model class is supported once registered
  with :func:`register_model_class` (it needs ``to_config() -> dict`` and a classmethod
  ``from_config(dict)``); the file holds its kind, config and full ``state_dict()``. Save refuses,
  before writing, any model that load would refuse or rebuild differently.

Nothing here uses pickle: loading a file cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .base import GatedModule
from .gates import gate_modules
from .plain import PlainShortcutNet
from .strict_json import DuplicateKeyError, loads_strict

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no sweeping
    fcntl = None  # type: ignore[assignment]

__all__ = ["load", "read_tensors", "register_model_class", "save", "write_tensors"]

FORMAT = "gatedprune.tensors"
FORMAT_VERSION = 1
MODEL_FORMAT = "gatedprune.model"
MODEL_FORMAT_VERSION = 2
"""The newest model file version :func:`load` reads (it reads every version from 1 on).

:func:`save` writes version 2 only for a config holding an :data:`OVERRIDES_KEY` entry, which
gatedprune versions that read version 1 only would silently ignore (say, a replaced activation):
they refuse such a file instead. Every other file is version 1, readable by them as before."""
OVERRIDES_KEY = "overrides"
"""A model config's entry for settings beyond the structure older readers know (for
``PlainShortcutNet``: replaced activations, BatchNorm eps/momentum); see
:data:`MODEL_FORMAT_VERSION`."""

# Keys of the safetensors header metadata (a str -> str mapping).
_META_KEY = "gatedprune"
_FORMAT_KEY = "gatedprune.format"
_VERSION_KEY = "gatedprune.version"
_META_SHA_KEY = "gatedprune.sha256_meta"
_TENSORS_SHA_KEY = "gatedprune.sha256_tensors"

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------- tensor files
def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gatedprune's save/load and checkpoints need safetensors: "
            "pip install 'gatedprune[io]' (or pip install safetensors)"
        ) from e
    return safetensors.torch


def _as_path(path: object, what: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}")
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if raw.endswith(("/", os.sep)):  # Path() would drop the slash and name a file "out"
        raise ValueError(f"{what}: {raw!r} names a folder; give a file name inside it")
    p = Path(raw)
    if not str(p) or p.name == "":
        raise ValueError(f"{what}: {str(path)!r} does not name a file")
    return p


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].reshape(-1)  # (N,) contiguous CPU
        raw = t.view(torch.uint8)  # (N * itemsize,)
        h.update(json.dumps([name, str(t.dtype), list(tensors[name].shape)]).encode("utf-8"))
        h.update(raw.numel().to_bytes(8, "little"))
        h.update(raw.numpy().data)  # hashed in place, no copy
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as an output folder (created if missing), or None: it is a
    file, or its nearest existing ancestor is.

    >>> folder_problem(Path("/nonexistent/out")) is None
    True
    """
    if path.exists() and not path.is_dir():
        return f"{str(path)!r} exists and is not a directory"
    for parent in path.absolute().parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                return f"cannot create {str(path)!r}: {str(parent)!r} is not a directory"
            break
    return None


def _refuse_missing_folder(path: Path, directory: Path) -> None:
    """Raise for a ``directory`` that is not a folder: ``NotADirectoryError`` naming the file in
    the way (``directory`` or its nearest existing ancestor), else ``FileNotFoundError``."""
    for folder in (directory, *directory.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {folder} is not a directory")
            break
    raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist")


def _refuse_folder(p: Path, who: str, writer: str) -> None:
    """A ``ValueError`` for a folder given where a file is read (``Path.read_bytes`` would
    raise ``IsADirectoryError``, which ``load``'s callers do not expect)."""
    if p.is_dir():
        raise ValueError(f"{who}: {str(p)!r} is a folder; expected a file written by {writer}")


STALE_TEMP_AGE = 600.0
"""Seconds since its last change before a leftover temporary file may be removed (see
:func:`sweep_stale_temps`): a margin for writers whose lock cannot be seen (an older
gatedprune, another host on a network file system that keeps locks local)."""


def _temp_name(name: str) -> str:
    """The hidden temporary name :func:`atomic_write` writes ``name`` through."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def sweep_stale_temps(directory: Path, name_pattern: str) -> list[Path]:
    """Remove the temporary files a killed writer left in ``directory`` for targets whose name
    matches the regular expression ``name_pattern`` (:func:`atomic_write` passes its target's
    escaped name); return the removed paths. Best effort: never raises.

    A temporary file is removed only when nobody can still be writing it: a regular file
    owned by this user, unchanged for :data:`STALE_TEMP_AGE` seconds, and whose advisory lock
    (``flock``, which every :func:`atomic_write` holds from creating the file until it is
    renamed into place, and which the kernel releases when its process dies, whatever kills
    it) can be taken now. The name is checked to still be that file before it is unlinked.
    Where there are no such locks (Windows) nothing is removed."""
    if fcntl is None:
        return []
    pattern = re.compile(rf"^\.(?:{name_pattern})\.[0-9a-f]{{16}}\.tmp$")
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(directory) if pattern.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_TEMP_AGE:
                continue
            if st.st_uid != os.getuid():
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: OSError
            now, held = os.stat(entry.path, follow_symlinks=False), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _locked_temp(directory: Path, name: str) -> tuple[Path, int]:
    """A new temporary file for target ``name`` in ``directory``, open for writing and locked
    (``flock``, released by the kernel however this process ends): the lock is taken blocking
    (a sweep holds it for an instant), and a file a sweep removed between its creation and the
    lock (a writer suspended there, a clock step) is given up for another name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(3):
        tmp = directory / _temp_name(name)
        fd = os.open(tmp, flags, 0o666)  # honours the umask, unlike mkstemp's 0o600
        if fcntl is None:
            return tmp, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            return tmp, fd
        try:
            here, held = os.stat(tmp, follow_symlinks=False), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # swept before it was locked: never written, nothing to remove
    raise OSError(f"cannot write into {directory}: its temporary files keep disappearing")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place (file and
    directory fsynced): a reader sees the old file or the complete new one, never a part.

    A symbolic link at ``path`` stays a link: the file it points to is replaced. An existing
    file keeps its permission bits; a new one gets ``0o666`` less the umask.

    The temporary file ``.<name>.<16 hex>.tmp`` is locked (``flock``) while it is written,
    and removed if writing fails; one a killed process left behind is removed by a later
    successful write of the same ``path`` (:func:`sweep_stale_temps`)."""
    if path.is_symlink():  # replace the target, not the link itself
        path = Path(os.path.realpath(path))
    directory = path.parent
    if not directory.is_dir():  # else the error would name the temporary file
        _refuse_missing_folder(path, directory)
    if path.is_dir():
        raise ValueError(
            f"cannot write {path}: it is a folder; expected a file path such as "
            f"{path / 'model.safetensors'}"
        )
    try:
        mode: int | None = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = None
    tmp, fd = _locked_temp(directory, path.name)
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)  # fdopen failed: the descriptor is still ours to close
            raise
        with f:
            if mode is not None:  # e.g. a private 0o600 file must not become world-readable
                os.chmod(tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while still locked (POSIX renames open files)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    sweep_stale_temps(directory, re.escape(path.name))


def write_tensors(path: PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-able ``meta`` to one safetensors file, atomically.

    Tensors are copied to contiguous CPU memory first (views, shared and non-contiguous
    tensors are fine). ``meta`` goes through :func:`json.dumps`: tuples come back as lists,
    non-string keys as strings; NaN and infinities are kept. An existing file at ``path`` is
    replaced only once the new one is complete on disk.

    >>> import tempfile, os, torch
    >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_tensors(f, {"w": torch.ones(2, 3).t()}, {"step": 7})
    >>> tensors, meta = read_tensors(f)
    >>> tensors["w"].shape, meta
    (torch.Size([3, 2]), {'step': 7})
    """
    p = _as_path(path, "write_tensors")
    atomic_write(p, _encode(tensors, meta, "write_tensors"))


def _encode(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], who: str) -> bytes:
    """The bytes :func:`write_tensors` writes; errors start with ``who`` (the public caller)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{who}: tensors must be a mapping of str to Tensor, got {type(tensors).__name__}"
        )
    if not isinstance(meta, Mapping):
        raise TypeError(f"{who}: meta must be a mapping, got {type(meta).__name__}")
    flat: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{who}: tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError(f"{who}: the tensor name '__metadata__' is reserved")
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{who}: {name!r} is a {t.layout} tensor; only dense tensors")
        flat[name] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    try:
        meta_json = json.dumps(dict(meta))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: meta must be JSON-serialisable: {e}") from e
    header = {
        _FORMAT_KEY: FORMAT,
        _VERSION_KEY: str(FORMAT_VERSION),
        _META_KEY: meta_json,
        _META_SHA_KEY: _sha256(meta_json),
        _TENSORS_SHA_KEY: _tensors_digest(flat),
    }
    data: bytes = _safetensors().save(flat, metadata=header)
    return data


def _header(p: Path, data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file, or ValueError."""
    if len(data) < 8:
        raise ValueError(
            f"{p}: not a gatedprune file ({len(data)} bytes; too short to hold a header)"
        )
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(
            f"{p}: not a gatedprune file, or truncated (the header claims {n} bytes, "
            f"the file has {len(data)})"
        )
    try:
        header = loads_strict(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, DuplicateKeyError, RecursionError) as e:
        # RecursionError: absurdly nested JSON, which no gatedprune file holds
        raise ValueError(
            f"{p}: not a gatedprune file, or corrupted (unreadable header: {e})"
        ) from e
    if not isinstance(header, dict):
        raise ValueError(f"{p}: not a gatedprune file (the header is not a JSON object)")
    return header


def read_tensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_tensors`: ``(tensors on CPU, meta)``.

    Checks the format tag, the version and both checksums. A missing file raises
    ``FileNotFoundError``; a folder, or a truncated, corrupted, edited or foreign file (another
    program's safetensors, a pickle, text, an empty file) raises ``ValueError`` naming the file
    and the problem. Never unpickles anything.

    >>> import tempfile, os, torch
    >>> f = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_tensors(f, {"b": torch.zeros(2)}, {"note": "hi"})
    >>> read_tensors(f)[1]
    {'note': 'hi'}
    """
    p = _as_path(path, "read_tensors")
    _refuse_folder(p, "read_tensors", "write_tensors")
    data = p.read_bytes()
    header = _header(p, data)
    md = header.get("__metadata__")
    if not isinstance(md, dict) or md.get(_FORMAT_KEY) != FORMAT:
        raise ValueError(
            f"{p}: not written by gatedprune (its safetensors metadata has no "
            f"{_FORMAT_KEY!r} = {FORMAT!r} tag)"
        )
    version = md.get(_VERSION_KEY)
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{p}: unsupported gatedprune file version {version!r} (this gatedprune reads "
            f"version {FORMAT_VERSION})"
        )
    meta_json = md.get(_META_KEY)
    if not isinstance(meta_json, str) or _sha256(meta_json) != md.get(_META_SHA_KEY):
        raise ValueError(f"{p}: metadata checksum mismatch: the file is corrupted or was edited")
    try:
        meta = loads_strict(meta_json)
    except (json.JSONDecodeError, DuplicateKeyError, RecursionError) as e:
        raise ValueError(f"{p}: unreadable metadata JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: metadata is not a JSON object")
    st = _safetensors()
    try:
        tensors: dict[str, Tensor] = st.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for malformed data
        raise ValueError(f"{p}: corrupted or truncated tensor data ({e})") from e
    if _tensors_digest(tensors) != md.get(_TENSORS_SHA_KEY):
        raise ValueError(f"{p}: tensor checksum mismatch: the file is corrupted or was edited")
    return tensors, meta


# ---------------------------------------------------------------------- model files
class _Configurable(Protocol):
    def to_config(self) -> dict[str, Any]: ...


_CLASS_OF_KIND: dict[str, type[nn.Module]] = {}
_KIND_OF_CLASS: dict[type[nn.Module], str] = {}


def register_model_class(kind: str, cls: type[nn.Module]) -> None:
    """Let :func:`save` / :func:`load` handle ``cls`` under the name ``kind``.

    ``cls`` must be a plain (gate-free) ``nn.Module`` class with ``to_config() -> dict``
    (JSON-able structure, no weights) and a classmethod ``from_config(dict)`` that builds an
    instance whose ``state_dict()`` has the same keys and shapes. Only the exact class is
    matched, not subclasses. Registering the same pair again is a no-op; a kind or class
    already registered otherwise raises ``ValueError``. :func:`load` can only rebuild kinds
    registered in the running process, so register at import time of the defining module.

    >>> class Tiny(nn.Linear):
    ...     def to_config(self): return {"n": self.in_features}
    ...     @classmethod
    ...     def from_config(cls, c): return cls(c["n"], c["n"])
    >>> register_model_class("doc_tiny", Tiny)
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"register_model_class: kind must be a non-empty str, got {kind!r}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_model_class: cls must be an nn.Module subclass, got {cls!r}")
    if issubclass(cls, GatedModule):
        raise TypeError(
            f"register_model_class: {cls.__name__} is a GatedModule; register the plain class "
            "that gatedprune.prune returns for it"
        )
    if not callable(getattr(cls, "to_config", None)) or not callable(
        getattr(cls, "from_config", None)
    ):
        raise TypeError(
            f"register_model_class: {cls.__name__} needs a to_config() method and a "
            "from_config(config) classmethod"
        )
    if _CLASS_OF_KIND.get(kind, cls) is not cls or _KIND_OF_CLASS.get(cls, kind) != kind:
        raise ValueError(
            f"register_model_class: kind {kind!r} or class {cls.__name__} is already registered "
            f"(kind {kind!r} -> {_CLASS_OF_KIND.get(kind)!r}, class -> "
            f"{_KIND_OF_CLASS.get(cls)!r})"
        )
    _CLASS_OF_KIND[kind] = cls
    _KIND_OF_CLASS[cls] = kind


register_model_class("plain_shortcut_net", PlainShortcutNet)


# Attributes that change what a module computes but that its extra_repr() does not show.
_HIDDEN_ATTRIBUTES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.RNN, ("nonlinearity", "mode")),  # nn.RNN(nonlinearity="relu") prints as tanh's
)


def _same_module(ours: nn.Module, rebuilt: nn.Module) -> bool:
    """Whether ``ours`` computes what ``rebuilt`` does: the same class (a ``SyncBatchNorm``
    from ``convert_sync_batchnorm`` counts as the BatchNorm it replaced: the same state and
    the same function outside distributed training) and settings (``extra_repr()`` and the
    attributes it does not show)."""
    same_class = type(ours) is type(rebuilt) or (
        type(ours) is nn.SyncBatchNorm and isinstance(rebuilt, nn.modules.batchnorm._BatchNorm)
    )
    hidden = [
        (getattr(ours, a, None), getattr(rebuilt, a, None))
        for cls, attrs in _HIDDEN_ATTRIBUTES
        if isinstance(ours, cls) or isinstance(rebuilt, cls)
        for a in attrs
    ]
    return (
        same_class and ours.extra_repr() == rebuilt.extra_repr() and all(a == b for a, b in hidden)
    )


def _describe(m: nn.Module) -> str:
    """A module's class and settings, as in its repr, plus those its repr hides.

    >>> _describe(nn.RNN(2, 3, nonlinearity="relu"))
    "RNN(2, 3, nonlinearity='relu', mode='RNN_RELU')"
    """
    parts = [m.extra_repr()] if m.extra_repr() else []
    parts += [
        f"{a}={getattr(m, a, None)!r}"
        for cls, attrs in _HIDDEN_ATTRIBUTES
        if isinstance(m, cls)
        for a in attrs
    ]
    return f"{type(m).__name__}({', '.join(parts)})"


def _check_modules(kind: str, model: nn.Module, rebuilt: nn.Module) -> None:
    """Refuse (``ValueError``, naming the module) a model whose submodules differ from those
    ``rebuilt`` (what :func:`load` builds from the model's config) holds: another class,
    other settings (``extra_repr()``, e.g. a BatchNorm's eps), a module added or removed
    (:func:`_same_module`). The saved file would otherwise load as a model that computes
    another function."""
    ours = dict(model.named_modules(remove_duplicate=False))
    theirs = dict(rebuilt.named_modules(remove_duplicate=False))
    cls_name = type(model).__name__
    extra = [n for n in ours if n not in theirs]
    missing = [n for n in theirs if n not in ours]
    if extra or missing:
        raise ValueError(
            f"save: the submodules of this {cls_name} differ from those of the {kind!r} model "
            f"load rebuilds from its config (added {extra}, missing {missing}); the file would "
            "not load as this model"
        )
    for name, m in ours.items():
        if not _same_module(m, theirs[name]):
            where = f"module {name!r}" if name else f"the {cls_name} itself"
            raise ValueError(
                f"save: {where} is {_describe(m)}, but load would rebuild "
                f"{_describe(theirs[name])} from the config {cls_name}.to_config() describes; "
                "the saved model would compute another function. Restore a module the config "
                "describes (or save the weights with write_tensors)"
            )


def _names(names: list[str], limit: int = 3) -> str:
    """Up to ``limit`` names, quoted, and how many more.

    >>> _names(["a", "b", "c", "d"])
    "'a', 'b', 'c' and 1 more"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _check_state(
    where: str, kind: str, expected: Mapping[str, Tensor], got: Mapping[str, object], subject: str
) -> None:
    """The rules :func:`load` applies to a file's tensors, which :func:`save` applies to a
    model's ``state_dict()`` before writing: the names and shapes of ``expected`` (the state of
    the model rebuilt from the config; meta tensors do) and, after the cast load makes (a
    rebuilt model goes to the floating dtype every floating tensor shares), its dtypes.
    ``ValueError`` (``TypeError`` for a non-tensor) starting with ``where``, naming the tensor."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: {subject} do not match a {kind!r} model with this config "
            f"(missing {missing}, unexpected {extra})"
        )
    tensors: dict[str, Tensor] = {}
    for name, t in expected.items():
        g = got[name]
        if not isinstance(g, Tensor):
            raise TypeError(f"{where}: {name!r} must be a torch.Tensor, got {type(g).__name__}")
        if t.shape != g.shape:
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(g.shape)}, "
                f"the {kind!r} config needs {tuple(t.shape)}"
            )
        tensors[name] = g
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, g in tensors.items():
        if g.is_floating_point():
            by_dtype.setdefault(g.dtype, []).append(name)
    common = next(iter(by_dtype)) if len(by_dtype) == 1 else None
    for name, t in expected.items():
        want = common if common is not None and t.is_floating_point() else t.dtype
        if tensors[name].dtype == want:
            continue
        if len(by_dtype) > 1:
            groups = sorted(by_dtype.items(), key=lambda kv: -len(kv[1]))
            listed = "; ".join(f"{d}: {_names(ns)} ({len(ns)} tensors)" for d, ns in groups)
            raise ValueError(
                f"{where}: {subject} mix floating-point dtypes ({listed}); mixed-precision "
                "models are not supported: convert the whole model with .to(dtype)"
            )
        raise ValueError(
            f"{where}: tensor {name!r} is {tensors[name].dtype}, but the {kind!r} model "
            f"rebuilt from this config holds {want} there"
        )


def _rebuild_on_meta(
    where: str, kind: str, cls: type[nn.Module], config: dict[str, Any]
) -> nn.Module:
    """``cls.from_config(config)`` on the meta device (no memory: an edited file's width of
    10**12 is refused by the shape check, not by an allocation), or ``ValueError``."""
    try:
        with torch.device("meta"):
            skeleton: nn.Module = cls.from_config(config)  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: invalid config for model kind {kind!r}: {e}") from e
    return skeleton


def save(model: nn.Module, path: PathLike) -> None:
    """Save a pruned plain model (structure + every parameter and buffer) to ``path``.

    The file is a checksummed safetensors file written atomically (see :func:`write_tensors`);
    :func:`load` rebuilds the model. Supported classes: those registered with
    :func:`register_model_class` (``PlainShortcutNet`` and the other models ``gatedprune.prune``
    returns). A gated model must be pruned first.

    Before anything is written, the model is checked against what :func:`load` would rebuild
    from its config, with load's own rules: the same submodules with the same settings, the
    same tensor names and shapes, one floating dtype. A model that would not load back as
    itself (a layer cast to another dtype, an added buffer, a removed bias, a module the config
    cannot describe) is refused with a ``ValueError`` naming the tensor or module, and a file
    already at ``path`` is left as it was.

    >>> import tempfile, os, torch, gatedprune
    >>> net = gatedprune.prune(gatedprune.ShortcutMLP(8, [16], 3).eval())
    >>> f = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> save(net, f)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(load(f)(x), net(x))
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    p = _as_path(path, "save")
    if any(isinstance(m, GatedModule) for m in model.modules()) or gate_modules(model):
        raise TypeError(
            f"save stores plain pruned models; {type(model).__name__} still has gates: "
            "call gatedprune.prune(model) first and save the result"
        )
    cls = type(model)
    kind = _KIND_OF_CLASS.get(cls)
    if kind is None:
        raise TypeError(
            f"save does not support {cls.__name__}: supported kinds are "
            f"{sorted(_CLASS_OF_KIND)} ({', '.join(c.__name__ for c in _KIND_OF_CLASS)}); "
            "register other classes with gatedprune.io.register_model_class (to_config/"
            "from_config); for a model pruned after gatedprune.gate_, keep "
            "json.dumps(gatedprune.export_plan(gated)) and the pruned state_dict() (e.g. with "
            "gatedprune.io.write_tensors), and rebuild with gatedprune.apply_plan(a fresh "
            "dense instance, plan) then load_state_dict"
        )
    from . import __version__

    configurable: _Configurable = model  # type: ignore[assignment]
    config = configurable.to_config()
    if not isinstance(config, dict):
        raise TypeError(
            f"save: {cls.__name__}.to_config() must return a dict, got {type(config).__name__}"
        )
    try:
        as_read: dict[str, Any] = loads_strict(json.dumps(config))  # what load will see
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save: {cls.__name__}.to_config() must return JSON-serialisable data: {e}"
        ) from e
    rebuilt = _rebuild_on_meta("save", kind, cls, as_read)
    _check_modules(kind, model, rebuilt)
    tensors = model.state_dict()
    _check_state("save", kind, rebuilt.state_dict(), tensors, "the model's state_dict() tensors")
    meta = {
        "format": MODEL_FORMAT,
        "format_version": 2 if OVERRIDES_KEY in config else 1,
        "kind": kind,
        "config": config,
        "gatedprune_version": __version__,
    }
    atomic_write(p, _encode(tensors, meta, "save"))


def load(path: PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save` (on CPU, in eval mode).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a folder, a damaged
    or foreign file, an unregistered kind or tensors that do not fit the stored config.

    >>> import tempfile, os, gatedprune
    >>> f = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> save(gatedprune.prune(gatedprune.ShortcutMLP(4, [8], 2)), f)
    >>> type(load(f)).__name__
    'PlainShortcutNet'
    """
    p = _as_path(path, "load")
    _refuse_folder(p, "load", "gatedprune.save")
    tensors, meta = read_tensors(p)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{p}: a gatedprune file but not a saved model (format {meta.get('format')!r}, "
            f"expected {MODEL_FORMAT!r}); training checkpoints are resumed by the Trainer"
        )
    version = meta.get("format_version")
    if type(version) is not int or not 1 <= version <= MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{p}: unsupported model file version {version!r} (this gatedprune reads "
            f"versions 1 to {MODEL_FORMAT_VERSION}; a newer version may have written it)"
        )
    kind = meta.get("kind")
    cls = _CLASS_OF_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise ValueError(
            f"{p}: unknown model kind {kind!r} (registered: {sorted(_CLASS_OF_KIND)}); "
            "import the module that registers it first"
        )
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{p}: the model config is not a JSON object: {config!r}")
    skeleton = _rebuild_on_meta(str(p), kind, cls, config)
    _check_state(str(p), kind, skeleton.state_dict(), tensors, "the tensors")
    model: nn.Module = cls.from_config(config)  # type: ignore[attr-defined]
    saved_float = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(saved_float) == 1:  # e.g. a float64 model (_check_state allowed this cast)
        model = model.to(next(iter(saved_float)))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{p}: the tensors do not fit the {kind!r} model: {e}") from e
    for name, t in model.state_dict().items():  # what _check_state predicted
        if t.dtype != tensors[name].dtype:
            raise ValueError(
                f"{p}: tensor {name!r} was saved as {tensors[name].dtype} but the rebuilt model "
                f"holds {t.dtype}; mixed-precision models are not supported"
            )
    return model.eval()
