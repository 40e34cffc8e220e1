"""The run's task and examples: the configured task, its train / test splits, and the deterministic order in
which training draws prompts (position p -> a fresh permutation per epoch, so a resume needs only p)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from passk_jax.run.spec import RunSpec, TaskSpec
from passk_jax.tasks import Task, get as get_task, reward_spec

log = logging.getLogger("passk_jax")


def make_task(spec: TaskSpec) -> Task:
    """The configured task (options set to "" or None count as unset); a wrong option is one clear error."""
    try:
        task = get_task(spec.name, **spec.set_options)
    except TypeError as err:
        raise ValueError(f"task.options do not fit task {spec.name!r}: {err}.") from err
    try:
        reward_spec(task)
    except ValueError as err:
        raise ValueError(f"task {spec.name!r}: {err}") from None
    return task


def load_examples(spec: RunSpec, task: Task) -> tuple[list, list]:
    """(train, test) examples; an empty split is one error naming its file (or the generator's size)."""
    out = []
    for split, num in (("train", spec.task.num_train), ("test", spec.eval.num_prompts)):
        examples = task.examples(split, num=num, seed=spec.seed)
        if not examples:
            source = spec.task.options.get(f"{split}_files") or None
            where = (f"task.options.{split}_files={source!r} has no rows" if source else
                     f"task {spec.task.name!r} produced no {split} examples")
            raise ValueError(f"the {split} split is empty: {where}.")
        out.append(examples)
    return out[0], out[1]


class DataStream:
    """Deterministic infinite stream over examples: position p -> a fresh permutation per epoch."""

    def __init__(self, examples: list, seed: int):
        if not examples:
            raise ValueError("the training split is empty.")
        self.examples, self.seed = examples, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def take(self, position: int, count: int) -> list:
        out = []
        for p in range(position, position + count):
            epoch, i = divmod(p, len(self.examples))
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
            out.append(self.examples[self._perm[1][i]])
        return out


def check_prompts(spec: RunSpec, task: Task, tokenizer: Any, context: int, context_source: str,
                  splits: dict[str, list]) -> tuple[dict[str, list], dict[str, float]]:
    """Check every prompt of every split against the model context before anything compiles: the prompt
    plus ``rollout.max_new_tokens`` must fit in ``context`` tokens (which is also the sampler's largest
    prompt bucket). A prompt that does not fit is an error naming its file and line (or split and index
    for generated examples); with ``task.long_prompts="skip"`` it is left out and counted instead.

    Returns the (possibly filtered) splits and ``{"data/<split>/skipped_long_prompts": count}``."""
    from passk_jax.tokenizer import prompt_lengths

    budget = spec.rollout.max_new_tokens
    if budget >= context:
        raise ValueError(f"rollout.max_new_tokens={budget} leaves no room for a prompt in the model context of "
                         f"{context} tokens ({context_source}).")
    out, counts = {}, {}
    for split, examples in splits.items():
        kept, long = [], []
        rendered = [task.render(ex) for ex in examples]
        chat = next((i for i, p in enumerate(rendered) if not isinstance(p, str)), None)
        if chat is not None and not getattr(tokenizer, "chat_template", None):
            source = f"the tokenizer of {spec.model.hf_path}" if spec.model.hf_path else "the run's tokenizer"
            name = getattr(task, "name", spec.task.name)
            raise ValueError(f"{source} has no chat template, but task {name!r} renders its prompts as "
                             f"chat messages (e.g. {examples[chat].origin or f'{split} example {chat}'}); use a "
                             "checkpoint with a chat template (tokenizer_config.json or chat_template.jinja) or a "
                             "plain-text template of the task.")
        lengths = prompt_lengths(tokenizer, rendered)
        for i, (ex, length) in enumerate(zip(examples, lengths)):
            (long if length + budget > context else kept).append((i, ex, length))
        if long and spec.task.long_prompts == "error":
            i, ex, length = long[0]
            where = ex.origin or f"{split} example {i} of task {spec.task.name!r}"
            more = f" ({len(long) - 1} more {split} prompt(s) too long)" if len(long) > 1 else ""
            raise ValueError(
                f"{where}: the prompt has {length} tokens, which with rollout.max_new_tokens={budget} exceeds the "
                f"model context of {context} tokens ({context_source}){more}; shorten it, lower "
                "rollout.max_new_tokens, or set task.long_prompts='skip' to leave such prompts out.")
        if long:
            log.warning("left out %d of %d %s prompt(s) that with rollout.max_new_tokens=%d exceed the model "
                        "context of %d tokens (task.long_prompts='skip'), e.g. %s.", len(long), len(examples),
                        split, budget, context, long[0][1].origin or f"{split} example {long[0][0]}")
        if not kept:
            raise ValueError(f"the {split} split is empty: every prompt is too long for the model context of "
                             f"{context} tokens with rollout.max_new_tokens={budget} ({context_source}).")
        out[split] = [ex for _, ex, _ in kept]
        counts[f"data/{split}/skipped_long_prompts"] = float(len(long))
    return out, counts
