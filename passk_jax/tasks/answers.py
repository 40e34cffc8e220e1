"""Where a response's final answer is: extraction methods a task tries in order.

A chat model rarely writes the format a dataset was designed for: SmolLM2-135M-Instruct answers "5 - 3 = 2"
instead of "<answer>2</answer>". Tasks therefore take an ``answer`` option, a comma-separated list (or a
sequence) of methods tried in order, the first that finds something winning:

    tag          the last complete <answer>...</answer> block
    boxed        the last \\boxed{...} (or \\fbox{...}), nested braces allowed
    last_number  the last number in the response: an optional sign, digits with optional thousands commas,
                 an optional decimal part, or a fraction a/b ("-3", "1,234", "0.5", "3/4"); commas removed
    whole        the whole response, stripped (when it is not empty)

``"auto"`` lets the task choose (numeric tasks: "tag,boxed,last_number"). A response where no method finds
anything has no answer: it scores 0 and is counted as ``verifier/<phase>/no_answer``.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from passk_jax.tasks import extract_boxed, extract_tag

_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\w])")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (see the module doc), with thousands commas and spaces removed and the
    Unicode minus as '-'; None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return re.sub(r"[,\s]", "", found[-1]).replace("−", "-").lstrip("+")


def whole(text: str) -> str | None:
    text = text.strip()
    return text or None


METHODS: dict[str, Callable[[str], str | None]] = {
    "tag": extract_tag, "boxed": extract_boxed, "last_number": last_number, "whole": whole}
NUMERIC_DEFAULT = ("tag", "boxed", "last_number")


def parse(spec: str | Sequence[str], option: str = "answer") -> tuple[str, ...]:
    """The methods of an ``answer`` option ("tag,boxed" or ["tag", "boxed"]), checked; "auto" stays
    ("auto",) for the task to resolve."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["auto"]:
        return ("auto",)
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise ValueError(f"task option {option}={spec!r}: expected 'auto' or methods from "
                         f"{', '.join(METHODS)} separated by commas"
                         + (f"; unknown: {', '.join(unknown)}." if unknown else "."))
    return tuple(dict.fromkeys(names))


def extract(text: str, methods: Sequence[str]) -> str | None:
    """The first non-blank answer any of ``methods`` finds in ``text``, in order (an empty <answer></answer>
    falls through to the next method); None when none does."""
    for name in methods:
        found = METHODS[name](text)
        if found is not None and found.strip():
            return found
    return None


def is_numeric(answer: object) -> bool:
    """Whether a ground-truth answer is a plain number (decides the numeric default of ``"auto"``)."""
    return isinstance(answer, (int, float)) or (isinstance(answer, str) and last_number(answer) is not None
                                                 and last_number(answer) == re.sub(r"[,\s]", "", answer.strip())
                                                 .replace("−", "-").lstrip("+"))
