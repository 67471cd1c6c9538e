"""The digits model's prompts: a digit 0-9 as an int or a string, or its English word. Imports nothing heavy, so
the Ingress checks prompts without loading torch or diffusers (it took 5 s, on its event loop, at its first
request)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

NUM_CLASSES = 10
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCEPTED_PROMPTS = "0-9 (int or str) or the words " + ", ".join(DIGIT_NAMES)
_WORDS = {name: i for i, name in enumerate(DIGIT_NAMES)}

Prompt = str | int


def parse_digit(prompt: object) -> int:
    """Turn a prompt like 7, "7" or " Seven " into its class index 0..9; raise ValueError otherwise."""
    if isinstance(prompt, numbers.Integral) and not isinstance(prompt, bool) and 0 <= int(prompt) <= 9:
        return int(prompt)
    if isinstance(prompt, str):
        text = prompt.strip().lower()
        if len(text) == 1 and text in "0123456789":
            return int(text)
        if text in _WORDS:
            return _WORDS[text]
    raise ValueError(f"prompt {prompt!r} is not a digit: accepted prompts are {ACCEPTED_PROMPTS}")


def parse_prompts(prompts: Prompt | Sequence[Prompt]) -> list[int]:
    """Parse one prompt or a sequence of prompts into class indices, in order."""
    if isinstance(prompts, (str, numbers.Integral)):
        prompts = [prompts]
    labels = [parse_digit(p) for p in prompts]
    if not labels:
        raise ValueError(f"prompts is empty: give at least one of {ACCEPTED_PROMPTS}")
    return labels
