"""lampo.seeds: one function derives every stream, and it reproduces the formulas the project used before, number for
number (the tiny pipeline's figures in README.md depend on them)."""
from __future__ import annotations

import hashlib
import random
import zlib

import pytest
import torch

from lampo.seeds import STREAMS, derive_seed

SEEDS = (0, 1, 1234, 2**31 - 1, -7)


@pytest.mark.parametrize("seed", SEEDS)
def test_each_stream_is_the_formula_it_replaced(seed):
    """The expressions on the right are copied from the call sites as they were before lampo.seeds existed."""
    assert derive_seed(seed, "init") == seed
    for it in (0, 1, 79):
        assert derive_seed(seed, "rollout", it) == seed * 100_003 + it
        assert derive_seed(seed, "rl_minibatches", it) == seed * 7919 + it
    for name in ("tiny", "gsm8k", "math500"):
        for first in (0, 64, 1999):
            assert derive_seed(seed, "eval", name, first) == \
                (seed * 1_000_003 + zlib.crc32(name.encode()) + first) % 2**31
    q = "Which element has atomic number 6?"
    assert derive_seed(seed, "choices", q) == \
        int.from_bytes(hashlib.sha256(f"{seed}\x00{q}".encode()).digest()[:8], "big")


@pytest.mark.parametrize("seed", SEEDS)
def test_string_keyed_streams_give_the_generator_the_string_gave(seed):
    """``random.Random(derive_seed(...))`` draws what ``random.Random(<the old string>)`` drew."""
    for epoch in (0, 1, 5):
        a, b = random.Random(derive_seed(seed, "sft_order", epoch)), random.Random(f"{seed}/{epoch}")
        assert [a.random() for _ in range(20)] == [b.random() for _ in range(20)]
        perm_a, perm_b = list(range(50)), list(range(50))
        a.shuffle(perm_a)
        b.shuffle(perm_b)
        assert perm_a == perm_b
    for name, split in (("tiny", "train"), ("tiny", "heldout"), ("tiny2", "train")):
        a = random.Random(derive_seed(seed, "tiny_split", name, split))
        b = random.Random(f"lampo-{name}/{split}/{seed}")
        assert [a.random() for _ in range(20)] == [b.random() for _ in range(20)]


def test_the_rollout_and_minibatch_seeds_drive_torch_as_before():
    g1 = torch.Generator().manual_seed(derive_seed(1234, "rl_minibatches", 3))
    g2 = torch.Generator().manual_seed(1234 * 7919 + 3)
    assert torch.equal(torch.randperm(100, generator=g1), torch.randperm(100, generator=g2))


def test_streams_differ_and_bad_keys_are_refused():
    assert len({derive_seed(1234, s, *k) for s, k in (
        ("init", ()), ("rollout", (1,)), ("rl_minibatches", (1,)), ("eval", ("tiny", 1)),
        ("sft_order", (1,)), ("tiny_split", ("tiny", "train")), ("choices", ("q",)))}) == len(STREAMS)
    with pytest.raises(ValueError, match="unknown seed stream 'rollouts'.*rollout"):
        derive_seed(1, "rollouts", 0)
    with pytest.raises(TypeError, match="takes a key of \\(int\\)"):
        derive_seed(1, "rollout")
    with pytest.raises(TypeError, match="takes a key of \\(str, int\\)"):
        derive_seed(1, "eval", 3, "tiny")
    with pytest.raises(TypeError, match="takes a key of \\(nothing\\)"):
        derive_seed(1, "init", 2)
    with pytest.raises(TypeError, match="seed must be an integer"):
        derive_seed("1234", "init")  # type: ignore[arg-type]


def test_the_call_sites_use_the_one_function():
    """No module of the project mixes a seed by hand any more: the old constants live in lampo/seeds.py only."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for pkg in ("lampo", "evaluation", "pipeline", "benchmarks"):
        for p in (root / pkg).rglob("*.py"):
            if p.name == "seeds.py" and p.parent.name == "lampo":
                continue
            text = p.read_text()
            found += [f"{p.relative_to(root)}: {c}" for c in ("100_003", "7919", "1_000_003", "lampo-tiny")
                      if c in text]
    assert not found, found
