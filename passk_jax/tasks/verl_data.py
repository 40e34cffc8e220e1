"""The verl task: rows of verl-schema files (``passk_jax.tasks.verl_io`` reads and writes them) scored per
data_source by the built-in verifiers, or by a custom verl-style ``compute_score``."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from passk_jax.tasks import BaseTask, Example, resolve, validate_reward_range
from passk_jax.tasks.verl_io import example_to_row, load_verl, row_to_example, write_verl  # noqa: F401 (API)


def default_score(data_source: str, response: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """Our scorers by data_source prefix: maze*, countdown*, else math-verify."""
    if data_source.startswith("maze"):
        from passk_jax.tasks.maze import maze_score

        return maze_score(response, ground_truth)
    if data_source.startswith("countdown"):
        from passk_jax.tasks.countdown import countdown_score

        return countdown_score(response, ground_truth["target"], ground_truth["numbers"])
    from passk_jax.tasks.math import math_score

    return math_score(response, str(ground_truth))


class VerlTask(BaseTask):
    """Any verl-schema dataset. `score_fn` is a verl-style custom reward function
    `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float}`,
    given as a callable (top-level, so worker processes can import it) or a "module:function" path;
    by default the scorer is chosen by data_source (`default_score`, rewards in [0, 1]). `reward_range`
    and `bool_rewards` declare what `score_fn` returns (e.g. `reward_range=(-1, 1)`); `score` passes the
    value on unconverted so the verifier pool can reject anything else."""

    name = "verl"

    def __init__(self, score_fn: str | Callable | None = None, *,
                 reward_range: Sequence[float] = (0.0, 1.0), bool_rewards: bool = False, **files):
        super().__init__(**files)
        self.score_fn = score_fn
        if isinstance(score_fn, str):
            resolve(score_fn)  # fail at config time, not inside a worker
        self.reward_range = validate_reward_range(reward_range)
        self.bool_rewards = bool(bool_rewards)

    def score(self, example: Example, response: str) -> Any:
        fn = self.score_fn or default_score
        fn = resolve(fn) if isinstance(fn, str) else fn
        result = fn(example.data_source, response, example.ground_truth, example.extra)
        return result["score"] if isinstance(result, dict) else result
