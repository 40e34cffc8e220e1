"""Math: answer extraction, math-verify equivalences, verl-schema loading/writing."""
import json

import pytest

from passk_jax import tasks
from passk_jax.tasks import Example, extract_boxed, extract_tag
from passk_jax.tasks.math import extract_math_answer, math_score
from passk_jax.tasks.verl_data import load_verl, write_verl


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                 # nested braces
    ("\\boxed{1} then \\boxed{{a}^{2}}", "{a}^{2}"),          # the last box
    ("\\fbox{7}", "7"),
    ("\\boxed{unclosed", None),
    ("no answer here", None),
    ("<answer> 3/4 </answer>", "3/4"),
    ("<answer>1</answer> <answer>2</answer>", "2"),           # the last block
    ("<answer>x</answer> and \\boxed{y}", "x"),               # <answer> wins over \boxed
    ("<answer>open only", None),
])
def test_extraction(text, expected):
    assert extract_math_answer(text) == expected


def test_extract_helpers():
    assert extract_tag("<think>a</think><answer>b</answer>", "think") == "a"
    assert extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"


@pytest.mark.parametrize("gold,response,reward", [
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}", 1.0),      # decimal vs \frac
    ("1/2", "\\boxed{\\dfrac{1}{2}}", 1.0),                    # fraction forms
    ("\\frac{3}{4}", "<answer>3/4</answer>", 1.0),
    ("5", "\\boxed{5 \\text{ cm}}", 1.0),                      # units dropped
    ("5\\text{ cm}", "\\boxed{5}", 1.0),
    ("90", "\\boxed{90^\\circ}", 1.0),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1.0),
    ("x^2+1", "\\boxed{1+x^2}", 1.0),
    ("3", "\\boxed{4}", 0.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
    ("7", "I think it is 7.", 1.0),                            # math-verify's own extraction fallback
    ("7", "", 0.0),
    ("7", "\\boxed{}", 0.0),
])
def test_math_verify_equivalences(gold, response, reward):
    assert math_score(response, gold) == reward


def test_strict_format_and_task():
    assert math_score("I think it is 7.", "7", strict_format=True) == 0.0
    task = tasks.get("math", strict_format=True)
    assert task.score(Example("q", "12", "gsm8k"), "so \\boxed{12}") == 1.0


def _row(i, **over):
    row = {"data_source": "toy", "prompt": [{"role": "user", "content": f"{i}+{i}?"}], "ability": "math",
           "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
    row.update(over)
    return row


def test_load_jsonl_reports_malformed_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(_row(0)), json.dumps(_row(1)), "{not json", "",
             json.dumps(_row(3, reward_model={"style": "rule"})), json.dumps(_row(4, prompt=[])),
             json.dumps(_row(5, data_source=None)), json.dumps(_row(6))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_verl(str(path))
    msg = str(err.value)
    assert "4 malformed" in msg
    for line, reason in [(3, "invalid JSON"), (5, "ground_truth"), (6, "prompt"), (7, "data_source")]:
        assert f"{path}:{line}: " in msg and reason in msg
    errors = []
    good = load_verl(str(path), on_bad_row="skip", errors=errors)
    assert [e.ground_truth for e in good] == ["0", "2", "12"] and len(errors) == 4
    assert good[0].prompt == [{"role": "user", "content": "0+0?"}] and good[0].extra["index"] == 0


def test_load_parquet_reports_malformed_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(0), _row(1, reward_model={"style": "rule", "ground_truth": None}), _row(2)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    with pytest.raises(ValueError, match=r"data\.parquet: row 1: missing 'reward_model.ground_truth'"):
        load_verl(str(path))
    task = tasks.get("math", train_files=str(path), on_bad_row="skip")
    train = task.examples("train")
    assert [e.ground_truth for e in train] == ["0", "4"]
    assert task.score(train[1], "<answer>4</answer>") == 1.0 and task.score(train[1], "\\boxed{5}") == 0.0
    with pytest.raises(FileNotFoundError):
        load_verl(str(tmp_path / "missing.parquet"))


def test_load_jsonl_reports_invalid_utf8_with_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    bad = json.dumps(_row(1)).encode().replace(b"1+1?", b"1+\xff?")
    path.write_bytes(json.dumps(_row(0)).encode() + b"\n" + bad + b"\n" + json.dumps(_row(2)).encode() + b"\n")
    with pytest.raises(ValueError) as err:
        load_verl(str(path))
    msg = str(err.value)
    assert msg.startswith(f"malformed dataset row {path}:2: invalid UTF-8 (byte 0xff at column ") and "\n" not in msg
    errors = []
    good = load_verl(str(path), on_bad_row="skip", errors=errors)
    assert [e.ground_truth for e in good] == ["0", "4"] and len(errors) == 1 and "UTF-8" in errors[0]
    assert [e.origin for e in good] == [f"{path}:1", f"{path}:3"]


def test_loaded_examples_record_their_origin(tmp_path):
    examples = [Example("q0", "a0", "custom"), Example("q1", "a1", "custom")]
    jsonl = write_verl(examples, str(tmp_path / "d.jsonl"))
    parquet = write_verl(examples, str(tmp_path / "d.parquet"))
    assert [e.origin for e in load_verl(jsonl)] == [f"{jsonl}:1", f"{jsonl}:2"]
    assert [e.origin for e in load_verl([parquet])] == [f"{parquet}: row 0", f"{parquet}: row 1"]
    assert [e.origin for e in tasks.get("verl", train_files=jsonl).examples("train")] == [f"{jsonl}:1", f"{jsonl}:2"]
    assert examples[0].origin == "" and load_verl(jsonl)[0] == Example("q0", "a0", "custom", {"ability": "custom"})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_read_round_trip(tmp_path, fmt):
    examples = [Example("S.\n.E\n>", "S.\n.E", "maze_2x2", {"index": 0}),
                Example([{"role": "system", "content": "sys"}, {"role": "user", "content": "u"}],
                        "S.\n.E", "maze_2x2", {"index": 1})]
    path = write_verl(examples, str(tmp_path / f"d.{fmt}"))
    back = load_verl(path)
    assert [(e.prompt, e.ground_truth, e.data_source) for e in back] == \
           [(e.prompt, e.ground_truth, e.data_source) for e in examples]
    assert back[0].extra == {"index": 0, "ability": "maze"}
    task = tasks.get("verl", train_files=path)
    assert task.score(task.examples("train")[0], "DR") == 1.0  # dispatched to the maze verifier by source


def custom_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str.strip() == ground_truth)}


def test_verl_task_custom_score_fn(tmp_path):
    path = write_verl([Example("q", "yes", "custom")], str(tmp_path / "c.jsonl"))
    task = tasks.get("verl", test_files=path, score_fn=f"{__name__}:custom_compute_score")
    (ex,) = task.examples("test")
    assert task.score(ex, " yes ") == 1.0 and task.score(ex, "no") == 0.0
    with pytest.raises((ImportError, AttributeError)):
        tasks.get("verl", score_fn=f"{__name__}:nope")
