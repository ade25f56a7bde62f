"""Command line: ``fastface generate | answer | describe | edit | bench | train | eval | serve | convert | ...``.

    fastface generate "a woman with red hair and green eyes" --num-images 4 --grid -o face.png
    fastface answer face.png "what colour is her hair?"
    fastface describe face.png                            # a caption, decoded in parallel
    fastface edit face.png "a woman with blue hair" --region hair -o edited.png
    fastface bench --batch 1 4 16 --json bench.json --plot bench.png
    fastface train --preset face-s --out runs/face-s

Bad arguments, unreadable inputs and unwritable outputs end with a one-line error on stderr and exit status 2,
never a traceback (``FASTFACE_DEBUG=1`` re-raises, for bug reports). Every output file (images, grid, ``--tokens``)
is written to a temporary file in its directory and renamed into place (``weights.atomic_write``): a reader, or a
second process writing the same path, sees a whole old file or a whole new one. Input pictures are read by
``fastface.images.open_image``, the conversion ``Pipeline.encode_images`` applies to PIL images.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

from fastface.backends import CHOICES
from fastface.checks import (
    DTYPE_NAMES,
    WEIGHT_FORMATS,
    arg_finite_float,
    arg_nonnegative_int,
    arg_positive_int,
    arg_probability,
)
from fastface.config import MAX_IMAGE_GRID
from fastface.images import MAX_SIDE
from fastface.ops.masked_decode import SCHEDULES


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_model_options(p):
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded face model)")
    p.add_argument("--backend", default="auto", choices=list(CHOICES),
                   help="kernels: auto (the fastest available on this device), reference (the plain PyTorch "
                   "oracle, a full forward every step), torch (fast PyTorch paths), cpp (CPU kernels), triton (GPU "
                   "kernels) (default: auto)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES),
                   help="transformer precision; bfloat16 runs on the CPU's bf16 matrix units (default: float32)")
    p.add_argument("--weights", default="float", choices=list(WEIGHT_FORMATS),
                   help="attention and expert weights: float (as the checkpoint stores them) or int8 (per-channel "
                   "int8, quantised at load, forward only; about 1%% error per matmul) (default: float)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastface", description="Draw faces from text and answer questions "
                                     "about faces with a unified face model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="draw faces from text prompts",
                       description="Draw one face per prompt (times --num-images) and save PNG files.")
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="text description of a face")
    g.add_argument("-o", "--output", default="face.png",
                   help="output image path (PNG unless its extension names another format Pillow writes, e.g. "
                   ".jpg; no extension means .png); with several images, -1, -2, … are appended to the name; an "
                   "existing directory DIR means DIR/face.png (DIR/face-1.png, … for several); each file is "
                   "written to a temporary file beside it and renamed into place (default: face.png)")
    g.add_argument("--num-images", type=arg_positive_int, default=1, help="images per prompt (default: 1)")
    g.add_argument("--steps", type=arg_positive_int, default=16, help="parallel decoding steps (default: 16)")
    g.add_argument("--guidance", type=arg_finite_float, default=2.0,
                   help="classifier-free guidance weight; 0 disables the unconditional pass (default: 2.0)")
    g.add_argument("--seed", type=arg_nonnegative_int, default=0,
                   help="seed of the first image; image i uses seed + i (default: 0)")
    g.add_argument("--schedule", default="cosine", choices=list(SCHEDULES),
                   help="how fast tokens are unmasked over the steps (default: cosine)")
    g.add_argument("--threshold", type=arg_probability, default=None,
                   help="also accept every token sampled with at least this probability, so decoding can finish "
                   "in fewer steps (default: off, the exact schedule)")
    g.add_argument("--guidance-steps", type=arg_nonnegative_int, default=None, metavar="K",
                   help="faster than exact: guidance on the first K steps only, later steps skip the unconditional "
                   "pass (default: every step)")
    g.add_argument("--uncond-refresh", type=arg_positive_int, default=None, metavar="R",
                   help="faster than exact: run the unconditional pass every R guided steps, the steps between guided "
                   "by its last logits (default: every step)")
    g.add_argument("--kv-refresh", type=arg_positive_int, default=None, metavar="R",
                   help="faster than exact: run the whole image every R steps and only its still-masked positions "
                   "in between, reusing the other positions' keys/values (default: every step, exact)")
    g.add_argument("--grid", action="store_true",
                   help="also save all images as one grid (<output>-grid, with the output's extension)")
    g.add_argument("--tokens", default=None, metavar="PATH",
                   help="also save the codebook ids as a .npy array [images, tokens] int64 (readable by 'answer'); "
                   ".npy is appended when PATH does not end with it, an existing directory DIR means "
                   "DIR/tokens.npy; written atomically like the images")
    _add_model_options(g)

    a = sub.add_parser("answer", help="answer a question about a face image",
                       description="Answer a question about a face picture.")
    a.add_argument("image", help=f"face picture (any file Pillow reads, at most {MAX_SIDE}x{MAX_SIDE} pixels: "
                   "16-bit gray is scaled to 8 bits, transparency is composited over white, palette/CMYK/gray become "
                   "RGB), or a .npy of codebook ids [N] or [images, N] saved by 'generate --tokens' (its first row "
                   "is used)")
    a.add_argument("question", help="question, e.g. 'what colour are her eyes?'")
    a.add_argument("--max-new-tokens", type=arg_positive_int, default=None,
                   help="answer length limit in tokens (default: the model's max_answer_len)")
    _add_model_options(a)

    image_help = ("face picture (any file Pillow reads; as for 'answer'), or a .npy of codebook ids [N] or [images, N] "
                  "saved by 'generate --tokens' (its first row)")
    d = sub.add_parser("describe", help="caption face images",
                       description="Caption face pictures: by masked diffusion (the caption decoded in parallel, "
                       "default) or autoregressively.")
    d.add_argument("images", nargs="+", metavar="IMAGE", help=image_help)
    d.add_argument("--mode", default="diffusion", choices=["diffusion", "autoregressive"],
                   help="diffusion: every caption token decoded in parallel over --steps; autoregressive: one token "
                   "at a time (default: diffusion)")
    d.add_argument("--steps", type=arg_positive_int, default=16, help="parallel decoding steps (default: 16)")
    d.add_argument("--guidance", type=arg_finite_float, default=0.0,
                   help="classifier-free guidance against a fully masked image (diffusion; default: 0)")
    d.add_argument("--seed", type=arg_nonnegative_int, default=0, help="seed of the first image (default: 0)")
    d.add_argument("--json", action="store_true", help="print a JSON list of {image, caption}")
    _add_model_options(d)

    from fastface.regions import region_names

    e = sub.add_parser("edit", help="re-draw a region of a face under a new prompt",
                       description="Re-draw one region of a face picture under a prompt: every image token outside "
                       "the region is kept, the tokens inside are decoded again.")
    e.add_argument("image", help=image_help)
    e.add_argument("prompt", help="text description of the edited face, e.g. 'a woman with blue hair'")
    e.add_argument("--region", required=True,
                   help=f"what to re-draw: {', '.join(region_names())} (read from the perception model's parsing of "
                   "the picture), or a mask file: .png (non-zero pixels, the picture's size) or .npy (bool or 0/1, "
                   "pixels [S, S] or tokens [N] / [grid, grid])")
    e.add_argument("--grow", type=arg_nonnegative_int, default=0, help="widen the region by this many tokens "
                   "(default: 0)")
    e.add_argument("-o", "--output", default="edited.png",
                   help="output image path; an existing directory DIR means DIR/edited.png (default: edited.png)")
    e.add_argument("--steps", type=arg_positive_int, default=16, help="parallel decoding steps (default: 16)")
    e.add_argument("--guidance", type=arg_finite_float, default=2.0,
                   help="classifier-free guidance weight (default: 2.0)")
    e.add_argument("--seed", type=arg_nonnegative_int, default=0, help="seed (default: 0)")
    _add_model_options(e)

    b = sub.add_parser("bench", help="tokens per second per backend, dtype and batch",
                       description="Image tokens/s (generation) and text tokens/s (answering) per backend, dtype and "
                       "batch, the reference in the same run; JSON and a plot.")
    from fastface import benchmark

    benchmark.add_arguments(b)

    for name, module, helptext in (("train", "fastface.train", "train a model"),
                                   ("eval", "fastface.evaluate", "evaluate a checkpoint"),
                                   ("serve", "fastface.server", "serve the model over HTTP (OpenAI-compatible)"),
                                   ("convert", "fastface.convert", "convert another model's checkpoint"),
                                   ("perceive", "fastface.perception.cli",
                                    "landmarks, parsing, attributes and identity of face images"),
                                   ("search", "fastface.facetext.cli", "rank a folder of face images by a text")):
        _add_delegated(sub, name, module, helptext)
    return parser


_UNAVAILABLE: dict[str, str] = {}


def _add_delegated(sub, name, module, helptext):
    """A subcommand whose options and behaviour live in ``module`` (``add_arguments(parser)``, and ``run(args)``
    returning the exit status).

    When the module cannot be imported the subcommand still exists (so ``--help`` works) and says why it cannot
    run.
    """
    try:
        mod = importlib.import_module(module)
        add = mod.add_arguments
    except (ImportError, AttributeError) as exc:
        _UNAVAILABLE[name] = f"{module} is not available in this install ({exc})"
        p = sub.add_parser(name, help=f"{helptext} (unavailable: {module} missing)", add_help=True)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    p = sub.add_parser(name, help=helptext, description=(mod.__doc__ or helptext).strip().split("\n\n")[0])
    add(p)
    p.set_defaults(_module=module)


def _load(args):
    import fastface

    try:
        return fastface.load(args.model, backend=args.backend, dtype=args.dtype, weights=args.weights)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _progress(total, desc, quiet):
    """A tqdm bar on stderr that appears only once the work has taken more than a second."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, delay=1.0, disable=quiet, leave=False)


