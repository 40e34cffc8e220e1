"""Math: final-answer extraction and math-verify scoring; data from verl-schema Parquet / JSONL files.

Extraction: the methods of the `answer` option in order (``passk_jax.tasks.answers``; default "tag,boxed":
the last `<answer>...</answer>` block, else the last `\\boxed{...}` with nested braces), else — unless
`strict_format` — math-verify's own extraction over the whole response (last expression / "the answer is").
A response with no answer in the `answer` format and (unless strict) no number at all is counted as having
none (`verifier/<phase>/no_answer`).
The ground truth is wrapped in `\\boxed{}` and parsed the same way, then
`math_verify.verify(gold, pred)` decides (fractions, `\\frac`, decimals, units, percentages, sets...).

Timeouts: math-verify guards parse/verify with `signal.alarm`, which only works on a process's main
thread. Verifier-pool workers score on their main thread, so the alarm (`mv_timeout_s`, kept below the
pool's per-response timeout) stays on there and turns a slow sympy call into a plain 0 without restarting
the worker; on any other thread it is switched off (`None`) and the pool's timeout is the only guard.
"""
from __future__ import annotations

import logging
import threading

from passk_jax.tasks import BaseTask, Example, answers, extract_boxed, extract_tag

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings on threads


def extract_math_answer(response: str) -> str | None:
    """Last <answer> block, else last \\boxed{} content; None when neither is present."""
    answer = extract_tag(response)
    return answer if answer is not None else extract_boxed(response)


def _timeout(seconds: int | None) -> int | None:
    return seconds if threading.current_thread() is threading.main_thread() else None


def math_score(response: str, ground_truth: str, *, strict_format: bool = False,
               mv_timeout_s: int | None = 3, methods: tuple[str, ...] = ("tag", "boxed")) -> float:
    from math_verify import parse, verify

    t = _timeout(mv_timeout_s)
    answer = answers.extract(response, methods)
    if answer is None and strict_format:
        return 0.0
    pred = parse(response if answer is None else f"\\boxed{{{answer}}}", parsing_timeout=t)
    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=t)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=t) else 0.0


class MathTask(BaseTask):
    """Examples come from `train_files` / `test_files` (verl schema); prompts are used as stored."""

    name = "math"

    def __init__(self, strict_format: bool = False, mv_timeout_s: int | None = 3, answer: str = "tag,boxed",
                 **files):
        super().__init__(**files)
        self.strict_format, self.mv_timeout_s = strict_format, mv_timeout_s
        methods = answers.parse(answer)
        self.methods = ("tag", "boxed") if methods == ("auto",) else methods

    def extract_answer(self, example: Example, response: str) -> str | None:
        answer = answers.extract(response, self.methods)
        if answer is None and not self.strict_format:
            from math_verify import parse

            found = parse(response, parsing_timeout=_timeout(self.mv_timeout_s))
            answer = str(found[-1]) if found else None
        return answer

    def answer_found(self, example: Example, response: str) -> bool:
        """For the no-answer count, without a sympy parse per response: an answer in the ``answer`` format,
        or (unless strict) any number in the response, which math-verify's own extraction would read."""
        if answers.extract(response, self.methods) is not None:
            return True
        return not self.strict_format and answers.last_number(response) is not None

    def score(self, example: Example, response: str) -> float:
        return math_score(response, str(example.ground_truth), strict_format=self.strict_format,
                          mv_timeout_s=self.mv_timeout_s, methods=self.methods)
