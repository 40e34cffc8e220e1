"""`bench/tunix.py` (the Tunix side-by-side of issue 9), the parts that need no Tunix: argument parsing, the
weights and batch it writes for both sides, the child's tokenizer and reward, and the table. CI never installs
Tunix (that happens only when the benchmark itself runs)."""
import json

import numpy as np
import pytest

from bench import tunix as bt
from bench import tunix_child as child


def test_parse_args_defaults_and_validation():
    a = bt.parse_args([])
    assert (a.presets, a.prompts, a.samples, a.new_tokens, a.prompt_len, a.repeats) == (
        ["tiny", "small"], 16, 8, 128, 24, 1)
    assert a.tunix_venv == bt.DEFAULT_VENV and not a.setup_only
    a = bt.parse_args(["--presets", "small", "--new-tokens", "32", "--repeats", "3"])
    assert (a.presets, a.new_tokens, a.repeats) == (["small"], 32, 3)
    for bad in (["--presets", "huge"], ["--samples", "1"], ["--repeats", "0"], ["--prompt-len", "1"]):
        with pytest.raises(SystemExit):
            bt.parse_args(bad)


def test_missing_venv_is_not_installed(tmp_path):
    assert bt.installed_tunix(tmp_path / "no-venv") is None  # looks only; installing is ensure_tunix's job


def test_prompts_are_left_padded_and_never_use_the_pad_id():
    padded, lengths = bt.make_prompts(256, 16, 24, seed=0)
    assert padded.shape == (16, 24) and padded.dtype == np.int32
    assert lengths[0] == 24 and lengths.min() >= 12 and lengths.max() <= 24
    for row, n in zip(padded, lengths):
        assert (row[: 24 - n] == 0).all() and (row[24 - n:] >= 1).all() and (row < 256).all()


def test_write_inputs_gives_both_sides_the_same_files(tmp_path):
    args = bt.parse_args(["--presets", "tiny", "--prompts", "3", "--samples", "2", "--new-tokens", "8",
                          "--prompt-len", "6"])
    spec = bt.write_inputs(tmp_path, "tiny", args)
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["sizes"] == dict(prompts=3, samples=2, prompt_len=6, new_tokens=8)
    m = spec["model"]
    assert (m["vocab_size"], m["hidden_size"], m["num_layers"], m["tie_word_embeddings"], m["attention_bias"]) == (
        256, 128, 4, True, True)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and (tmp_path / "model" / "model.safetensors").stat().st_size > 4e6

    d = np.load(tmp_path / "batch.npz")
    R, S = 6, 14
    assert d["prompts"].shape == (3, 6) and d["prompt_lengths"][0] == 6
    assert d["tokens"].shape == d["loss_mask"].shape == d["old_logprobs"].shape == (R, S)
    assert d["rewards"].shape == (3, 2)
    # the Tunix child derives its masks from the pad id 0: they must agree with the batch's masks
    assert ((d["tokens"] != 0) == d["token_mask"]).all()
    assert not d["loss_mask"][:, :6].any() and (d["loss_mask"][:, 6:] == d["token_mask"][:, 6:]).all()
    old = d["old_logprobs"]
    assert (old[~d["loss_mask"]] == 0).all() and np.allclose(old[d["loss_mask"]], -np.log(256), atol=0.5)


def test_child_tokenizer_and_reward_match_ours():
    tok = child.IntTokenizer(256)
    assert tok.decode(tok.encode("5 0 17")) == "5 0 17" and tok.eos_id() == 256 and tok.pad_id() == 0
    assert tok.bos_id() is None
    from bench.gpu import Child
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (32, 9))
    ours = Child.reward(tokens, np.ones(tokens.shape, bool))
    theirs = child.synthetic_reward(None, [tok.decode(row) for row in tokens])
    assert ours.tolist() == theirs and 0 < sum(theirs) < 32


def _side(sampler, update, rl):
    return dict(status="ok", phases=dict(
        sampler=dict(tokens_per_s=sampler, time_s=1.0, first_call_s=2.0),
        update=dict(tokens_per_s=update, time_s=1.0, first_call_s=2.0),
        rl_step=dict(tokens_per_s=rl, time_s=1.0, first_call_s=2.0, sample_s=0.5, reward_s=0.01, train_s=0.4)))


def test_table_has_ratios_and_shows_failures():
    rows = [dict(preset="tiny", ours=_side(18000, 12000, 9000), tunix=_side(9000, 8000, 6000)),
            dict(preset="small", ours=_side(1500, 700, 500), tunix=dict(status="timeout", note="killed"))]
    lines = bt.format_table(rows).splitlines()
    assert lines[0] == "| preset | phase | passk_jax tok/s | Tunix tok/s | ratio |"
    assert lines[2] == "| tiny | sampler | 18,000 | 9,000 | 2.00x |"
    assert lines[3] == "| tiny | GRPO update | 12,000 | 8,000 | 1.50x |"
    assert lines[4] == "| tiny | full RL step | 9,000 | 6,000 | 1.50x |"
    assert lines[5] == "| small | sampler | 1,500 | timeout | - |"
    assert len(lines) == 8
    details = bt.format_details(rows)
    assert "tiny Tunix: sampler 1.00s" in details and "small Tunix: timeout killed" in details
