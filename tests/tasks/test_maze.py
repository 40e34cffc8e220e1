"""Maze generator, splits, verifier (official rules) and BFS demonstrations."""
import random

import pytest

from passk_jax import tasks
from passk_jax.tasks import maze

GRID = "\n".join([
    "S.*",
    ".*.",
    "..E",
])  # shortest paths: DDRR only (the upper route is walled)


@pytest.mark.parametrize("response,reward", [
    ("DDRR", 1.0),                                 # correct, bare moves (compact template)
    ("<answer>DDRR</answer>", 1.0),                # correct, paper format
    ("<answer> D D R R </answer>", 1.0),           # spaces and other characters are skipped
    ("Go: D, D, R, R.", 1.0),                      # ... even in bare text (official behaviour)
    ("\\boxed{DDRR}", 1.0),                        # \boxed{} form
    ("<answer>\\boxed{DDRR}</answer>", 1.0),
    ("$\\boxed DDRR$", 1.0),                       # \boxed without braces ends at '$' (official)
    ("ddrr", 1.0),                                 # lower case counts (official code upper-cases)
    ("<answer>RR</answer>", 0.0),                  # wall hit: (0, 2) is '*'
    ("RD", 0.0),                                   # wall hit: (1, 1)
    ("U", 0.0),                                    # off grid (top)
    ("L", 0.0),                                    # off grid (left)
    ("DDRRR", 0.0),                                # off grid (right) after passing E
    ("DDR", 0.0),                                  # ends elsewhere
    ("DDRRL", 0.0),                                # passes E, ends elsewhere
    ("DDRRLR", 1.0),                               # passes E, comes back: ends on E
    ("", 0.0),                                     # empty
    ("<answer></answer>", 0.0),
    ("xyz!? 123 \u00e9\u6f22", 0.0),               # garbage: no moves, stays on S
    ("<answer>DD</answer> then <answer>DDRR</answer>", 1.0),   # the LAST <answer> block counts
    ("<answer>DDRR</answer> then <answer>DD</answer>", 0.0),
    ("DDRR" + "LR" * 100_000, 1.0),                # very long but valid
    ("DD" + "x" * 300_000 + "RR", 1.0),            # very long, mostly skipped characters
])
def test_verifier_cases(response, reward):
    assert maze.maze_score(response, GRID) == reward


def test_verifier_guards():
    assert maze.maze_score("DDRR" + " " * 100, GRID, max_chars=50) == 0.0  # over the cap: 0, O(1)
    assert maze.maze_score("DDRR", GRID, require_tags=True) == 0.0
    assert maze.maze_score("<answer>DDRR</answer>", GRID, require_tags=True) == 1.0
    task = tasks.get("maze", template="instruct")
    ex = tasks.Example("?", GRID, "maze_3x3")
    assert task.score(ex, "<answer>ddrr</answer>") == 1.0


def test_bfs_counts_shortest_paths():
    open_grid = "S..\n...\n..E"  # C(4, 2) = 6 monotone paths
    assert maze.maze_stats(open_grid) == (4, 6)
    assert maze.maze_stats(GRID) == (4, 1)
    assert maze.maze_stats("S*E\n.*.\n.*.") == (-1, 0)
    rng = random.Random(0)
    paths = {maze.shortest_path(open_grid, rng) for _ in range(200)}
    assert len(paths) == 6 and all(maze.maze_score(p, open_grid) == 1.0 for p in paths)


@pytest.mark.parametrize("size", [5, 7, 9, 11, 13, 15, 17, 19, 21])
def test_generator_solvable_and_bfs_solutions_verify(size):
    rng = random.Random(size)
    for _ in range(25):
        grid = maze.generate_maze(size, rng, loop_prob=rng.choice([0.0, 0.1, 0.3]))
        rows = grid.split("\n")
        assert len(rows) == size and all(len(r) == size for r in rows)
        assert set(grid) <= set("SE*.\n") and grid.count("S") == 1 and grid.count("E") == 1
        length, count = maze.maze_stats(grid)
        assert length >= 1 and count >= 1
        path = maze.shortest_path(grid)
        assert len(path) == length and maze.maze_score(path, grid) == 1.0
        detour = maze.detour_path(grid, rng)
        assert len(detour) >= length and maze.maze_score(detour, grid) == 1.0


