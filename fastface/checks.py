"""Argument validation, in one place: the ops, the pipeline, the CLI, the benchmark and the evaluation all check
their arguments with these functions, so one rule gives one message everywhere.

Python-level checks raise ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value), naming
the argument. The ``arg_*`` functions are ``argparse`` types built from the same rules: they raise
``argparse.ArgumentTypeError``, which argparse turns into a one-line usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16)
DTYPE_NAMES = ("float32", "bfloat16")
WEIGHT_FORMATS = ("float", "int8")  # fastface.quantization: int8 attention and expert weights, opt-in


# --------------------------------------------------------------------------------------------- tensors


def check_tensor(name: str, t, ndim: int | None, dtypes=None) -> None:
    """A tensor of ``ndim`` dims (None: any) and one of ``dtypes`` (None: any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------- numbers


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} out of range [{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}]")
    return value


def check_float(name: str, value, *, lo: float | None = None, positive: bool = False) -> float:
    """A finite number (int or float, not a bool), > 0 when ``positive``, >= lo when given."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return value


def check_probability(name: str, value) -> float:
    """A number in (0, 1] (confidence thresholds, nucleus mass)."""
    check_float(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_strings(name: str, values) -> list[str]:
    """A string or a non-empty list of strings -> list of strings."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} is empty: give at least one")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return list(values)


# ---------------------------------------------------------------------------------- argparse types


def _parse(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def arg_positive_int(text: str) -> int:
    value = _parse(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def arg_nonnegative_int(text: str) -> int:
    value = _parse(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def arg_finite_float(text: str) -> float:
    value = _parse(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def arg_nonnegative_float(text: str) -> float:
    value = arg_finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def arg_positive_float(text: str) -> float:
    value = arg_finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def arg_probability(text: str) -> float:
    value = arg_finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def check_uint8_images(images, size: int):
    """Pixels of images: a uint8 tensor or numpy array [B, size, size, 3] -> uint8 tensor (an image tokenizer's
    ``encode`` input)."""
    import numpy as np
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    S = size
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 tensor or array [B, {S}, {S}, 3], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [B, {S}, {S}, 3], got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (S, S, 3):
        raise ValueError(f"images must have shape [B, {S}, {S}, 3], got {tuple(images.shape)}")
    return images


def check_token_ids(ids, num_tokens: int, codebook_size: int):
    """Codebook ids of images: an int64/int32 tensor or numpy array [B, num_tokens] in [0, codebook_size) -> int64
    tensor (an image tokenizer's ``decode`` input)."""
    import numpy as np
    import torch

    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    N, K = num_tokens, codebook_size
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"token ids must be an int64 tensor [B, {N}], got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be int64 [B, {N}], got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] != N:
        raise ValueError(f"token ids must have shape [B, {N}], got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= K):
        raise ValueError(f"token ids must lie in [0, {K}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids.long()


# ----------------------------------------------------------------------------------- decoding options


# Bounds that keep every run finite and its arithmetic finite, the same for every backend:
MAX_STEPS = 1024  # Show-o samples in 16-50 steps; past N image tokens extra steps do nothing (each unmasks >= 1),
#                   and step_noise's per-(seed, step) generator seeds stay distinct below its stride of 1,000,003
MAX_NEW_TOKENS = 4096  # answer tokens per request (the key/value cache is allocated for all of them up front)
MAX_GUIDANCE = 1e3  # |w|: (1 + w) * cond - w * uncond stays finite for any finite float32 logits below ~1e35
MIN_TEMPERATURE = 1e-4  # logits / temperature stays finite for logits below ~1e34 (1e-45 overflowed to inf)
MAX_TEMPERATURE = 1e4


def check_bounded(name: str, value, lo: float, hi: float) -> float:
    """A finite number in [lo, hi]."""
    check_float(name, value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}], got {value!r}")
    return value


def check_decoding(*, steps, guidance, sample_temperature, confidence_temperature, schedule, threshold=None,
                   confidence_compounding=False, schedules=("cosine", "linear"), guidance_steps=None,
                   uncond_refresh=None, kv_refresh=None) -> None:
    """The options of a masked-decoding run, checked once before any work (the reference loop and the engine).

    ``guidance_steps`` (guidance on the first that many steps only), ``uncond_refresh`` (the unconditional rows run
    every that many guided steps) and ``kv_refresh`` (the engine recomputes every position every that many steps,
    only the changing ones in between) are opt-in, faster than exact."""
    check_int("steps", steps, 1, MAX_STEPS)
    if guidance_steps is not None:
        check_int("guidance_steps", guidance_steps, 0, MAX_STEPS)
    if uncond_refresh is not None:
        check_int("uncond_refresh", uncond_refresh, 1, MAX_STEPS)
    if kv_refresh is not None:
        check_int("kv_refresh", kv_refresh, 1, MAX_STEPS)
    check_bounded("guidance", guidance, -MAX_GUIDANCE, MAX_GUIDANCE)
    check_bounded("sample_temperature", sample_temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
    check_bounded("confidence_temperature", confidence_temperature, 0, MAX_TEMPERATURE)
    check_choice("schedule", schedule, schedules)
    if threshold is not None:
        check_probability("threshold", threshold)
    if not isinstance(confidence_compounding, bool):
        raise TypeError(f"confidence_compounding must be True or False, got {type(confidence_compounding).__name__}")


# ------------------------------------------------------------------------------------ saved-model configs
# A config read from a file is data: a wrong type is a bad value, so every failure below is a ``ValueError``
# naming the field and the value (shortened), raised before anything is allocated.


def _shown(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (Python's digit limit)
        return f"<{type(value).__name__} too long to print>"
    return text if len(text) <= 60 else text[:57] + "..."


def check_config_int(field: str, value, lo: int, hi: int) -> int:
    """Config field ``field``: an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config field {field!r} must be an int in [{lo}, {hi}], got {_shown(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"config field {field!r}={_shown(value)} out of range [{lo}, {hi}]")
    return value


def check_config_ints(field: str, values, lo: int, hi: int, *, min_len: int = 1, max_len: int) -> tuple[int, ...]:
    """Config field ``field``: a list or tuple of ``min_len`` to ``max_len`` ints, each in [lo, hi] -> a tuple."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"config field {field!r} must be a list of ints, got {_shown(values)}")
    if not min_len <= len(values) <= max_len:
        raise ValueError(f"config field {field!r} must hold {min_len} to {max_len} values, got {len(values)}")
    for i, v in enumerate(values):
        check_config_int(f"{field}[{i}]", v, lo, hi)
    return tuple(values)


def check_config_float(field: str, value, *, lo: float | None = None, hi: float | None = None,
                       positive: bool = False) -> float:
    """Config field ``field``: a finite number (int or float, not a bool), > 0 when ``positive``, in [lo, hi]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"config field {field!r} must be a number, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # (math.isfinite(int) can overflow: ints are finite)
        raise ValueError(f"config field {field!r} must be a finite number, got {_shown(value)}")
    if (positive and value <= 0) or (lo is not None and value < lo) or (hi is not None and value > hi):
        low = "(0" if positive else f"[{lo if lo is not None else '-inf'}"
        raise ValueError(f"config field {field!r}={_shown(value)} out of range {low}, "
                         f"{hi if hi is not None else 'inf'}]")
    return value


def config_from_dict(cls, data, what: str, defaults: dict | None = None):
    """Dataclass ``cls`` from a config dict read from a file: a dict whose keys are all init fields of ``cls``
    (``defaults`` fill fields that older files lack). ``what`` names the config in the errors."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} config must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(map(repr, unknown))}")
    return cls(**{**(defaults or {}), **data})
