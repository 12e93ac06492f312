"""Math reward: answer extraction, normalisation, equivalence, the time bound, and input checks."""
import logging
import os
import signal
import threading
import time

import pytest

from lampo.rewards.math_answer import MathReward, extract_answer, is_equivalent, normalize_answer
from lampo.rewards.verify_worker import VerifyWorker, shared_worker


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{5}.", "5"),
    ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces inside
    ("\\fbox{7}", "7"),
    ("$\\boxed 9$", "9"),  # brace-less form
    ("\\boxed{2} and a truncated \\boxed{\\frac{1}{", "2"),  # an unclosed box is skipped
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Final answer: 3.5", "3.5"),
    ("the answer is 12\nThen some trailing text 99", "12"),
    ("We get 3 apples, then 1,234 pears", "1,234"),  # last number, thousands separator kept whole
    ("total is -0.25", "-0.25"),
    ("ratio 3/4", "3/4"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


EQUIVALENT = [
    ("\\frac{1}{2}", ["0.5", "1/2", "\\dfrac12", "\\tfrac{1}{2}", ".5"]),
    ("3\\sqrt{13}", ["\\sqrt{117}", "3 \\sqrt{13}"]),
    ("(3,4]", ["(3, 4]", "\\left(3,4\\right]"]),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", ["(3, \\pi/2)"]),
    ("\\{1\\pm\\sqrt{5},-2\\}", ["-2, 1+\\sqrt5, 1-\\sqrt5", "\\{-2, 1-\\sqrt{5}, 1+\\sqrt{5}\\}"]),
    ("(-\\infty, 0] \\cup (2, \\infty)", ["(-\\infty,0]\\cup(2,\\infty)"]),
    ("x \\in [-2,7]", ["[-2,7]"]),
    ("(2,\\infty)", ["x>2", "x > 2"]),  # an inequality answers an interval
    ("90^\\circ", ["90", "90°", "90 degrees", "90^{\\circ}"]),
    ("\\$32,\\!348", ["32348", "32,348", "\\$32,348"]),
    ("11,\\! 111,\\! 111,\\! 100", ["11111111100", "11,111,111,100"]),
    ("\\text{Evelyn}", ["Evelyn", "\\textbf{Evelyn}", "evelyn"]),
    ("\\text{(C)}", ["(C)", "C", "\\text{C}"]),
    ("864 \\mbox{ inches}^2", ["864"]),
    ("5.4 \\text{ cents}", ["5.4"]),
    ("18", ["18 dollars", "18 eggs per day", "\\$18"]),
    ("3", ["3 cm^2", "3 \\text{cm}^2"]),
    ("\\frac{270}7\\text{ degrees}", ["\\frac{270}{7}"]),
    ("50\\%", ["50"]),
    ("1\\frac{4}{5}", ["\\frac{9}{5}", "1.8"]),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
     ["\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\end{pmatrix}"]),
    ("6 - 5i", ["6-5i"]),
    ("x=5", ["5"]),
    ("2k+2", ["2(k+1)"]),
    ("\\frac{\\sqrt{3}}{3}", ["\\frac{1}{\\sqrt{3}}"]),
    ("-2,1", ["1, -2"]),
    (".0000672", ["0.0000672", "6.72\\times10^{-5}"]),
    ("18", ["18.0", "18.00", "18."]),
    ("-5", ["\u22125"]),  # Unicode minus
    ("p - q", ["p-q", "-q+p"]),  # letters that are variables, not a word answer
    ("\\text{right angle}", ["Right angle"]),
]
NOT_EQUIVALENT = [
    ("\\frac{1}{2}", ["\\frac{1}{3}", "2", "-0.5"]),
    ("(3,4]", ["[3,4]", "(3,4)"]),
    ("(2,\\infty)", ["x<2", "x>3", "x \\ge 2"]),
    ("\\{1, 2\\}", ["\\{1, 2, 3\\}"]),
    ("\\text{(C)}", ["D", "(D)"]),
    ("\\text{Evelyn}", ["Navin"]),
    ("x^2+1", ["x^3+1"]),
    ("10080", ["1008"]),
    ("90^\\circ", ["45"]),
    ("\\sqrt{51}", ["51"]),
    ("1,600", ["16"]),
    ("1, 234", ["1234"]),  # a list, not a thousands separator
    ("p - q", ["q - p"]),
    ("3", ["3 pi", "3 x", "3 \\pi", "3 sin"]),  # trailing words that are mathematics are kept
    ("3\\sqrt{13}", ["3\\sqrt13"]),  # LaTeX reads \sqrt13 as sqrt(1)*3
]


@pytest.mark.parametrize("gold, preds", EQUIVALENT)
def test_equivalent_forms_are_accepted(gold, preds):
    for pred in preds:
        assert is_equivalent(pred, gold) == (True, None), (pred, gold)


@pytest.mark.parametrize("gold, preds", NOT_EQUIVALENT)
def test_different_answers_are_rejected(gold, preds):
    for pred in preds:
        ok, _ = is_equivalent(pred, gold)
        assert not ok, (pred, gold)


def test_normalisation_is_idempotent():
    for gold, preds in EQUIVALENT + NOT_EQUIVALENT:
        for s in [gold, *preds]:
            once = normalize_answer(s)
            assert normalize_answer(once) == once, s


