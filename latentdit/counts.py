"""Count contrast: guiding a prompt that names a count away from the same prompt one higher.

A denoiser that fails a count nearly always draws one copy too many, and its condition does carry
the count: guided away from the caption with the count one higher, the images lose a copy. Added
to ordinary classifier-free guidance with a scale of its own, that term pulls the extra copy back
(``SamplingConfig.count_contrast``; figures in docs/shapes-model.md)::

    x0 = x0_null + g * (x0_prompt - x0_null) + count_contrast * (x0_prompt - x0_prompt_one_higher)

Only prompts that name a count (a number word from one to nine or a digit from 1 to 9 in
English; a numeral or digit before the measure word 个 in Chinese) get the extra row and term,
and only on the guided steps; the other prompts of a batch get neither.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .condition import Condition

_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COUNT = re.compile(r"\b(" + "|".join(_WORDS[:-1]) + r"|[1-9])\b", re.IGNORECASE)
# Chinese: a numeral or digit right before the measure word 个 ("三个红色的星形"). 一个 is left
# alone: like the English "a", it is how a single object is named, not a count.
_ZH_NUMERALS = "一二三四五六七八九十"  # the numeral for i + 1 at index i
_ZH_WORDS = {"两": 2} | {c: i + 1 for i, c in enumerate(_ZH_NUMERALS[1:9], start=1)}
_ZH_COUNT = re.compile(r"(?<![0-9])([1-9]|[" + "".join(_ZH_WORDS) + r"])(?=个)")


def count_up(prompt: str) -> str | None:
    """``prompt`` with its first count one higher ("three red stars" -> "four red stars",
    "2 circles" -> "3 circles", "三个星形" -> "四个星形"), keeping its capitals; None when it
    names no count."""
    found = min((m for m in (_COUNT.search(prompt), _ZH_COUNT.search(prompt)) if m is not None),
                key=lambda m: m.start(1), default=None)
    if found is None:
        return None
    word = found.group(1)
    if word.isdigit():
        higher = str(int(word) + 1)
    elif word in _ZH_WORDS:
        higher = _ZH_NUMERALS[_ZH_WORDS[word]]  # the value's own index holds the next numeral
    else:
        higher = _WORDS[_WORDS.index(word.lower()) + 1]
        if word.isupper() and len(word) > 1:
            higher = higher.upper()
        elif word[0].isupper():
            higher = higher.capitalize()
    return prompt[:found.start(1)] + higher + prompt[found.end(1):]


@dataclass(frozen=True)
class CountContrast:
    """The guided batch's rows that name a count, their prompts one higher as a condition (one
    row each, in the order of ``rows``), and the scale of the term."""

    rows: Tensor  # (M,) indices into the batch
    cond: Condition
    scale: float

    def expand(self, k: int) -> CountContrast:
        """The same for a batch in which every prompt's row is repeated k times in a row."""
        rows = (self.rows[:, None] * k + torch.arange(k, device=self.rows.device)).reshape(-1)
        return CountContrast(rows, self.cond.repeat(k), self.scale)


def contrast_prompts(prompts: Sequence[str]) -> tuple[list[int], list[str]]:
    """(which prompts name a count, those prompts one higher)."""
    higher = [count_up(p) for p in prompts]
    rows = [i for i, h in enumerate(higher) if h is not None]
    return rows, [higher[i] for i in rows]


__all__ = ["count_up", "contrast_prompts", "CountContrast"]
