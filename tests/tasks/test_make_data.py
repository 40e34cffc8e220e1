"""`python -m experiments.make_data` writes verl-schema splits that load back and verify."""
import json
import subprocess
import sys
from pathlib import Path

from experiments import make_data
from passk_jax import tasks
from passk_jax.tasks.verl_data import load_verl


def test_maze_parquet(tmp_path):
    out = make_data.main(["--task=maze", f"--out={tmp_path}", "--sizes", "5", "7", "--num-train=20",
                          "--test-sizes", "7", "9", "--num-test=5", "--seed=1"])
    train, test = load_verl(out["train"]), load_verl(out["test"])
    assert len(train) == 40 and len(test) == 10
    assert {e.data_source for e in train} == {"maze_5x5", "maze_7x7"}
    assert isinstance(train[0].prompt, str) and train[0].prompt.endswith("\n>")  # compact by default
    assert not {e.extra["hash"] for e in train} & {e.extra["hash"] for e in test}
    task = tasks.get("maze")
    for e in train[:10]:
        assert task.score(e, task.demonstrations(e)[0]) == 1.0


def test_countdown_jsonl_cli(tmp_path):
    cmd = [sys.executable, "-m", "experiments.make_data", "--task=countdown", f"--out={tmp_path}",
           "--format=jsonl", "--template=instruct", "--num-train=30", "--num-test=10", "--set", "max_numbers=3"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[2])
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert len(rows) == 30 and rows[0]["prompt"][0]["role"] == "user"
    assert set(rows[0]["reward_model"]["ground_truth"]) == {"target", "numbers"}
    assert all(len(r["reward_model"]["ground_truth"]["numbers"]) == 3 for r in rows)
    task = tasks.get("countdown", template="instruct", test_files=str(tmp_path / "test.jsonl"))
    (ex, *_) = task.examples("test")
    assert task.score(ex, f"<answer>{ex.extra['solution']}</answer>") == 1.0
