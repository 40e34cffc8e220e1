"""Maze: the paper's main analysis task (Appendix A.1, Figure 14; `docs/paper.md` section 10).

A maze is an n x n text grid (n odd, 5..21) of `S` (start), `E` (end), `*` (wall) and `.` (free), rows
joined by newlines; that string is the example's ground truth, exactly what the official verifier
(RUCAIBox/Passk_Training `code/maze_verifier.py`) receives. An answer is a string of U/D/L/R moves.

Verifier (`maze_score`) = the official one: take the text after the last `<answer>` up to `</answer>`
(when both tags occur), then the content of the last `\\boxed{...}` if any, else the whole text; upper-case
it (so lower-case moves count, as in the official code); walk from S, skipping every character that is
not U/D/L/R; stepping on a wall or off the grid scores 0; the walk scores 1 iff it ends on E (passing
through E earlier does not count). Added guards: a response longer than `max_chars` scores 0 (bounded
cost), and `require_tags=True` optionally scores 0 when neither tag form is present.

Generator: a randomized depth-first "perfect" maze whose cells sit on the even coordinates (no outer wall,
so leaving the grid is a real failure mode), braided by opening each remaining wall between two cells with
probability `loop_prob` (creates alternative and equally short paths), then S and E placed on distinct
free cells. Difficulty controls, all enforced by rejection: size, shortest path length range, and the
number of distinct shortest paths (counted by BFS dynamic programming). Solvable by construction (the
free cells are connected) and re-checked by BFS.
"""
from __future__ import annotations

import hashlib
import random
from collections import deque
from typing import Sequence

from passk_jax.tasks import BaseTask, Example

MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
PAPER_TRAIN_SIZES = (9, 11, 13, 15)
PAPER_TEST_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)


def paper_test_count(size: int) -> int:
    """Test split size per grid size in the paper: 75 for 7x7, 100 for the others."""
    return 75 if size == 7 else 100


# ----------------------------------------------------------------------------------------------- grid


def parse_grid(grid: str) -> list[str]:
    return grid.strip().split("\n")


def find(rows: Sequence[str], ch: str) -> tuple[int, int]:
    for i, row in enumerate(rows):
        j = row.find(ch)
        if j >= 0:
            return i, j
    raise ValueError(f"maze has no {ch!r}.")


def _neighbours(rows: Sequence[str], i: int, j: int):
    n, m = len(rows), len(rows[0])
    for mv, (di, dj) in MOVES.items():
        a, b = i + di, j + dj
        if 0 <= a < n and 0 <= b < m and rows[a][b] != "*":
            yield mv, a, b


def bfs(rows: Sequence[str], source: tuple[int, int]) -> tuple[dict, dict]:
    """Distances from `source` to every reachable free cell and the number of distinct shortest paths
    to each (dynamic programming over the BFS layers)."""
    dist, count = {source: 0}, {source: 1}
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        for _, a, b in _neighbours(rows, *cell):
            if (a, b) not in dist:
                dist[(a, b)] = dist[cell] + 1
                count[(a, b)] = count[cell]
                queue.append((a, b))
            elif dist[(a, b)] == dist[cell] + 1:
                count[(a, b)] += count[cell]
    return dist, count


def maze_stats(grid: str) -> tuple[int, int]:
    """(shortest path length S->E, number of distinct shortest paths); (-1, 0) when unsolvable."""
    rows = parse_grid(grid)
    dist, count = bfs(rows, find(rows, "S"))
    end = find(rows, "E")
    return (dist[end], count[end]) if end in dist else (-1, 0)


def _walk_back(rows, dist_from_target: dict, start, rng: random.Random | None, count: dict | None) -> str:
    """Follow strictly decreasing distance-to-target from `start`; choose among the next cells uniformly
    over complete shortest paths (weights = number of shortest paths from the next cell)."""
    moves, cell = [], start
    while dist_from_target[cell] > 0:
        options = [(mv, (a, b)) for mv, a, b in _neighbours(rows, *cell)
                   if dist_from_target.get((a, b), -1) == dist_from_target[cell] - 1]
        if rng is None:
            mv, cell = options[0]
        else:
            weights = [count[c] for _, c in options]
            mv, cell = rng.choices(options, weights=weights)[0]
        moves.append(mv)
    return "".join(moves)


def shortest_path(grid: str, rng: random.Random | None = None) -> str:
    """A BFS shortest move string S->E (deterministic without `rng`, uniform over shortest paths with it)."""
    rows = parse_grid(grid)
    dist, count = bfs(rows, find(rows, "E"))  # counts from E = number of shortest paths to E
    start = find(rows, "S")
    if start not in dist:
        raise ValueError("maze is unsolvable.")
    return _walk_back(rows, dist, start, rng, count)