def _output_path(arg: str, default_name: str, what: str) -> Path:
    """The file an output option names: ``DIR/default_name`` for an existing directory, else the path itself (whose
    directory must exist)."""
    path = Path(arg)
    if path.is_dir():
        path = path / default_name
    elif arg.endswith(("/", os.sep)):
        raise CLIError(f"{what} directory {arg!r} does not exist")
    folder = path.parent
    if not folder.exists():
        raise CLIError(f"{what} directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{what} directory {str(folder)!r} is not a directory")
    return path


def _check_writable(path: Path, what: str) -> None:
    """Create and remove a file beside ``path``: an unwritable destination fails before the generation, not after."""
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.probe-")
    except OSError as exc:
        raise CLIError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _image_format(path: Path) -> str:
    """The Pillow format that writes ``path``'s extension (the temporary name's extension says nothing)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise CLIError(f"cannot write images with extension {path.suffix!r} ({str(path)!r}); use .png")
    return fmt


def _write(path: Path, write, what: str) -> None:
    """``write(tmp)`` then rename onto ``path`` (``atomic_write``); an OSError becomes a one-line CLIError."""
    from fastface.weights import atomic_write

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise CLIError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    print(path)


def _save_ids(path: Path, ids) -> None:
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, ids, allow_pickle=False)

    _write(path, write, "codebook ids")


def cmd_generate(args):
    from fastface.grid import image_grid, output_paths

    out = _output_path(args.output, "face.png", "output")
    if out.suffix == "":
        out = out.with_suffix(".png")
    fmt = _image_format(out)
    tokens_path = None
    if args.tokens:
        tokens_path = _output_path(args.tokens, "tokens.npy", "--tokens")
        if tokens_path.suffix != ".npy":
            tokens_path = tokens_path.with_name(tokens_path.name + ".npy")
    pipe = _load(args)
    if pipe.image_tokenizer is None and tokens_path is None:
        raise CLIError("this checkpoint has no image tokenizer, so it cannot write images; pass --tokens PATH to "
                       "save the codebook ids instead")
    if tokens_path is not None:
        _check_writable(tokens_path, "codebook ids")
    if pipe.image_tokenizer is not None:
        _check_writable(out, "image")
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    with _progress(args.steps, f"generating {len(prompts)} image(s)", args.quiet) as bar:
        tokens = pipe.generate_tokens(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                      schedule=args.schedule, threshold=args.threshold,
                                      guidance_steps=args.guidance_steps, uncond_refresh=args.uncond_refresh,
                                      kv_refresh=args.kv_refresh,
                                      callback=lambda step, t, m: bar.update(1))
    if tokens_path is not None:
        _save_ids(tokens_path, tokens.numpy().astype("int64"))
    if pipe.image_tokenizer is None:
        return
    images = pipe.decode_images(tokens)
    for img, path in zip(images, output_paths(out, len(images))):
        _write(path, lambda tmp, img=img: img.save(tmp, format=fmt), "image")
    if args.grid:
        grid = image_grid(images)
        _write(out.with_name(f"{out.stem}-grid{out.suffix}"), lambda tmp: grid.save(tmp, format=fmt), "grid")


def _read_tokens(path: Path):
    """Codebook ids [1, N] int64 from a .npy file of ids [N] or [images, N] (its first row).

    The file is memory-mapped, so only its header and first row are read, whatever size it claims.
    """
    import numpy as np
    import torch

    where = f"codebook ids file {str(path)!r}"
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CLIError(f"cannot read {where}: {exc}") from None
    if not isinstance(ids, np.ndarray):  # an .npz archive under a .npy name
        ids.close()
        raise CLIError(f"{where} holds an archive of arrays; expected one .npy array [N] or [images, N]")
    if ids.dtype.kind not in "iu":
        raise CLIError(f"{where} must hold integer codebook ids, got {ids.dtype}")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise CLIError(f"{where} must hold codebook ids of shape [N] or [images, N], got shape {ids.shape}")
    if ids.shape[-1] > MAX_IMAGE_GRID**2:
        raise CLIError(f"{where} holds {ids.shape[-1]} ids per image; at most {MAX_IMAGE_GRID**2} are possible")
    first = np.array(ids if ids.ndim == 1 else ids[0], dtype=np.int64)  # [N], copied out of the map
    del ids
    return torch.from_numpy(first)[None]  # [1, N]


def _read_image(path_text: str):
    """A picture file -> [PIL image], or a .npy of codebook ids -> ids [1, N]."""
    from PIL import Image

    from fastface.images import open_image

    path = Path(path_text)
    if not path.is_file():
        raise CLIError(f"image file {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        return _read_tokens(path)
    with warnings.catch_warnings():  # a header past Pillow's MAX_IMAGE_PIXELS: an error, not a warning line
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return [open_image(path)]


def _check_ids(pipe, images, path_text: str) -> None:
    if not isinstance(images, list) and images.shape[1] != pipe.config.image_tokens:
        raise CLIError(f"codebook ids file {path_text!r} holds {images.shape[1]} ids per image; this model's "
                       f"images have {pipe.config.image_tokens}")


def cmd_answer(args):
    images = _read_image(args.image)
    if not args.question.strip():
        raise CLIError("the question is empty")
    pipe = _load(args)
    _check_ids(pipe, images, args.image)
    print(pipe.answer(images, [args.question], max_new_tokens=args.max_new_tokens)[0])


def cmd_describe(args):
    import json

    import torch

    inputs = [_read_image(p) for p in args.images]
    pipe = _load(args)
    for images, path in zip(inputs, args.images):
        _check_ids(pipe, images, path)
    captions = []
    for b, images in enumerate(inputs):  # each picture with its own seed: the same caption alone or in a list
        if not isinstance(images, list):
            images = torch.as_tensor(images)
        captions += pipe.describe(images, mode=args.mode, steps=args.steps, guidance=args.guidance,
                                  seed=args.seed + b)
    if args.json:
        print(json.dumps([{"image": p, "caption": c} for p, c in zip(args.images, captions)], indent=2))
    else:
        for c in captions:
            print(c)


def _read_region(text: str):
    """--region: a region name, or a mask file (.png / .npy) -> a name or a bool array."""
    import numpy as np

    from fastface.regions import REGIONS

    if text in REGIONS:
        return text
    path = Path(text)
    if path.suffix.lower() not in (".png", ".npy"):
        raise CLIError(f"--region must be one of {', '.join(REGIONS)} or a mask file (.png, .npy), got {text!r}")
    if not path.is_file():
        raise CLIError(f"region mask file {text!r} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                mask = np.asarray(img.convert("L"))
    except (ValueError, OSError, EOFError) as exc:
        raise CLIError(f"cannot read region mask file {text!r}: {exc}") from None
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biu":
        raise CLIError(f"region mask file {text!r} must hold one bool or integer array")
    return mask != 0


def cmd_edit(args):
    out = _output_path(args.output, "edited.png", "output")
    if out.suffix == "":
        out = out.with_suffix(".png")
    fmt = _image_format(out)
    images = _read_image(args.image)
    region = _read_region(args.region)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    pipe = _load(args)
    _check_ids(pipe, images, args.image)
    if pipe.image_tokenizer is None:
        raise CLIError("this checkpoint has no image tokenizer, so it cannot write images")
    _check_writable(out, "image")
    edited = pipe.edit(images, [args.prompt], region, steps=args.steps, guidance=args.guidance, seed=args.seed,
                       grow=args.grow)[0]
    _write(out, lambda tmp: edited.save(tmp, format=fmt), "image")


def cmd_bench(args):
    from fastface import benchmark

    return benchmark.run(args)


def cmd_delegated(args):
    if args.command in _UNAVAILABLE:
        raise CLIError(_UNAVAILABLE[args.command])
    return importlib.import_module(args._module).run(args)


COMMANDS = {"generate": cmd_generate, "answer": cmd_answer, "describe": cmd_describe, "edit": cmd_edit,
            "bench": cmd_bench, "train": cmd_delegated,
            "eval": cmd_delegated, "serve": cmd_delegated, "convert": cmd_delegated,
            "perceive": cmd_delegated, "search": cmd_delegated}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except (CLIError, ValueError, TypeError, RuntimeError, OSError) as exc:
        if os.environ.get("FASTFACE_DEBUG") == "1":
            raise
        print(f"fastface {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    # run the package's own module, not this __main__ copy: subcommand modules raise fastface.cli.CLIError, which
    # would be another class than __main__.CLIError and escape as a traceback
    from fastface.cli import main as _package_main

    sys.exit(_package_main())
