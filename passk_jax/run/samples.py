"""What the model writes: a few prompts of an evaluation (or of an RL step) with their sampled responses,
rewards and the answers the verifier read, as TRL's completion tables show them.

``records`` picks the first ``num_prompts`` prompts of a ``Rollouts`` and up to ``per_prompt`` responses of
each; ``write`` stores them in ``samples/step_<N>.jsonl`` (one JSON object per prompt, the phase — "eval" or
"train" — in each; a step's file keeps the other phase's records); ``markdown`` renders them as a table for
TensorBoard and ``report.md``, ``table`` as one for Weights & Biases; ``console`` is the one-example line
printed after an evaluation.
With several processes, a process holds the texts of its own rows only: rows it lacks are left out.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from passk_jax.tasks import Task, answer_of

SAMPLES = "samples"


def records(r: Any, task: Task, *, phase: str, num_prompts: int, per_prompt: int) -> list[dict[str, Any]]:
    """``[{"phase", "data_source", "origin", "prompt", "ground_truth", "responses": [{"text", "reward",
    "answer", "length", "truncated"}]}]`` for the first ``num_prompts`` prompts of rollouts ``r``."""
    out = []
    n = r.num_samples
    for i, example in enumerate(r.examples[:num_prompts]):
        responses = []
        for j in range(n):
            row = i * n + j
            text = r.texts[row]
            if text is None or len(responses) == per_prompt:
                continue
            responses.append({"text": text, "reward": float(r.rewards[i, j]),
                              "answer": answer_of(task, example, text), "length": int(r.lengths[row]),
                              "truncated": bool(r.truncated[row])})
        if responses:
            out.append({"phase": phase, "data_source": example.data_source, "origin": example.origin,
                        "prompt": task.render(example), "ground_truth": _plain(example.ground_truth),
                        "responses": responses})
    return out


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def path_of(workdir: str, step: int) -> str:
    return os.path.join(workdir, SAMPLES, f"step_{step:06d}.jsonl")


def write(workdir: str, step: int, recs: Sequence[dict[str, Any]]) -> str:
    """Write ``recs`` to ``samples/step_<step>.jsonl``, replacing earlier records of their phase (atomic)."""
    path = path_of(workdir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    phases = {rec["phase"] for rec in recs}
    kept = [rec for rec in read(path) if rec.get("phase") not in phases]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in [*kept, *recs]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def read(path: str) -> list[dict[str, Any]]:
    """The records of a samples file ([] when absent; an unreadable line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt)


def _cell(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown(recs: Sequence[dict[str, Any]], limit: int = 300) -> str:
    """A markdown table: prompt, ground truth, response, extracted answer, reward (one row per response)."""
    lines = ["| prompt | ground truth | response | answer | reward |", "|---|---|---|---|---|"]
    for rec in recs:
        for k, resp in enumerate(rec["responses"]):
            prompt = _cell(_prompt_text(rec["prompt"]), limit) if k == 0 else ""
            truth = _cell(rec["ground_truth"], 60) if k == 0 else ""
            answer = "(none)" if resp["answer"] is None else _cell(resp["answer"], 60)
            lines.append(f"| {prompt} | {truth} | {_cell(resp['text'], limit)} | {answer} | {resp['reward']:.3g} |")
    return "\n".join(lines)


def table(recs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list]]:
    """(columns, rows) of ``recs`` for a Weights & Biases table: one row per response, texts in full."""
    columns = ["phase", "data_source", "prompt", "ground_truth", "response", "answer", "reward", "length",
               "truncated"]
    rows = [[rec["phase"], rec["data_source"], _prompt_text(rec["prompt"]), str(rec["ground_truth"]), resp["text"],
             "" if resp["answer"] is None else str(resp["answer"]), resp["reward"], resp["length"], resp["truncated"]]
            for rec in recs for resp in rec["responses"]]
    return columns, rows


def console(rec: dict[str, Any], step: int, limit: int = 160) -> str:
    """One line: the last user turn of the prompt, the first response, its answer and reward."""
    prompt = rec["prompt"] if isinstance(rec["prompt"], str) else rec["prompt"][-1]["content"]
    resp = rec["responses"][0]
    squash = lambda s: " ".join(str(s).split())  # noqa: E731
    cut = lambda s: s if len(s) <= limit else s[:limit - 1] + "…"  # noqa: E731
    return (f"sample (step {step}): {cut(squash(prompt))!r} -> {cut(squash(resp['text']))!r} | answer "
            f"{resp['answer']!r} | truth {squash(rec['ground_truth'])[:60]!r} | reward {resp['reward']:.3g}")
