"""math-verify reward: boxed extraction, equivalence, unparsed/error accounting, process pool = in-process."""

import pytest

from engine.reward import RewardStats, extract_boxed, score_one, score_responses


def test_extract_boxed_last_balanced():
    assert extract_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("\\fbox{7}") == "7"
    # a final box cut off mid-answer (e.g. at the length limit) gives nothing: the earlier box was a draft
    assert extract_boxed("\\boxed{3} and \\boxed{4") is None
    assert extract_boxed("no box here") is None
    assert extract_boxed("") is None
    assert extract_boxed("\\boxed{") is None


def test_scores_by_hand():
    responses = ["The answer is \\boxed{31}", "\\boxed{\\frac{1}{2}}", "\\boxed{30}", "31", "",
                 "\\boxed{}", "\\boxed{x^2+1}"]
    answers = ["31", "0.5", "31", "31", "31", "31", "1+x^2"]
    scores, stats = score_responses(responses, answers)
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert stats == RewardStats(num=7, num_correct=3, num_unparsed=3, num_errors=0)
    assert stats.accuracy == pytest.approx(3 / 7)


def test_garbage_never_crashes():
    for text in ["\\boxed{@@##}", "\\boxed{\\frac{1}{}", "\\boxed{" + "(" * 30 + "}", "\x00\\boxed{\x00}"]:
        score, outcome = score_one(text, "3")
        assert score == 0.0 and outcome in ("wrong", "unparsed", "error")


def test_reference_already_boxed():
    assert score_one("\\boxed{2}", "\\boxed{2}") == (1.0, "correct")


def test_modes_boxed_or_whole():
    """boxed-or-whole parses the whole response when it has no \\boxed (RETU's reward parses the whole
    response); with a \\boxed both modes judge only the last one, and a truncated last box earns nothing."""
    responses = ["The answer is 5.", "so 23+15=38, 38-7=31", "I give up", "\\boxed{5}", "\\boxed{5} then \\boxed{6",
                 "The answer is 5, i.e. \\boxed{6}"]
    answers = ["5", "31", "5", "5", "5", "5"]
    whole, stats = score_responses(responses, answers, mode="boxed-or-whole")
    assert whole == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert stats == RewardStats(num=6, num_correct=3, num_unparsed=2, num_errors=0)
    boxed, _ = score_responses(responses, answers, mode="boxed")
    assert boxed == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert score_one("\\boxed{5} then \\boxed{6", "5", mode="boxed") == (0.0, "unparsed")
    assert score_responses(responses, answers, num_workers=2, mode="boxed-or-whole")[0] == whole
    with pytest.raises(ValueError, match="mode"):
        score_responses(["a"], ["b"], mode="regex")


def test_validation():
    with pytest.raises(ValueError):
        score_responses(["a"], [])
    with pytest.raises(ValueError):
        score_responses(["a"], ["b"], num_workers=-1)
    assert score_responses([], []) == ([], RewardStats())


def test_pool_matches_in_process():
    responses = ["\\boxed{31}", "\\boxed{30}", "none", "\\boxed{\\frac{1}{2}}", "", "\\boxed{2^{10}}"] * 3
    answers = ["31", "31", "31", "0.5", "1", "1024"] * 3
    serial = score_responses(responses, answers, num_workers=0)
    pooled = score_responses(responses, answers, num_workers=2)
    assert pooled == serial
    assert serial[1].num_correct == 9 and serial[1].num_unparsed == 6
