"""Registry and composite reward: r = outcome + alpha * dense, components and reasons kept for logging."""
import pytest

from lampo.rewards import REWARDS, CompositeReward, Reward, build_reward
from lampo.rewards.rouge import RougeLReward

REF = "We add 2 and 2. That gives 4. So the answer is \\boxed{4}."
RESPONSES = [REF, "We add 2 and 2. That gives 5. \\boxed{5}", "Cats like milk.", ""]
ANSWERS = ["4", "4", "4", "4"]
OPTIONS = {"timeout_s": 5.0, "model_path": None, "batch_size": 16}


def test_registry_names_and_duplicates():
    assert {"math", "choice", "rouge_l", "semantic_density"} <= set(REWARDS)
    with pytest.raises(ValueError, match="already registered"):
        REWARDS.register("math")(RougeLReward)
    with pytest.raises(KeyError, match="known: .*math"):
        REWARDS["no_such_reward"]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_honours_the_contract(name):
    """Keyword-only options, one float per response, reasons aligned, clear errors on bad input."""
    reward = build_reward(name, **OPTIONS).outcome
    assert isinstance(reward, Reward) and reward.name == name
    answers = ["C"] * 4 if name == "choice" else ANSWERS
    out = reward.score(RESPONSES, answers=answers, references=[REF] * 4)
    assert len(out.values) == len(out.reasons) == 4
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values)
    assert reward(RESPONSES, answers=answers, references=[REF] * 4) == out.values
    with pytest.raises(ValueError, match="one answer and one reference per response"):
        reward(RESPONSES, answers=answers[:3], references=[REF] * 4)
    with pytest.raises(TypeError, match=r"references\[0\] is NoneType"):
        reward(RESPONSES, answers=answers, references=[None] * 4)
    with pytest.raises(TypeError):
        type(reward)(0.5)  # options are keyword-only


@pytest.mark.parametrize("dense", ["rouge_l", "semantic_density"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_composite_total_is_outcome_plus_alpha_dense(dense, alpha):
    reward = build_reward("math", dense, alpha, **OPTIONS)
    out = reward(RESPONSES, answers=ANSWERS, references=[REF] * 4)
    assert set(out.components) == {"math", dense}
    assert out.components["math"] == [1.0, 0.0, 0.0, 0.0]
    assert out.total == pytest.approx([o + alpha * d for o, d in zip(out.components["math"], out.components[dense])])
    assert out.components[dense][0] == pytest.approx(1.0, abs=1e-5)  # the reference itself
    assert out.reasons[0] is None
    assert out.reasons[2].startswith("math: no final answer found")
    assert out.reasons[3] == "math: no final answer found"  # an empty text is a dense 0, not a dense failure


def test_outcome_only_ignores_alpha_and_dense_options():
    out = build_reward("math", None, 0.1, **OPTIONS)(RESPONSES, answers=ANSWERS, references=[""] * 4)
    assert list(out.components) == ["math"] and out.total == out.components["math"]


def test_build_reward_errors():
    with pytest.raises(KeyError, match="unknown reward 'maths'"):
        build_reward("maths")
    with pytest.raises(ValueError, match="alpha"):
        build_reward("math", "rouge_l", alpha=-1.0)
    with pytest.raises(ValueError, match="also the outcome"):
        build_reward("math", "math")
    with pytest.raises(ValueError, match="alpha"):
        CompositeReward(build_reward("math").outcome, None, float("nan"))
