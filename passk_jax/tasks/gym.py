"""reasoning-gym adapter: any `reasoning_gym` dataset, by name, as a Task scored by its own scorer.

    task = tasks.get("gym", dataset="basic_arithmetic", config={"min_terms": 2})

Items are procedurally generated from (config, seed, index), so an example stores only its
`rg_seed`, `rg_size` and `rg_index`; the scorer regenerates the exact entry (question, answer, metadata)
that the dataset's `score_answer(answer, entry)` needs — nothing lossy goes through files or pipes.
The answer is the last `<answer>` block (reasoning-gym's convention); with the compact template a response
without tags is taken whole. Train skips every question of the first `test_size` test items.
"""
from __future__ import annotations

import hashlib
from typing import Any

from passk_jax.tasks import BaseTask, Example, extract_tag


def _seed(seed: int, split: str) -> int:
    return int(hashlib.sha1(f"gym/{seed}/{split}".encode()).hexdigest()[:8], 16)


class GymTask(BaseTask):
    name = "gym"

    def __init__(self, dataset: str, config: dict[str, Any] | None = None, template: str = "instruct",
                 system_prompt: str = "default", test_size: int = 200, **files):
        super().__init__(**files)
        import reasoning_gym

        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}.")
        if template not in ("instruct", "compact"):
            raise ValueError(f"gym template must be 'instruct' or 'compact', got {template!r}.")
        self.dataset, self.config, self.template = dataset, dict(config or {}), template
        self.system_prompt = reasoning_gym.utils.SYSTEM_PROMPTS[system_prompt]
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
        if self.template == "compact":
            return question + "\n"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

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

    def extract_answer(self, example: Example, response: str) -> str | None:
        answer = extract_tag(response)
        if answer is None and self.template == "compact":
            answer = response.strip()
        return answer

    def score(self, example: Example, response: str) -> float:
        e = example.extra
        data = self._data(int(e["rg_seed"]), int(e["rg_size"]))
        return float(data.score_answer(self.extract_answer(example, response), data[int(e["rg_index"])]))
