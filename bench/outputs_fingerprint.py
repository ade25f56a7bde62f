"""Record the embedded model's outputs for a fixed set of prompts, seeds and options, or compare with a record.

    python bench/outputs_fingerprint.py record before.json      # on the old code
    python bench/outputs_fingerprint.py compare before.json     # on the new code: exit 1 if anything differs

For changes that must not change results (moves, refactors): generated image tokens and answers for every backend
(reference, auto, cpp) and dtype, with and without guidance, several step counts, confidence-threshold decoding,
a batch of one, and greedy and nucleus answers. Floating-point results depend on the CPU's kernels, so compare
records made on the same machine.
"""

from __future__ import annotations

import json
import sys

import torch

import fastface

PROMPTS = ["a smiling woman with red hair and green eyes", "a young man with a black hat",
           "an old man with a grey beard, round glasses and blue eyes", "a bald man with a beard"]
QUESTIONS = ["what colour is her hair?", "is he wearing glasses?", "what colour are the eyes?", "does he have a beard?"]
CASES = [("auto", "float32"), ("auto", "bfloat16"), ("cpp", "float32"), ("cpp", "bfloat16"), ("reference", "float32")]


def record() -> dict:
    torch.set_num_threads(2)
    out = {}
    for backend, dtype in CASES:
        pipe = fastface.load(backend=backend, dtype=dtype)
        for steps, guidance in [(8, 2.0), (16, 2.0), (6, 0.0)]:
            tokens = pipe.generate_tokens(PROMPTS, steps=steps, guidance=guidance, seed=3)
            out[f"generate/{backend}/{dtype}/{steps}/{guidance}"] = tokens.tolist()
        out[f"generate1/{backend}/{dtype}"] = pipe.generate_tokens(PROMPTS[:1], steps=8, seed=3).tolist()
        out[f"threshold/{backend}/{dtype}"] = pipe.generate_tokens(PROMPTS, steps=16, seed=5, threshold=0.9).tolist()
        images = torch.tensor(out[f"generate/{backend}/{dtype}/8/2.0"])
        out[f"answer/{backend}/{dtype}"] = pipe.answer(images, QUESTIONS)
        out[f"answer_top_p/{backend}/{dtype}"] = pipe.answer(images, QUESTIONS, top_p=0.9, seed=2)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    got = record()
    if argv[0] == "record":
        with open(argv[1], "w") as fh:
            json.dump(got, fh)
        print(f"{len(got)} outputs recorded in {argv[1]}")
        return 0
    with open(argv[1]) as fh:
        want = json.load(fh)
    differ = [k for k in want if got.get(k) != want[k]]
    for k in want:
        print(f"{'same' if k not in differ else 'DIFFERS'}  {k}")
    print(f"{len(want) - len(differ)} of {len(want)} outputs identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
