"""pytest-benchmark suite over the end-to-end cases of ``fastface bench`` (face-s shape, random weights).

    python -m pytest bench/test_bench_e2e.py --benchmark-only                 # all cases
    python -m pytest bench/test_bench_e2e.py --benchmark-only -k "b4 and generate"

Each case is one full request: 16 decoding steps with guidance 2 for generation, one answer for understanding.
The reference runs in the same session, so its rows are the baseline of the comparison table.
"""

import pytest
import torch

from fastface import benchmark

BATCHES = [1, 4, 16]
CASES = [("reference", "float32"), ("auto", "float32"), ("auto", "bfloat16")]
STEPS, GUIDANCE = 16, 2.0


@pytest.fixture(scope="module")
def subject():
    return benchmark.load_subject(None, None, ["float32", "bfloat16"])


def _id(case):
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_generate(benchmark_fixture_alias, subject, case, batch):
    backend, dtype = case
    model = subject.models[dtype]
    ids = benchmark.prompt_ids(subject.config, batch)
    seeds = list(range(batch))
    rounds = 1 if backend == "reference" and batch == 16 else 2
    tokens = benchmark_fixture_alias.pedantic(
        benchmark._generate, args=(model, backend, ids, STEPS, GUIDANCE, seeds), rounds=rounds, warmup_rounds=1)
    benchmark_fixture_alias.extra_info.update(image_tokens=batch * subject.config.image_tokens, steps=STEPS)
    assert tokens.shape == (batch, subject.config.image_tokens) and tokens.dtype == torch.long


@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_answer(benchmark_fixture_alias, subject, case, batch):
    backend, dtype = case
    model = subject.models[dtype]
    ids = benchmark.question_ids(subject.config, batch)
    answers = benchmark_fixture_alias.pedantic(
        benchmark._answer, args=(model, backend, ids, subject.config.max_answer_len), rounds=3, warmup_rounds=1)
    benchmark_fixture_alias.extra_info.update(text_tokens=sum(len(a) for a in answers))
    assert len(answers) == batch


@pytest.fixture
def benchmark_fixture_alias(benchmark):
    """pytest-benchmark's fixture under another name: ``benchmark`` here is the fastface module."""
    return benchmark
