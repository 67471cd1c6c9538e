"""Prompt parsing: digits as int, str or English word; everything else is a ValueError naming it."""

from __future__ import annotations

import numpy as np
import pytest

from quantserve.default_model import parse_digit, parse_prompts


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [("7", 7), (7, 7), ("seven", 7), (" Seven\n", 7), ("SEVEN", 7), (" 7 ", 7), ("0", 0), ("zero", 0), (9, 9),
     (np.int64(3), 3), ("nine", 9)],
)
def test_accepted_prompts(prompt: object, digit: int) -> None:
    assert parse_digit(prompt) == digit


@pytest.mark.parametrize("prompt", ["eleven", "", "7b", "   ", "77", "-1", 10, -1, True, None, 7.0, "seven!"])
def test_rejected_prompts_name_the_prompt_and_the_accepted_values(prompt: object) -> None:
    with pytest.raises(ValueError) as err:
        parse_digit(prompt)
    message = str(err.value)
    assert repr(prompt) in message
    assert "0-9" in message and "seven" in message


def test_parse_prompts_keeps_order_and_accepts_a_single_prompt() -> None:
    assert parse_prompts(["3", "one", 4, " Two "]) == [3, 1, 4, 2]
    assert parse_prompts("8") == [8]
    assert parse_prompts(5) == [5]


def test_parse_prompts_rejects_empty_and_reports_the_bad_one() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_prompts([])
    with pytest.raises(ValueError, match="'eleven'"):
        parse_prompts(["1", "eleven"])
