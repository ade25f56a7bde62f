"""End-to-end tokens per second, reference and engine side by side; results into bench/results/.

    python bench/bench_e2e.py                       # face-s shape, batch 1 4 16, 16 steps, guidance 2
    python bench/bench_e2e.py --batch 4 --repeats 3 # the issue's headline case only

A thin wrapper over ``fastface bench`` (fastface/benchmark.py) that names the output files by time:
bench/results/e2e-<UTC time>.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fastface import benchmark


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if "--json" not in argv:
        argv += ["--json", str(out / f"e2e-{stamp}.json")]
    if "--plot" not in argv:
        argv += ["--plot", str(out / f"e2e-{stamp}.png")]
    return benchmark.main(argv)


if __name__ == "__main__":
    sys.exit(main())
