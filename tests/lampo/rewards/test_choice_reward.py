"""Multiple-choice reward: letter extraction and scoring."""
import pytest

from lampo.rewards.choice import ChoiceReward, extract_choice


@pytest.mark.parametrize("text, expected", [
    ("The answer is \\boxed{C}", "C"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{\\text{D}}", "D"),
    ("I first thought \\boxed{A} but no: \\boxed{B}", "B"),
    ("Answer: B", "B"),
    ("The correct answer is (D).", "D"),
    ("So the answer is option C because ...", "C"),
    ("The correct option is B, not option D.", "B"),  # a later mention is not an answer
    ("ANSWER: **(A)**", "A"),
    ("the answer is a positive number, so (C)", "C"),
    ("Between (A) and (C), (C) fits.", "C"),
    ("A", "A"),
    ("(b)", None),  # lowercase is not an option letter
    ("A cat sat on a mat.", None),  # the article is not option A
    ("the answer is E", None),  # not among ABCD
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_letters_option():
    assert extract_choice("the answer is E", letters="ABCDE") == "E"
    with pytest.raises(ValueError, match="capital letters"):
        extract_choice("x", letters="abc")


def test_reward_values_and_gold_formats():
    r = ChoiceReward()
    out = r.score(["answer: C", "answer: (C)", "answer: B", "no idea"], answers=["C", "(C)", "C", "C"],
                  references=[""] * 4)
    assert out.values == [1.0, 1.0, 0.0, 0.0]
    assert out.reasons == [None, None, None, "no option letter found"]


def test_bad_gold_letter_raises():
    with pytest.raises(ValueError, match=r"answers\[0\]='42' is not one of the option letters"):
        ChoiceReward()(["A"], answers=["42"], references=[""])
