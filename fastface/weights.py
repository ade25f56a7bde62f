"""Weights on disk, for every saved model: safetensors files, the config as JSON in their metadata; never pickle.

    save_weights(file, model.state_dict(), config=model.config.to_dict())
    config = stored_config(file)                    # the metadata's config (or a side-car ``<stem>.json``)
    model.load_state_dict(load_weights(file, model))

``load_weights`` checks the file against what the caller expects before returning anything: missing tensors,
unexpected tensors, shapes and dtypes. Dtype policy: with ``dtype=None`` every tensor must have the expected
tensor's dtype; with a requested floating ``dtype`` a floating tensor may be stored in any floating dtype and is
returned cast to ``dtype``, while an integer or bool tensor must still match exactly (a floating tensor where an
integer one is expected, or the reverse, is always an error). Every floating tensor must be finite: a NaN or inf
weight is an error at load (it would otherwise turn every output into token 0 without a word). Every failure -- a
missing file, a file that is not safetensors or is truncated, a config that is not JSON, a key, shape or dtype
mismatch, a non-finite value -- raises ``CheckpointError`` (a ``ValueError``) whose message names the file and the
offending key, shape or dtype.

``check_memory(nbytes, what)`` compares a loader's estimate of its peak memory with the machine's available memory
(``MemAvailable`` in /proc/meminfo; skipped where that is unknown) before the loader allocates a model;
``load_module`` loads a small saved model that way (meta-device skeleton, memory check, file check, then the model).

``atomic_write`` writes to a temporary file in the destination's directory, fsyncs it and renames it into place, so
a reader sees the old file or the new one, never half of one; a failed write leaves the old file intact and no
temporary file behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_KEY = "fastface_config"  # safetensors metadata key holding the model's config as JSON
_SHOW = 5  # keys listed in a missing / unexpected message


class CheckpointError(ValueError):
    """A saved model that cannot be loaded as it is; the message names the file and the culprit."""


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it and rename it to ``path``.

    If ``write`` (or anything after it) fails, ``path`` keeps its old content and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path):
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def save_weights(file, state_dict: Mapping[str, torch.Tensor], *, config: dict | None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``state_dict`` to safetensors ``file`` atomically, ``config`` (JSON-able) in its metadata.

    ``dtype`` casts the floating tensors (integer and bool tensors keep theirs). Tensors are detached, moved to the
    CPU and made contiguous first. Returns ``file``.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"save_weights: dtype must be a floating dtype, got {dtype}")
    file = Path(file)
    state = {}
    for key, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.contiguous()
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(file, lambda p: save_file(state, str(p), metadata=metadata))


def save_module(file, module: torch.nn.Module, config: dict, *, dtype: torch.dtype | None = None) -> Path:
    """A small saved model: its weights in ``file`` (config in the metadata; floating tensors stored in ``dtype``
    when given, e.g. bfloat16 to halve a shipped file) and the config beside it as ``<stem>.json``, each written
    atomically. Returns ``file``."""
    file = Path(file)
    save_weights(file, module.state_dict(), config=config, dtype=dtype)
    write_json(file.with_suffix(".json"), config)
    return file


def read_metadata(file) -> dict[str, str]:
    """The safetensors metadata of ``file`` (empty when it has none)."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None


def stored_config(file, *, legacy_keys: tuple[str, ...] = (), sidecar: bool = True) -> dict | None:
    """The config saved with ``file``: its metadata's ``CONFIG_KEY``, else the first of ``legacy_keys`` present
    (metadata keys of files written before this module), else with ``sidecar`` the JSON file ``<stem>.json``
    beside it; None when there is none."""
    file = Path(file)
    meta = read_metadata(file)
    for key in (CONFIG_KEY, *legacy_keys):
        if key in meta:
            return _parse_config(meta[key], f"{file}: metadata {key!r}")
    side = file.with_suffix(".json")
    if sidecar and side.is_file():
        return _parse_config(side.read_text(), str(side))
    return None