def test_generator_difficulty_controls():
    rng = random.Random(1)
    for _ in range(10):
        grid = maze.generate_maze(11, rng, loop_prob=0.3, min_path_len=10, max_path_len=14,
                                  min_shortest_paths=2)
        length, count = maze.maze_stats(grid)
        assert 10 <= length <= 14 and count >= 2
    assert maze.maze_stats(maze.generate_maze(9, rng, loop_prob=0.0))[1] == 1  # perfect maze: one path
    with pytest.raises(ValueError, match="odd"):
        maze.generate_maze(8, rng)
    with pytest.raises(ValueError, match="loosen"):
        maze.generate_maze(5, rng, min_path_len=100, max_tries=5)


def test_splits_seeded_deduplicated_and_paper_sized():
    task = tasks.get("maze", train_sizes=(7, 9), test_sizes=(7, 9, 11))
    test = task.examples("test", seed=3)
    assert [sum(e.extra["size"] == s for e in test) for s in (7, 9, 11)] == [75, 100, 100]
    train = task.examples("train", 400, seed=3)
    assert len(train) == 400 and {e.data_source for e in train} == {"maze_7x7", "maze_9x9"}
    test_hashes = {maze.canonical_hash(e.ground_truth) for e in test}
    train_hashes = [maze.canonical_hash(e.ground_truth) for e in train]
    assert len(test_hashes) == len(test) and len(set(train_hashes)) == len(train)
    assert not test_hashes & set(train_hashes)
    again = task.examples("train", 400, seed=3)
    assert [e.ground_truth for e in again] == [e.ground_truth for e in train]
    assert task.examples("train", 10, seed=4)[0].ground_truth != train[0].ground_truth
    small = task.examples("test", 6, seed=3)  # a smaller test split is a prefix per size
    assert {e.ground_truth for e in small} <= {e.ground_truth for e in test}


def test_canonical_hash_is_symmetry_invariant():
    grid = maze.generate_maze(7, random.Random(5))
    rows = grid.split("\n")
    flipped = "\n".join(r[::-1] for r in rows)
    rotated = "\n".join("".join(r[i] for r in reversed(rows)) for i in range(7))
    assert maze.canonical_hash(grid) == maze.canonical_hash(flipped) == maze.canonical_hash(rotated)


def test_templates_and_demonstrations():
    compact = tasks.get("maze", template="compact", train_sizes=(5,), test_sizes=(5,))
    ex = compact.examples("train", 3, seed=0)[0]
    assert ex.prompt == ex.ground_truth + "\n>" and compact.render(ex) == ex.prompt
    for demo in compact.demonstrations(ex, 8, seed=1):
        assert set(demo) <= set("UDLR") and compact.score(ex, demo) == 1.0
    instruct = tasks.get("maze", template="instruct", train_sizes=(5,), test_sizes=(5,))
    ex = instruct.examples("train", 3, seed=0)[0]
    (message,) = ex.prompt
    assert message["role"] == "user" and "<answer>" in message["content"]
    assert message["content"].endswith(ex.ground_truth) and "5x5" in message["content"]
    demos = instruct.demonstrations(ex, 8, seed=1)
    assert all(d.startswith("<answer>") and instruct.score(ex, d) == 1.0 for d in demos)
    with pytest.raises(ValueError, match="template"):
        tasks.get("maze", template="fancy")


def test_registry():
    assert {"maze", "countdown", "math", "gym", "verl"} <= set(tasks.names())
    task = tasks.get("maze")
    assert isinstance(task, tasks.Task) and task.name == "maze"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("nope")
    tasks.register("tiny_maze", lambda **cfg: maze.MazeTask(train_sizes=(5,), test_sizes=(5,), **cfg))
    assert tasks.get("tiny_maze", template="instruct").sizes["test"] == (5,)