def detour_path(grid: str, rng: random.Random) -> str:
    """A valid, usually non-shortest walk S -> W -> E through a random free waypoint W (it may revisit
    cells, e.g. enter a dead end and come back, which the verifier allows)."""
    rows = parse_grid(grid)
    s = find(rows, "S")
    dist_s, _ = bfs(rows, s)
    waypoint = rng.choice(sorted(dist_s))
    dist_w, count_w = bfs(rows, waypoint)
    dist_e, count_e = bfs(rows, find(rows, "E"))
    return _walk_back(rows, dist_w, s, rng, count_w) + _walk_back(rows, dist_e, waypoint, rng, count_e)


def canonical_hash(grid: str) -> str:
    """Hash of the lexicographically smallest of the grid's 8 rotations/reflections: mazes equal up to a
    symmetry of the square count as duplicates (strict de-duplication)."""
    rows = parse_grid(grid)
    forms = []
    for _ in range(4):
        rows = ["".join(r[i] for r in reversed(rows)) for i in range(len(rows[0]))]  # rotate 90 degrees
        forms += ["\n".join(rows), "\n".join(r[::-1] for r in rows)]
    return hashlib.sha1(min(forms).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ generator


def generate_maze(size: int, rng: random.Random, *, loop_prob: float = 0.1,
                  min_path_len: int = 1, max_path_len: int | None = None,
                  min_shortest_paths: int = 1, max_shortest_paths: int | None = None,
                  max_tries: int = 1000) -> str:
    """One solvable maze meeting the difficulty constraints (rejection sampling; ValueError after
    `max_tries` failed draws, naming the constraint that is too tight)."""
    if size % 2 == 0 or not 5 <= size <= 21:
        raise ValueError(f"maze size must be odd and in 5..21, got {size}.")
    half = (size + 1) // 2  # cells per side, at even coordinates
    for _ in range(max_tries):
        grid = [["*"] * size for _ in range(size)]
        start = (rng.randrange(half), rng.randrange(half))
        seen, stack = {start}, [start]
        grid[2 * start[0]][2 * start[1]] = "."
        while stack:  # randomized DFS carve: a spanning tree of the cells
            ci, cj = stack[-1]
            nxt = [(ci + di, cj + dj) for di, dj in MOVES.values()
                   if 0 <= ci + di < half and 0 <= cj + dj < half and (ci + di, cj + dj) not in seen]
            if not nxt:
                stack.pop()
                continue
            ni, nj = rng.choice(nxt)
            grid[ci + ni][cj + nj] = "."
            grid[2 * ni][2 * nj] = "."
            seen.add((ni, nj))
            stack.append((ni, nj))
        for i in range(size):  # braid: open remaining walls between two cells
            for j in range(size):
                if (i + j) % 2 == 1 and grid[i][j] == "*" and rng.random() < loop_prob:
                    grid[i][j] = "."
        free = [(i, j) for i in range(size) for j in range(size) if grid[i][j] == "."]
        s, e = rng.sample(free, 2)
        grid[s[0]][s[1]], grid[e[0]][e[1]] = "S", "E"
        text = "\n".join("".join(r) for r in grid)
        length, paths = maze_stats(text)
        if (length >= min_path_len and (max_path_len is None or length <= max_path_len)
                and paths >= min_shortest_paths
                and (max_shortest_paths is None or paths <= max_shortest_paths)):
            return text
    raise ValueError(f"no {size}x{size} maze with path length in [{min_path_len}, {max_path_len}] and "
                     f"shortest-path count in [{min_shortest_paths}, {max_shortest_paths}] after "
                     f"{max_tries} tries; loosen the constraints or raise loop_prob.")


# ------------------------------------------------------------------------------------------- verifier


def extract_maze_answer(text: str) -> str:
    """The official extraction: last <answer> block (when both tags occur), then last \\boxed{...}."""
    if "<answer>" in text and "</answer>" in text:
        text = text.split("<answer>")[-1].strip().split("</answer>")[0].strip()
    parts = text.split("boxed")
    if len(parts) == 1:
        return text
    tail = parts[-1]
    if not tail:
        return ""
    if tail[0] != "{":
        return tail.split("$")[0].strip()
    depth, out = 1, []
    for c in tail[1:]:
        depth += (c == "{") - (c == "}")
        if depth == 0:
            break
        out.append(c)
    return "".join(out)


def maze_score(response: str, grid: str, *, max_chars: int = 1_000_000, require_tags: bool = False) -> float:
    """1.0 iff the moves walk from S to E without touching a wall or leaving the grid (official rules)."""
    if len(response) > max_chars:
        return 0.0
    if require_tags and not ("<answer>" in response and "</answer>" in response) and "boxed" not in response:
        return 0.0
    rows = parse_grid(grid)
    n, m = len(rows), len(rows[0])
    x, y = find(rows, "S")
    for step in extract_maze_answer(response).upper():
        if step not in MOVES:
            continue
        dx, dy = MOVES[step]
        x, y = x + dx, y + dy
        if not (0 <= x < n and 0 <= y < m) or rows[x][y] == "*":
            return 0.0
    return 1.0 if rows[x][y] == "E" else 0.0


# ---------------------------------------------------------------------------------------------- task

INSTRUCT_TEMPLATE = (
    "You are given a {n}x{n} maze. 'S' marks the start, 'E' marks the end, '*' is a wall and '.' is a "
    "free cell. Each move goes one cell up (U), down (D), left (L) or right (R); you cannot move into a "
    "wall or outside the grid. Find a path from S to E. Think it through, then give the whole path as a "
    "string of U, D, L and R letters inside <answer> </answer> tags, e.g. <answer>RRDL</answer>.\n\n"
    "Maze:\n{grid}"
)
COMPACT_SUFFIX = "\n>"  # the character-level model sees the grid, then ">", and answers with the moves


def render_maze(grid: str, template: str) -> str | list[dict[str, str]]:
    if template == "compact":
        return grid + COMPACT_SUFFIX
    if template == "instruct":
        return [{"role": "user", "content": INSTRUCT_TEMPLATE.format(n=len(parse_grid(grid)), grid=grid)}]
    raise ValueError(f"maze template must be 'instruct' or 'compact', got {template!r}.")


class MazeTask(BaseTask):
    """Seeded maze splits with paper defaults: train sizes 9-15, test sizes 7-21 (75 for 7x7, 100 for the
    others); train excludes every test maze by canonical hash (and both splits are duplicate-free)."""

    name = "maze"

    def __init__(self, template: str = "compact", train_sizes: Sequence[int] = PAPER_TRAIN_SIZES,
                 test_sizes: Sequence[int] = PAPER_TEST_SIZES, test_counts: dict[int, int] | None = None,
                 loop_prob: float = 0.1, min_path_len: int = 1, max_path_len: int | None = None,
                 min_shortest_paths: int = 1, max_shortest_paths: int | None = None,
                 max_chars: int = 1_000_000, require_tags: bool = False, **files):
        super().__init__(**files)
        render_maze("S.\n.E", template)  # validate the template name now
        self.template = template
        self.sizes = {"train": tuple(train_sizes), "test": tuple(test_sizes)}
        self.test_counts = dict(test_counts or {})
        self.difficulty = dict(loop_prob=loop_prob, min_path_len=min_path_len, max_path_len=max_path_len,
                               min_shortest_paths=min_shortest_paths, max_shortest_paths=max_shortest_paths)
        self.max_chars, self.require_tags = max_chars, require_tags

    def _counts(self, split: str, num: int | None) -> dict[int, int]:
        sizes = self.sizes[split]
        if num is None:
            if split == "train":
                raise ValueError("maze train split needs `num` (the paper uses 10,000 per size).")
            return {s: self.test_counts.get(s, paper_test_count(s)) for s in sizes}
        return {s: num // len(sizes) + (i < num % len(sizes)) for i, s in enumerate(sizes)}

    def _make(self, split: str, counts: dict[int, int], seed: int, exclude: set[str]) -> list[Example]:
        out = []
        for size, count in counts.items():
            rng = random.Random(f"maze/{seed}/{split}/{size}")
            made, tries = 0, 0
            while made < count:
                tries += 1
                if tries > 50 * count + 1000:
                    raise ValueError(f"could not draw {count} distinct {size}x{size} mazes for {split}; "
                                     "too few distinct mazes exist under these constraints.")
                grid = generate_maze(size, rng, **self.difficulty)
                key = canonical_hash(grid)
                if key in exclude:
                    continue
                exclude.add(key)
                length, paths = maze_stats(grid)
                out.append(Example(render_maze(grid, self.template), grid, f"maze_{size}x{size}",
                                   dict(split=split, index=len(out), size=size, path_len=length,
                                        num_shortest_paths=paths, hash=key)))
                made += 1
        return out

    def generate(self, split: str, num: int | None, seed: int) -> list[Example]:
        """Test mazes depend only on (seed, test sizes/counts, difficulty); train skips all of them."""
        test_counts = self._counts("test", num if split == "test" else None)
        seen: set[str] = set()
        test = self._make("test", test_counts, seed, seen)
        return test if split == "test" else self._make("train", self._counts("train", num), seed, seen)

    def extract_answer(self, example: Example, response: str) -> str | None:
        return extract_maze_answer(response)

    def score(self, example: Example, response: str) -> float:
        return maze_score(response, example.ground_truth, max_chars=self.max_chars,
                          require_tags=self.require_tags)

    def format_answer(self, moves: str) -> str:
        """A response in this task's template: bare moves (compact) or <answer>moves</answer>."""
        return moves if self.template == "compact" else f"<answer>{moves}</answer>"

    def demonstrations(self, example: Example, num: int = 1, seed: int = 0,
                       shortest_fraction: float = 0.5) -> list[str]:
        """Responses for a supervised warm start: random shortest paths (fraction `shortest_fraction`)
        and random detours through a waypoint; every one verifies."""
        rng = random.Random(f"demo/{seed}/{example.extra.get('hash', example.ground_truth)}")
        grid = example.ground_truth
        return [self.format_answer(shortest_path(grid, rng) if rng.random() < shortest_fraction
                                   else detour_path(grid, rng)) for _ in range(num)]
