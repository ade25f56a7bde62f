"""Command line: ``fastface generate | answer | bench | train | eval``.

    fastface generate "a woman with red hair and green eyes" --num-images 4 --grid -o face.png
    fastface answer face.png "what colour is her hair?"
    fastface bench --batch 1 4 16 --json bench.json --plot bench.png
    fastface train --preset face-s --out runs/face-s

Bad arguments end with a one-line error on stderr and exit status 2, never a traceback
(``FASTFACE_DEBUG=1`` re-raises, for bug reports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from fastface.backends import CHOICES
from fastface.checks import DTYPE_NAMES, arg_finite_float, arg_nonnegative_int, arg_positive_int, arg_probability
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastface", description="Draw faces from text and answer questions "
                                     "about faces with a unified face model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="draw faces from text prompts",
                       description="Draw one face per prompt (times --num-images) and save PNG files.")
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="text description of a face")
    g.add_argument("-o", "--output", default="face.png",
                   help="output PNG path; with several images, -1, -2, … are appended (default: face.png)")
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
    g.add_argument("--grid", action="store_true", help="also save all images as one grid (<output>-grid.png)")
    g.add_argument("--tokens", default=None, metavar="PATH",
                   help="also save the codebook ids as a .npy array [images, tokens] (readable by 'answer')")
    _add_model_options(g)

    a = sub.add_parser("answer", help="answer a question about a face image",
                       description="Answer a question about a face picture.")
    a.add_argument("image", help="face picture (PNG/JPEG), or a .npy of codebook ids saved by 'generate --tokens'")
    a.add_argument("question", help="question, e.g. 'what colour are her eyes?'")
    a.add_argument("--max-new-tokens", type=arg_positive_int, default=None,
                   help="answer length limit in tokens (default: the model's max_answer_len)")
    _add_model_options(a)

    b = sub.add_parser("bench", help="tokens per second per backend, dtype and batch",
                       description="Image tokens/s (generation) and text tokens/s (answering) per backend, dtype and "
                       "batch, the reference in the same run; JSON and a plot.")
    from fastface import benchmark

    benchmark.add_arguments(b)

    for name, module, helptext in (("train", "fastface.train", "train a model"),
                                   ("eval", "fastface.evaluate", "evaluate a checkpoint")):
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
        return fastface.load(args.model, backend=args.backend, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _progress(total, desc, quiet):
    """A tqdm bar on stderr that appears only once the work has taken more than a second."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, delay=1.0, disable=quiet, leave=False)


def cmd_generate(args):
    import numpy as np

    from fastface.grid import image_grid, output_paths

    out = Path(args.output)
    if not out.parent.exists():
        raise CLIError(f"output directory {str(out.parent)!r} does not exist")
    if args.tokens and not Path(args.tokens).parent.exists():
        raise CLIError(f"directory of --tokens {str(Path(args.tokens).parent)!r} does not exist")
    pipe = _load(args)
    if pipe.image_tokenizer is None and not args.tokens:
        raise CLIError("this checkpoint has no image tokenizer, so it cannot write images; pass --tokens PATH to "
                       "save the codebook ids instead")
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    with _progress(args.steps, f"generating {len(prompts)} image(s)", args.quiet) as bar:
        tokens = pipe.generate_tokens(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                      schedule=args.schedule, threshold=args.threshold,
                                      callback=lambda step, t, m: bar.update(1))
    if args.tokens:
        np.save(args.tokens, tokens.numpy().astype(np.int64), allow_pickle=False)
        print(args.tokens)
    if pipe.image_tokenizer is None:
        return
    images = pipe.decode_images(tokens)
    paths = output_paths(out, len(images))
    for img, path in zip(images, paths):
        img.save(path)
        print(path)
    if args.grid:
        grid_path = out.with_name(f"{out.stem}-grid{out.suffix or '.png'}")
        image_grid(images).save(grid_path)
        print(grid_path)


def _read_image(path: Path):
    """A PIL image, or codebook ids [1, N] from a .npy file."""
    if path.suffix.lower() == ".npy":
        import numpy as np
        import torch

        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CLIError(f"cannot read codebook ids from {str(path)!r}: {exc}") from None
        if ids.dtype.kind not in "iu":
            raise CLIError(f"{str(path)!r} must hold integer codebook ids, got {ids.dtype}")
        ids = torch.from_numpy(ids.astype(np.int64))
        return ids[None] if ids.dim() == 1 else ids[:1]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CLIError(f"cannot read image {str(path)!r}: {exc}") from None


def cmd_answer(args):
    path = Path(args.image)
    if not path.is_file():
        raise CLIError(f"image file {str(path)!r} does not exist")
    image = _read_image(path)
    if not args.question.strip():
        raise CLIError("the question is empty")
    pipe = _load(args)
    images = image if not hasattr(image, "convert") else [image]
    print(pipe.answer(images, [args.question], max_new_tokens=args.max_new_tokens)[0])


def cmd_bench(args):
    from fastface import benchmark

    return benchmark.run(args)


def cmd_delegated(args):
    if args.command in _UNAVAILABLE:
        raise CLIError(_UNAVAILABLE[args.command])
    return importlib.import_module(args._module).run(args)


COMMANDS = {"generate": cmd_generate, "answer": cmd_answer, "bench": cmd_bench, "train": cmd_delegated,
            "eval": cmd_delegated}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except (CLIError, ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        if os.environ.get("FASTFACE_DEBUG") == "1":
            raise
        print(f"fastface {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
