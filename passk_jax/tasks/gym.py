"""reasoning-gym adapter: any `reasoning_gym` dataset, by name, as a Task scored by its own scorer.

    task = tasks.get("gym", dataset="basic_arithmetic", config={"min_terms": 2})

Items are procedurally generated from (config, seed, index), so an example stores only its
`rg_seed`, `rg_size` and `rg_index`; the scorer regenerates the exact entry (question, answer, metadata)
that the dataset's `score_answer(answer, entry)` needs — nothing lossy goes through files or pipes.
Answers (``answer`` option, ``passk_jax.tasks.answers``): by default ("auto") an item whose answer is a number
takes the last `<answer>` block (reasoning-gym's convention), else the last `\\boxed{}`, else the last number in
the response — what chat models that ignore the tags write ("5 - 3 = 2"); other items take the `<answer>`
block only, or, with the compact template, the whole response. Train skips every question of the first
`test_size` test items.

Prompts (instruct template): a system message, then the question as the user message, through the
tokenizer's chat template. ``system_prompt`` is a name of reasoning-gym's SYSTEM_PROMPTS ("default",
"simple", "direct", "DeepSeekZero", "chain_of_draft"), any other text (with a space) used verbatim, or "none" (no system
message: the chat template's own default applies). ``instruction`` (default none) is appended to the question
on a new line, e.g. "Give only the final number.". Both shape generated prompts; prompts read from
``train_files`` / ``test_files`` are used as stored.
"""
from __future__ import annotations

import hashlib
from typing import Any

from passk_jax.tasks import BaseTask, Example, answers


def _seed(seed: int, split: str) -> int:
    return int(hashlib.sha1(f"gym/{seed}/{split}".encode()).hexdigest()[:8], 16)


class GymTask(BaseTask):
    name = "gym"

    def __init__(self, dataset: str, config: dict[str, Any] | None = None, template: str = "instruct",
                 system_prompt: str = "default", test_size: int = 200, answer: str = "auto",
                 instruction: str = "", **files):
        super().__init__(**files)
        import reasoning_gym

        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}.")
        if template not in ("instruct", "compact"):
            raise ValueError(f"gym template must be 'instruct' or 'compact', got {template!r}.")
        self.dataset, self.config, self.template = dataset, dict(config or {}), template
        prompts = reasoning_gym.utils.SYSTEM_PROMPTS
        if system_prompt not in prompts and system_prompt != "none" and not any(c.isspace() for c in system_prompt):
            raise ValueError(f"gym system_prompt {system_prompt!r} is neither a reasoning-gym prompt name "
                             f"({', '.join(sorted(prompts))}), 'none', nor a prompt text.")
        self.system_prompt = "" if system_prompt == "none" else prompts.get(system_prompt, system_prompt)
        self.answer = answers.parse(answer)
        self.instruction = instruction
        self.test_size = test_size
        self._cache: dict[tuple[int, int], Any] = {}

    def __getstate__(self):  # generated datasets stay in the process that built them
        return {**self.__dict__, "_cache": {}}

    def _data(self, seed: int, size: int):
        if (seed, size) not in self._cache:
            import reasoning_gym

            self._cache = {(seed, size): reasoning_gym.create_dataset(self.dataset, seed=seed, size=size,
                                                                      **self.config)}
        return self._cache[(seed, size)]

    def render_question(self, question: str):
        if self.instruction:
            question = f"{question}\n{self.instruction}"
        if self.template == "compact":
            return question + "\n"
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": question}]

    def _draw(self, split: str, num: int, seed: int, exclude: set[str]) -> list[Example]:
        s, size = _seed(seed, split), 2 * num + 16
        data, out = self._data(s, size), []
        for idx in range(size):
            entry = data[idx]
            if entry["question"] in exclude:
                continue
            exclude.add(entry["question"])
            out.append(Example(self.render_question(entry["question"]), entry["answer"], f"gym_{self.dataset}",
                               dict(split=split, index=len(out), rg_seed=s, rg_size=size, rg_index=idx)))
            if len(out) == num:
                return out
        raise ValueError(f"reasoning-gym {self.dataset!r} produced too many duplicate questions.")

    def generate(self, split: str, num: int | None, seed: int) -> list[Example]:
        num = self.test_size if num is None and split == "test" else num
        if num is None:
            raise ValueError("gym train split needs `num`.")
        if split == "test" and num > self.test_size:
            raise ValueError(f"gym test num {num} > test_size {self.test_size}; raise test_size.")
        seen: set[str] = set()
        test = self._draw("test", num if split == "test" else self.test_size, seed, seen)
        return test if split == "test" else self._draw("train", num, seed, seen)

    def methods(self, example: Example) -> tuple[str, ...]:
        """The extraction methods for ``example`` (``answer`` resolved; see the module doc)."""
        if self.answer != ("auto",):
            return self.answer
        if answers.is_numeric(example.ground_truth):
            return answers.NUMERIC_DEFAULT
        return ("tag", "whole") if self.template == "compact" else ("tag",)

    def extract_answer(self, example: Example, response: str) -> str | None:
        return answers.extract(response, self.methods(example))

    def score(self, example: Example, response: str) -> float:
        e = example.extra
        data = self._data(int(e["rg_seed"]), int(e["rg_size"]))
        return float(data.score_answer(self.extract_answer(example, response), data[int(e["rg_index"])]))
