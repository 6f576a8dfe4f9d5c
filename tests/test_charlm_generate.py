"""models.charlm.generate: the prompt, then n sampled bytes; greedy is deterministic, sampling is seeded."""

import torch

from models.charlm import STUDENT, CharLM, generate


def test_generate_continues_the_prompt_by_n_bytes():
    torch.manual_seed(0)
    net = CharLM(STUDENT)
    out = generate(net, b"ROMEO:\n", 100, temperature=0.8, seed=1)
    assert out.startswith(b"ROMEO:\n") and len(out) == 7 + 100  # longer than the 64-byte context: it slides
    assert out == generate(net, b"ROMEO:\n", 100, temperature=0.8, seed=1)
    greedy = generate(net, b"x", 10, temperature=0)
    assert greedy == generate(net, b"x", 10, temperature=0, seed=99)
