"""Countdown: combine the given numbers with + - * / and parentheses to reach the target.

Many different expressions solve one problem, which makes the diversity Pass@k training is after
measurable. Rules (TinyZero-style, the common RLVR setup): every given number is used exactly once
(`use_all=True`; with `use_all=False` each at most once) and no other number literal may appear. The
verifier parses the answer with a recursive-descent parser over exact fractions, never `eval`: only
non-negative integer literals, binary + - * / (also × ÷), and parentheses. There is no exponent operator
at all (`**` or `^` make the answer invalid, so huge powers cannot be requested), no unary minus (a
negative number would be a literal the problem never gave), division by zero scores 0, and the answer
length and nesting depth are capped. An answer may end with "= <target>"; only the left side counts.
"""
from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction
from typing import Sequence

from passk_jax.tasks import BaseTask, Example, extract_boxed, extract_tag

MAX_EXPR_CHARS = 256
MAX_DEPTH = 32


class InvalidExpression(ValueError):
    pass


def _tokenize(expr: str) -> list[str]:
    expr = expr.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    tokens, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c.isdigit():
            j = i
            while j < len(expr) and expr[j].isdigit():
                j += 1
            if j - i > 9:
                raise InvalidExpression("number literal too long")
            tokens.append(expr[i:j])
            i = j
        elif c in "+-*/()":
            if expr.startswith("**", i):
                raise InvalidExpression("exponentiation is not allowed")
            tokens.append(c)
            i += 1
        else:
            raise InvalidExpression(f"unexpected character {c!r}")
    return tokens


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of `expr` and the integer literals it uses, or InvalidExpression / ZeroDivisionError."""
    if len(expr) > MAX_EXPR_CHARS:
        raise InvalidExpression("expression too long")
    tokens, pos, literals = _tokenize(expr), 0, []

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expression(depth):  # term (('+'|'-') term)*
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth):  # factor (('*'|'/') factor)*
        value = factor(depth)
        while peek() in ("*", "/"):
            if take() == "*":
                value *= factor(depth)
            else:
                value /= factor(depth)  # Fraction raises ZeroDivisionError on 0
        return value

    def factor(depth):  # integer | '(' expression ')'
        if depth > MAX_DEPTH:
            raise InvalidExpression("nesting too deep")
        token = peek()
        if token is None:
            raise InvalidExpression("unexpected end")
        take()
        if token == "(":
            value = expression(depth + 1)
            if peek() != ")":
                raise InvalidExpression("missing ')'")
            take()
            return value
        if token.isdigit():
            literals.append(int(token))
            return Fraction(int(token))
        raise InvalidExpression(f"unexpected {token!r}")

    value = expression(0)
    if pos != len(tokens):
        raise InvalidExpression(f"unexpected {tokens[pos]!r}")
    return value, literals


def extract_equation(response: str) -> str:
    """Last <answer> block, else last \\boxed{}, else the whole response (compact template); the left side
    of an '=' if present."""
    text = extract_tag(response)
    if text is None:
        text = extract_boxed(response)
    if text is None:
        text = response
    return text.split("=")[0].strip()


def countdown_score(response: str, target: int, numbers: Sequence[int], use_all: bool = True) -> float:
    try:
        value, used = evaluate(extract_equation(response))
    except (InvalidExpression, ZeroDivisionError, RecursionError):
        return 0.0
    have, want = Counter(used), Counter(int(x) for x in numbers)
    ok_numbers = have == want if use_all else not (have - want)
    return 1.0 if ok_numbers and value == target else 0.0


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[int, str]:
    """Combine all numbers in random order with random operators, keeping intermediate values
    non-negative integers; returns (value, expression)."""
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        items = [item for k, item in enumerate(items) if k not in (i, j)]
        options = [(a + b, f"{ea}+{eb}"), (a * b, f"{ea}*{eb}")]
        if a >= b:
            options.append((a - b, f"{ea}-{eb}"))
        if b and a % b == 0:
            options.append((a // b, f"{ea}/{eb}"))
        value, expr = rng.choice(options)
        items.append((value, f"({expr})"))
    value, expr = items[0]
    return value, expr[1:-1] if len(numbers) > 1 else expr


class CountdownTask(BaseTask):
    name = "countdown"

    def __init__(self, template: str = "compact", min_numbers: int = 3, max_numbers: int = 4,
                 max_number: int = 99, max_target: int = 999, use_all: bool = True,
                 test_size: int = 1000, **files):
        super().__init__(**files)
        if template not in ("compact", "instruct"):
            raise ValueError(f"countdown template must be 'instruct' or 'compact', got {template!r}.")
        self.template, self.use_all = template, use_all
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target, self.test_size = max_number, max_target, test_size

    def render_problem(self, numbers: Sequence[int], target: int):
        nums = " ".join(map(str, numbers))
        if self.template == "compact":
            return f"{nums}>{target}\n"
        rule = "exactly once" if self.use_all else "at most once"
        return [{"role": "user", "content":
                 f"Using the numbers [{', '.join(map(str, numbers))}], create an equation that equals "
                 f"{target}. You can use +, -, * and / and parentheses, and each number must be used "
                 f"{rule}. Think it through, then give only the expression inside <answer> </answer> "
                 "tags, for example <answer>(1 + 2) * 3</answer>."}]

    def generate(self, split: str, num: int | None, seed: int) -> list[Example]:
        """Solvable problems with target in [1, max_target]; train skips the first `test_size` problems of
        the test stream (same seed), so any test split of at most `test_size` is disjoint from train."""
        if num is None:
            raise ValueError("countdown needs `num` examples.")
        if split == "test" and num > self.test_size:
            raise ValueError(f"countdown test num {num} > test_size {self.test_size}; raise test_size.")
        seen: set[tuple] = set()
        test = self._draw("test", num if split == "test" else self.test_size, seed, seen)
        return test if split == "test" else self._draw("train", num, seed, seen)

    def _draw(self, split: str, num: int, seed: int, seen: set) -> list[Example]:
        rng, out = random.Random(f"countdown/{seed}/{split}"), []
        while len(out) < num:
            numbers = [rng.randint(1, self.max_number)
                       for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            target, solution = _random_solution(list(numbers), rng)
            key = (tuple(sorted(numbers)), target)
            if not 1 <= target <= self.max_target or key in seen:
                continue
            seen.add(key)
            out.append(Example(self.render_problem(numbers, target), {"target": target, "numbers": numbers},
                               "countdown", dict(split=split, index=len(out), solution=solution)))
        return out

    def extract_answer(self, example: Example, response: str) -> str | None:
        return extract_equation(response)

    def score(self, example: Example, response: str) -> float:
        gt = example.ground_truth
        return countdown_score(response, gt["target"], gt["numbers"], self.use_all)

    def format_answer(self, expression: str) -> str:
        """A response in this task's template: the bare expression (compact) or inside <answer> tags."""
        return expression if self.template == "compact" else f"<answer>{expression}</answer>"

    def demonstrations(self, example: Example, num: int = 1, seed: int = 0) -> list[str]:
        """Warm-start responses: the generator's solution (stored in `extra["solution"]`)."""
        return [self.format_answer(example.extra["solution"])] * num
