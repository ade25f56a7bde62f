"""A pipeline shared by several threads returns, for every call, exactly what the call returns alone."""

import threading

import pytest
import torch

import fastface

PROMPTS = ["a smiling woman with red hair and green eyes", "a young man with a black hat",
           "an old man with a grey beard", "a bald man with a beard and blue eyes"]


def run_threads(n, fn, jobs):
    """Run fn(job) for every job on n threads started together; returns {job index: result}."""
    out, errors = {}, []
    barrier = threading.Barrier(n)

    def worker(k):
        try:
            barrier.wait()
            for i in range(k, len(jobs), n):
                out[i] = fn(jobs[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("n_threads", [2, 4])
def test_generate_tokens_from_threads_equals_sequential(backend, n_threads):
    pipe = fastface.load(backend=backend)
    jobs = [(PROMPTS[i % len(PROMPTS)], seed) for i, seed in enumerate(range(2 * n_threads))]

    def call(job):
        return pipe.generate_tokens([job[0]], steps=4, guidance=2.0, seed=job[1])

    alone = [call(job) for job in jobs]
    together = run_threads(n_threads, call, jobs)
    for i, want in enumerate(alone):
        assert torch.equal(together[i], want), f"call {i} ({jobs[i]}) differs when run beside others"


def test_answer_from_threads_equals_sequential():
    pipe = fastface.load()
    images = pipe.generate_tokens(PROMPTS, steps=3, seed=0)
    questions = ["what colour is her hair?", "is he wearing a hat?", "does he have a beard?",
                 "what colour are the eyes?"]
    jobs = list(range(len(PROMPTS)))

    def call(i):
        return pipe.answer(images[i : i + 1], [questions[i]])

    alone = [call(i) for i in jobs]
    together = run_threads(4, call, jobs)
    assert [together[i] for i in jobs] == alone
