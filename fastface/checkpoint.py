"""Checkpoints: a directory, never pickle.

    config.json                  {"format_version": 1, "model_type": "fastface", "dtype": ..., "model": {...},
                                  "image_tokenizer": {...} | null}
    model.safetensors            transformer weights (names of ``FaceTransformer.state_dict()``)
    tokenizer.json               HF ``tokenizers`` text tokenizer (special tokens at the config's special_token_ids)
    image_tokenizer.safetensors  VQ image tokenizer weights (when the config names one)

Loading validates everything before building anything: a missing file, an unreadable or truncated
safetensors file, a wrong format version, an unknown config field, a config value of the wrong type, out of its
bound (``MAX_*`` in ``fastface.config`` and ``fastface.vq.model``) or not finite, a model whose estimated memory
(``load_bytes``) exceeds what the machine has available, missing or unexpected tensors, a shape or dtype mismatch,
a NaN or inf weight -- each raises ``CheckpointError`` (a ``ValueError``) naming the file, key or field. The tensor
files are read and written by ``fastface.weights`` (which also stores the config in each file's metadata;
config.json stays the authority when loading); every file is written to a temporary name and renamed, so an
interrupted save never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastface.config import SPECIAL_TOKENS, FaceConfig
from fastface.weights import (
    CheckpointError,
    atomic_write,
    check_memory,
    load_module,
    load_weights,
    module_nbytes,
    save_weights,
)

FORMAT_VERSION = 1
MODEL_TYPE = "fastface"
CONFIG_FIELDS = {"format_version", "model_type", "dtype", "model", "image_tokenizer", "embedder"}
EMBEDDER_FILE = "facetext.safetensors"  # the understanding embeddings' model (e_sem, e_id), when a checkpoint has one
TOWER_FILE = "facetext_tower.safetensors"  # its image tower (a locked Faceptor, kept apart from the perception model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported checkpoint dtype {dtype}")


def save_checkpoint(path, model, tokenizer, image_tokenizer=None, *, dtype: str | None = None,
                    embedder=None) -> Path:
    """Write ``model`` (a FaceTransformer), ``tokenizer`` (tokenizers.Tokenizer) and optionally the image
    tokenizer (an object with ``config.to_dict()`` and ``state_dict()``) and the embedder the model was trained
    with (a ``fastface.facetext.model.FaceTextModel``: e_sem and e_id of understanding images) to directory
    ``path``."""
    state = model.state_dict()
    return save_state(path, model.config, state, tokenizer, image_tokenizer,
                      dtype=dtype or dtype_name(next(iter(state.values())).dtype), embedder=embedder)


def save_state(path, config: FaceConfig, state: dict, tokenizer, image_tokenizer=None, *, dtype: str,
               embedder=None) -> Path:
    """Write a checkpoint directory from a ``FaceTransformer(config)`` state dict without building the model
    (converters write multi-GB models this way). The tensors are checked against a meta-device skeleton first:
    keys and shapes, a ``CheckpointError`` naming the first that differs."""
    from fastface.model import FaceTransformer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with torch.device("meta"):
        expected = FaceTransformer(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not fit the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, the config needs "
                                  f"{tuple(want.shape)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vq_config = _image_tokenizer_dict(image_tokenizer) if image_tokenizer is not None else None
    meta = {"format_version": FORMAT_VERSION, "model_type": MODEL_TYPE, "dtype": dtype,
            "model": config.to_dict(), "image_tokenizer": vq_config}
    if embedder is not None:
        check_embedder(embedder, config, str(path))
        meta["embedder"] = EMBEDDER_FILE
    save_weights(path / "model.safetensors", {k: state[k] for k in expected}, config=meta, dtype=DTYPES[dtype])
    atomic_write(path / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    if image_tokenizer is not None:
        save_weights(path / "image_tokenizer.safetensors", image_tokenizer.state_dict(), config=vq_config)
    if embedder is not None:
        from fastface.perception.perceptor import Perceptor

        tower = Perceptor(embedder.tower).save(path / TOWER_FILE)
        embedder.config.tokenizer = "tokenizer.json"
        embedder.save(path / EMBEDDER_FILE, tower_path=tower)
    atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing config.json")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: an int
        # past Python's digit limit; RecursionError: nesting deeper than the parser's stack
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    unknown = sorted(set(config) - CONFIG_FIELDS)
    if unknown:
        raise CheckpointError(f"{file}: unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted({"format_version", "model_type", "model"} - set(config))
    if missing:
        raise CheckpointError(f"{file}: missing field(s) {', '.join(map(repr, missing))}")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {config['format_version']!r} is not supported "
                              f"(this fastface reads version {FORMAT_VERSION})")
    if config["model_type"] != MODEL_TYPE:
        raise CheckpointError(f"{file}: model_type {config['model_type']!r} is not {MODEL_TYPE!r}")
    if not isinstance(config.get("dtype", "float32"), str) or config.get("dtype", "float32") not in DTYPES:
        raise CheckpointError(f"{file}: dtype {config['dtype']!r:.60} is not one of {sorted(DTYPES)}")
    if not isinstance(config["model"], dict):
        raise CheckpointError(f"{file}: field 'model' must be a JSON object, got {type(config['model']).__name__}")
    try:
        config["model"] = FaceConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: field 'model': {exc}") from None
    embedder = config.get("embedder")
    if embedder is not None and (not isinstance(embedder, str) or Path(embedder).name != embedder or not embedder):
        raise CheckpointError(f"{file}: field 'embedder' must be null or a file name in the checkpoint, "
                              f"got {embedder!r:.60}")
    return config


def check_embedder(embedder, config: FaceConfig, where: str) -> None:
    """An embedder fits a transformer when its widths are the sequence experts' ``sem_dim`` and ``id_dim``."""
    if (embedder.embed_dim, embedder.id_dim) != (config.sem_dim, config.id_dim):
        raise CheckpointError(f"{where}: the embedder gives e_sem [{embedder.embed_dim}] and e_id "
                              f"[{embedder.id_dim}]; the model reads sem_dim={config.sem_dim}, id_dim={config.id_dim}")