def load_config(file, from_dict: Callable[[dict], object], what: str, *, missing: str = "",
                legacy_keys: tuple[str, ...] = ()):
    """The config of a small saved model ``file`` (its metadata, else ``<stem>.json``) built by ``from_dict``.
    ``FileNotFoundError`` for a missing file (``missing`` says how to make one); ``CheckpointError`` for no
    config or a bad one, naming ``what``."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no {what} weights{f' ({missing})' if missing else ''}")
    config = stored_config(file, legacy_keys=legacy_keys)
    if config is None:
        raise CheckpointError(f"{file}: no {what} config in the file's metadata nor in {file.with_suffix('.json')}")
    try:
        return from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: config: {exc}") from None


def _parse_config(text: str, where: str) -> dict:
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(config).__name__}")
    return config


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (" …" if len(keys) > _SHOW else "")


def load_weights(file, expected: Mapping[str, torch.Tensor] | torch.nn.Module, *,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read safetensors ``file``, checked against ``expected`` (a state dict -- meta tensors will do -- or a module,
    whose ``state_dict()`` is used); returns the tensors on the CPU, in ``expected``'s key order.

    The file must hold exactly ``expected``'s keys, each with its shape. Dtypes follow the module's policy: with
    ``dtype=None`` each tensor has the expected dtype; with a floating ``dtype`` floating tensors may be stored in
    any floating dtype and come back as ``dtype``, integer and bool tensors must match. Floating tensors must be
    finite (checked after the cast, so an overflow to inf is caught too). Raises ``CheckpointError``.
    """
    file = Path(file)
    if isinstance(expected, torch.nn.Module):
        expected = expected.state_dict()
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"load_weights: dtype must be a floating dtype, got {dtype}")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                parts = ([f"missing tensor(s) {_listed(missing)}"] if missing else []) + (
                    [f"unexpected tensor(s) {_listed(unexpected)}"] if unexpected else [])
                raise CheckpointError(f"{file}: {'; '.join(parts)}")
            tensors = {}
            for key, want in expected.items():
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(want.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(want.shape)}")
                tensors[key] = _check_finite(file, key, _check_dtype(file, key, t, want.dtype, dtype))
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    return tensors


def _check_finite(file: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise CheckpointError(f"{file}: tensor {key!r} has {int(bad.sum())} non-finite value(s) of {t.numel()} "
                                  f"(first at index {first}: {float(t[first])})")
    return t


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(nbytes: int, what: str) -> None:
    """Raise ``CheckpointError`` if ``nbytes`` (a loader's estimate of its peak, taken before it allocates) exceeds
    the machine's available memory; a no-op where that is unknown."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise CheckpointError(f"{what}: loading needs about {nbytes / 2**30:.2f} GiB ({nbytes} bytes) of memory, "
                              f"only {available / 2**30:.2f} GiB is available (MemAvailable in /proc/meminfo)")


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (persistent or not); works on a meta-device skeleton."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_module(file, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Load a small saved model without allocating it before its file is checked: ``build()`` runs once on the meta
    device (a skeleton: the expected tensors and the size), the memory estimate (the module plus the tensors read
    from the file) is checked, the file is read and checked against the skeleton, and only then ``build()`` runs
    for real and takes the tensors. Floating tensors may be stored in any floating dtype (``save_module(dtype=)``)
    and come back in the module's; integer and bool tensors must match. Raises ``CheckpointError``."""
    with torch.device("meta"):
        skeleton = build()
    check_memory(2 * module_nbytes(skeleton), str(file))
    floating = {t.dtype for t in skeleton.state_dict().values() if t.is_floating_point()}
    tensors = load_weights(file, skeleton, dtype=floating.pop() if len(floating) == 1 else None)
    module = build()
    module.load_state_dict(tensors)
    return module


def _check_dtype(file: Path, key: str, t: torch.Tensor, want: torch.dtype, requested: torch.dtype | None):
    if requested is not None and want.is_floating_point:
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected a floating dtype "
                                  f"(loaded as {requested})")
        return t.to(requested)
    if t.dtype != want:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected {want}")
    return t
