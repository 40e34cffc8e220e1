"""The benchmarks' timing helpers: alternating rounds and the per-round median ratio."""
from bench.common import interleaved_times, median_ratio


def test_interleaved_times_alternate_and_count():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())


def test_median_ratio_takes_the_fastest_slow_side_per_round():
    times = {"hf1": [4.0, 2.0, 9.0], "hf2": [3.0, 6.0, 1.0], "jax": [1.0, 1.0, 2.0]}
    # per round: min(4, 3) / 1 = 3, min(2, 6) / 1 = 2, min(9, 1) / 2 = 0.5 -> median 2
    assert median_ratio(times, ["hf1", "hf2"], "jax") == 2.0
    assert median_ratio(times, "hf1", "jax") == 4.0