def load_embedder(path, config: dict):
    """The embedder a checkpoint's config names (a ``FaceTextModel``), or None when it names none."""
    name = config.get("embedder")
    if name is None:
        return None
    from fastface.facetext.model import FaceTextModel

    embedder = FaceTextModel.load(Path(path) / name)
    check_embedder(embedder, config["model"], str(path))
    return embedder


def load_tokenizer(file: Path, config: FaceConfig):
    from tokenizers import Tokenizer

    from fastface.tokenizer import text_only

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{file}: not a readable tokenizer ({exc})") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != config.text_vocab_size:
        raise CheckpointError(f"{file}: vocabulary has {size} tokens, config text_vocab_size is "
                              f"{config.text_vocab_size}")
    if config.special_token_ids == tuple(range(len(SPECIAL_TOKENS))):  # fastface's own layout, by spelling
        for token, i in zip(SPECIAL_TOKENS, config.special_token_ids):
            if tokenizer.token_to_id(token) != i:
                raise CheckpointError(f"{file}: special token {token!r} must have id {i}, "
                                      f"got {tokenizer.token_to_id(token)}")
    else:  # another model's layout (Show-o's): each special id must be one of the tokenizer's added tokens
        added = set(tokenizer.get_added_tokens_decoder())
        for token, i in zip(SPECIAL_TOKENS, config.special_token_ids):
            if i not in added:
                raise CheckpointError(f"{file}: the config's {token} id {i} is not an added token of this tokenizer "
                                      f"({tokenizer.id_to_token(i)!r})")
    return text_only(tokenizer)


def image_tokenizer_config(data: dict):
    """The image tokenizer a checkpoint's ``image_tokenizer`` config describes -> (module class, its config):
    fastface's VQ model, or MAGVIT-v2 (Show-o's) when the dict says ``"_class_name": "MAGVITv2"``."""
    if not isinstance(data, dict):
        raise TypeError(f"image tokenizer config must be a JSON object, got {type(data).__name__}")
    from fastface.vq.magvit import CLASS_NAMES, MagvitConfig, MagvitTokenizer

    if data.get("_class_name") in CLASS_NAMES:
        return MagvitTokenizer, MagvitConfig.from_dict(data)
    from fastface.vq.model import VQConfig, VQModel

    return VQModel, VQConfig.from_dict(data)


def _image_tokenizer_dict(image_tokenizer) -> dict:
    from fastface.vq.magvit import MagvitTokenizer

    out = image_tokenizer.config.to_dict()
    return {"_class_name": "MAGVITv2", **out} if isinstance(image_tokenizer, MagvitTokenizer) else out


def load_bytes(num_parameters: int, stored: torch.dtype, dtype: torch.dtype) -> int:
    """Peak bytes of memory ``load_checkpoint`` takes for a transformer of ``num_parameters``: the tensors read from
    the file (at the ``stored`` dtype) stay alive while the model is built in float32; on top of both, float32
    copies of the tensors (when stored in 16 bits) or the final cast to ``dtype`` (when not float32)."""
    itemsize = torch.empty((), dtype=stored).element_size()
    copies = 4 if stored != torch.float32 else 0
    cast = torch.empty((), dtype=dtype).element_size() if dtype != torch.float32 else 0
    return num_parameters * (itemsize + 4 + max(copies, cast))


def load_checkpoint(path, *, dtype: torch.dtype | str | None = None):
    """Load and validate a checkpoint directory -> (model, tokenizer, image_tokenizer or None, config dict).

    ``dtype`` casts the transformer after loading (default: the stored dtype).
    """
    from fastface.model import FaceTransformer

    path = Path(path)
    config = read_config(path)
    cfg: FaceConfig = config["model"]
    stored = DTYPES[config.get("dtype", "float32")]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    vq_config = vq_class = None
    if config.get("image_tokenizer") is not None:
        try:
            vq_class, vq_config = image_tokenizer_config(config["image_tokenizer"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / 'config.json'}: field 'image_tokenizer': {exc}") from None
    # the memory estimate, before anything is allocated (the image tokenizer's size from a meta skeleton)
    need = load_bytes(cfg.num_parameters(), stored, dtype or torch.float32)
    if vq_config is not None:
        with torch.device("meta"):
            need += 2 * module_nbytes(vq_class(vq_config))
    check_memory(need, str(path))
    with torch.device("meta"):
        skeleton = FaceTransformer(cfg)
    expected = {k: v.to(stored) if v.is_floating_point() else v for k, v in skeleton.state_dict().items()}
    tensors = load_weights(path / "model.safetensors", expected)  # stored exactly as config.json says
    tokenizer = load_tokenizer(path / "tokenizer.json", cfg)
    image_tokenizer = None
    if vq_config is not None:
        image_tokenizer = load_module(path / "image_tokenizer.safetensors", lambda: vq_class(vq_config)).eval()
    model = FaceTransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model = model.to(dtype or torch.float32).eval()
    return model, tokenizer, image_tokenizer, config