def test_reward_scores_and_reasons():
    r = MathReward(timeout_s=5.0)
    out = r.score(["so \\boxed{4}", "I think it is 5", "no idea", ""], answers=["4", "4", "4", "4"],
                  references=[""] * 4)
    assert out.values == [1.0, 0.0, 0.0, 0.0]
    assert out.reasons[0] is None and out.reasons[1] is None  # a wrong answer is not a failure
    assert out.reasons[2] == out.reasons[3] == "no final answer found"
    assert r(["\\boxed{4}"], answers=["4"], references=["ignored"]) == [1.0]


PATHOLOGICAL = {
    "power tower": "\\boxed{10^{10^{10^{10}}}}",
    "plain tower": "so the answer is 10^10^10^10",
    "big power": "\\boxed{10^{10^{9}} - 10^{10^{9}} + 5}",
    "factorial": "\\boxed{(10^{10})!}",
    "nested fractions": "\\boxed{" + "\\frac{" * 80 + "1" + "}{2}" * 80 + "}",
    "nested roots": "\\boxed{" + "\\sqrt{" * 150 + "2" + "}" * 150 + "}",
    "nested parentheses": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "100 kB of text": "blah " * 20_000 + "\\boxed{" + "x+" * 400 + "1}",
    "100 kB of unclosed boxes": "\\boxed{" * 14_000,
    "too long": "\\boxed{" + "1+" * 50_000 + "1}",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_inputs_return_quickly_with_zero(name):
    shared_worker().verify("1", "1", 5.0)  # the worker's start-up is not part of the bound
    r = MathReward(timeout_s=1.0)
    t = time.monotonic()
    out = r.score([PATHOLOGICAL[name]], answers=["6"], references=[""])
    assert time.monotonic() - t < 1.0 + 1.0 + 0.5  # timeout_s + kill grace + slack
    assert out.values == [0.0]


def test_time_bound_holds_from_another_thread():
    r = MathReward(timeout_s=1.0)
    result = {}

    def run():
        t = time.monotonic()
        result["scores"] = r.score([PATHOLOGICAL["power tower"], "\\boxed{6}"], answers=["6", "6"],
                                   references=["", ""])
        result["seconds"] = time.monotonic() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=30)
    assert result["scores"].values == [0.0, 1.0]
    assert "timed out" in result["scores"].reasons[0]
    assert result["seconds"] < 2 * (1.0 + 1.0) + 1.0


def test_hung_worker_is_killed_and_replaced(caplog):
    """A child that never answers (stopped, like one stuck in C code) is killed after timeout_s + grace."""
    w = VerifyWorker()
    try:
        assert w.verify("2", "2", 1.0) == (True, None)
        os.kill(w._proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lampo.rewards.verify_worker"):
            ok, why = w.verify("x+1", "1+x", 0.5)
        assert not ok and "timed out" in why and time.monotonic() - t < 3.0
        assert "'x+1'" in caplog.text and "timed out" in caplog.text  # the reason is logged
        assert w.verify("x+1", "1+x", 5.0) == (True, None)  # a fresh child takes over
        os.kill(w._proc.pid, signal.SIGKILL)
        w._proc.wait()
        assert w.verify("x+2", "2+x", 5.0) == (True, None)  # a dead child is restarted
        assert w.restarts == 1
    finally:
        w.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signals_to_the_process_group_leave_the_worker_alone(sig):
    """A preemption signal sent to the whole process group (torchrun's killpg, Slurm, Ctrl-C) is the parent's to
    handle: the worker keeps answering, so the step under way finishes with true scores before the checkpoint."""
    w = VerifyWorker()
    try:
        assert w.verify("2", "2", 5.0) == (True, None)
        pid = w._proc.pid
        os.kill(pid, sig)
        assert w.verify("x+1", "1+x", 5.0) == (True, None)
        assert w._proc.pid == pid and w.restarts == 0
    finally:
        w.close()


def test_ordinary_batch_is_fast():
    """128 ordinary items (half needing sympy) in well under a second once the worker is warm."""
    golds = ["\\frac{3}{4}", "2\\sqrt{2}", "(1,2)", "x^2+1"] * 32
    preds = ["\\boxed{0.75}", "\\boxed{\\sqrt{8}}", "\\boxed{(1, 3)}", "\\boxed{1+x^2}"] * 32
    r = MathReward()
    r(preds[:4], answers=golds[:4], references=[""] * 4)  # warm the worker
    t = time.monotonic()
    assert r(preds, answers=golds, references=[""] * 128) == [1.0, 1.0, 0.0, 1.0] * 32
    elapsed = time.monotonic() - t
    print(f"128 ordinary items: {elapsed:.3f} s")
    assert elapsed < 1.0


def test_bad_input_raises_clear_errors():
    r = MathReward()
    with pytest.raises(ValueError, match="2 responses, 1 answers"):
        r(["a", "b"], answers=["1"], references=["", ""])
    with pytest.raises(TypeError, match=r"responses\[1\] is int"):
        r(["a", 3], answers=["1", "2"], references=["", ""])
    with pytest.raises(TypeError, match="list of str"):
        r("a", answers=["1"], references=[""])
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)
    with pytest.raises(TypeError):
        extract_answer(None)
    with pytest.raises(TypeError):
        is_equivalent(1, "1")
