"""Dense rewards: ROUGE-L (equal to rouge-score) and semantic density (properties)."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from lampo.rewards.base import reasoning_part
from lampo.rewards.rouge import RougeLReward, lcs_length
from lampo.rewards.semantic import SemanticDensityReward, split_steps

WORDS = ["we", "find", "the", "sum", "x", "2", "3", "equals", "so", "then", "value", "of"]


def call(reward, responses, references):
    return reward(responses, answers=[""] * len(responses), references=references)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40), st.lists(st.sampled_from(WORDS), max_size=40))
def test_rouge_l_equals_rouge_score(a, b):
    resp, ref = " ".join(a), " ".join(b)
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, resp)["rougeL"].fmeasure
    assert call(RougeLReward(), [resp], [ref])[0] == pytest.approx(expected, abs=1e-12)


def test_lcs_against_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        assert lcs_length(a, b) == table[-1][-1] == lcs_length(b, a)


REF = ("We square both sides of the equation. This gives x^2 = 9. Since x is positive, x = 3. "
       "So the answer is \\boxed{3}.")


def test_rouge_l_properties():
    r = RougeLReward()
    identical, unrelated, empty_ref, only_answer = call(
        r, [REF, "Bananas grow in warm countries. \\boxed{3}", REF, "\\boxed{3}"], [REF, REF, "", REF])
    assert identical == 1.0
    assert unrelated < 0.2
    assert empty_ref == 0.0 and only_answer == 0.0
    assert r.score([REF], answers=[""], references=[""]).reasons == [None]
    assert call(r, [REF.replace("\\boxed{3}", "\\boxed{4}")], [REF]) == [1.0]  # the final answer is not counted


def test_reasoning_part_cuts_the_answer_and_its_lead_in():
    assert reasoning_part(REF) == REF[: REF.index(" So the answer")]
    assert reasoning_part("no final answer here") == "no final answer here"
    assert reasoning_part("She sells 9 eggs.\n#### 18") == "She sells 9 eggs."
    steps = split_steps("First step. Second step!\nx = 3.5 here\n$$\n")
    assert steps == ["First step.", "Second step!", "x = 3.5 here"]


@pytest.fixture(scope="module")
def semantic():
    return SemanticDensityReward(batch_size=32)


def test_semantic_density_properties(semantic):
    shuffled = "Since x is positive, x = 3.\nThis gives x^2 = 9.\nWe square both sides of the equation. \\boxed{3}"
    partial = "We square both sides of the equation. \\boxed{3}"
    unrelated = "Bananas grow in warm countries. My cat likes to sleep on the sofa. \\boxed{3}"
    got = call(semantic, [REF, shuffled, partial, unrelated, "", REF], [REF] * 5 + [""])
    identical, reordered, part, unrel, empty_resp, empty_ref = got
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert reordered == pytest.approx(identical, abs=1e-5)  # step order does not matter
    assert unrel < 0.3 < part < identical  # a correct subset of the steps beats unrelated text
    assert empty_resp == 0.0 and empty_ref == 0.0
    assert all(0.0 <= v <= 1.0 for v in got)


def test_semantic_density_is_batch_invariant(semantic):
    responses = [REF, "We square both sides. Then x = 3. \\boxed{3}", "Cats sleep a lot."]
    together = call(semantic, responses, [REF] * 3)
    alone = [call(semantic, [x], [REF])[0] for x in responses]
    assert together == pytest.approx(alone, abs=1e-5)


def test_semantic_density_threshold_mode(semantic):
    hard = SemanticDensityReward(threshold=0.7)
    hard._model = semantic.model  # share the loaded encoder
    partial = "We square both sides of the equation. Bananas grow in warm countries. \\boxed{3}"
    identical, part = call(hard, [REF, partial], [REF, REF])
    assert identical == 1.0
    assert part == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))  # 1 of 2 steps matched, 1 of 3 recalled


def test_semantic_density_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        SemanticDensityReward(model_path=tmp_path / "nope")
    with pytest.raises(ValueError, match="threshold"):
        SemanticDensityReward(threshold=1.5)


def test_rouge_l_is_fast_on_long_texts():
    """128 responses of 4,000 tokens against a 1,000-token reference (rouge-score's own table: about 1 s each)."""
    import time

    rng = random.Random(0)
    resp = " ".join(rng.choice(WORDS) for _ in range(4000))
    ref = " ".join(rng.choice(WORDS) for _ in range(1000))
    t = time.monotonic()
    values = call(RougeLReward(), [resp] * 128, [ref] * 128)
    elapsed = time.monotonic() - t
    print(f"ROUGE-L, 128 x (4000 vs 1000 tokens): {elapsed:.2f} s")
    assert len(set(values)) == 1 and 0 < values[0] < 1
    assert elapsed < 10.0
