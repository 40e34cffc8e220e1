"""Device mesh, logical-axis rules, multi-process start-up and host <-> global array helpers.

One mesh with axes ('data', 'fsdp', 'tensor') serves every phase. Parameters and activations carry logical
axis names ("batch", "embed", "heads", ...); `LOGICAL_RULES` maps each onto mesh axes. A mesh axis is used
at most once per array (the first logical axis that asks for it wins) and is dropped for a dimension it does
not divide, so the same rules work for every model size and on a single device.

Multi-process runs are plain multi-controller JAX: every process runs the same programs over the global
mesh. Host-side work on per-row results (detokenising, scoring) is split by `row_owners`: each process
fetches (`fetch_rows`) and handles only the rows it owns, and `gather_rows` assembles the per-row results
on every process; `allgather`, `process_max` / `process_sum` and `process_any` reduce host values so every
process computes the same scalars and takes the same branches. With one process all of them are identities
that run no collective.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("norm", None),
)
_RULES = dict(LOGICAL_RULES)
# The sampler's weight layout (`Sampler(decode_layout="replicated")`): the training rules without FSDP, so
# the weights are whole on every device of a data-parallel group (split over 'tensor' only, where that axis
# is used) and no decode step gathers them.
DECODE_RULES = {**_RULES, "embed": None}

LogicalAxes = Sequence[str | None]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') over `devices` (default: all); one size may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) over `num_devices` with a -1 size resolved; a split that does not fit is one error."""
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got data={data} fsdp={fsdp} "
                         f"tensor={tensor}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed sizes {sizes}.")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {int(np.prod(sizes))} "
                         f"devices but {num_devices} are given.")
    return sizes[0], sizes[1], sizes[2]


def logical_spec(logical_axes: LogicalAxes, mesh: Mesh | jax.sharding.AbstractMesh,
                 shape: Sequence[int] | None = None, rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for `logical_axes` on `mesh` under `rules` (default `LOGICAL_RULES`); with `shape`, mesh
    axes that do not divide a dim are dropped."""
    rules = _RULES if rules is None else rules
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}.")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen, prod = [], 1
        for ax in axes:
            if ax in used or sizes.get(ax, 1) == 1:
                continue
            if shape is not None and shape[i] % (prod * sizes[ax]):
                continue
            chosen.append(ax)
            prod *= sizes[ax]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding of an array whose dims carry `logical_axes` (see `logical_spec`)."""
    return NamedSharding(mesh, logical_spec(logical_axes, mesh, shape))


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Activation sharding hint; a no-op unless a mesh is set (`jax.set_mesh`) while tracing."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes, mesh, x.shape))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_params_state: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """Pytree of NamedSharding matching the state (Variables keep their structure; plain leaves replicate).

    Works on concrete or abstract (nnx.eval_shape) states and on optimizer states built from them; `rules`
    (default `LOGICAL_RULES`) e.g. `DECODE_RULES` for the sampler's layout.
    """
    def one(leaf: Any) -> Any:
        if _is_var(leaf):
            axes = leaf.get_metadata().get("out_sharding")
            value = leaf.get_value()
            shape = getattr(value, "shape", ())
            spec = logical_spec(axes, mesh, shape, rules) if axes else PartitionSpec()
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_params_state, is_leaf=_is_var)


def shard_params(params_state: Any, mesh: Mesh) -> Any:
    """The same pytree with every leaf placed with its logical sharding on `mesh`."""
    return jax.device_put(params_state, param_shardings(params_state, mesh))


def to_global(local: np.ndarray, mesh: Mesh, logical_axes: LogicalAxes) -> jax.Array:
    """Global array from this process's rows (the leading dim is split across processes)."""
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    sharding = logical_sharding(mesh, logical_axes, global_shape)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) global array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start multi-controller JAX when this is a multi-process run; returns True if it initialised.

    Explicit arguments win; otherwise the PASSK_COORDINATOR / PASSK_NUM_PROCESSES / PASSK_PROCESS_ID
    variables (set by launch/local_multiprocess.sh); otherwise JAX's own detection on Cloud TPU pods
    (TPU_WORKER_HOSTNAMES with several hosts) and Slurm (SLURM_NTASKS > 1). A single process does nothing.
    """
    import os

    env = os.environ
    coordinator_address = coordinator_address or env.get("PASSK_COORDINATOR")
    if num_processes is None and env.get("PASSK_NUM_PROCESSES"):
        num_processes = int(env["PASSK_NUM_PROCESSES"])
    if process_id is None and env.get("PASSK_PROCESS_ID"):
        process_id = int(env["PASSK_PROCESS_ID"])
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("a multi-process run needs all of coordinator_address, num_processes and "
                             f"process_id; got {explicit}.")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        jax.distributed.initialize()
        return True
    return False


# --------------------------------------------------------------------------------------------- multi-process
def is_multiprocess() -> bool:
    return jax.process_count() > 1


def allgather(x: Any) -> np.ndarray:
    """Every process's host value ``x`` (same shape and dtype everywhere), stacked: [process_count, *shape].

    The bytes travel, so float64 / int64 / structured values arrive exactly without jax_enable_x64."""
    x = np.asarray(x)  # (np.ascontiguousarray would turn a 0-d value into 1-d)
    count = jax.process_count()
    if count == 1:
        return x[None]
    from jax.experimental import multihost_utils

    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    if raw.size == 0:
        return np.zeros((count,) + x.shape, x.dtype)
    out = np.asarray(multihost_utils.process_allgather(raw))
    return np.ascontiguousarray(out).view(x.dtype).reshape((count,) + x.shape)


def process_any(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (e.g. a preemption signal that reached one host)."""
    return bool(flag) if not is_multiprocess() else bool(allgather(np.bool_(flag)).any())


def broadcast_text(text: str, size: int = 2048) -> str:
    """Process 0's ``text`` (its first ``size`` bytes) on every process (a decision's error message)."""
    if not is_multiprocess():
        return text
    buf = np.zeros(size, np.uint8)
    data = np.frombuffer(text.encode()[:size], np.uint8)
    buf[:data.size] = data
    return bytes(allgather(buf)[0]).rstrip(b"\0").decode(errors="replace")


def _reduce(values: Mapping[str, float], op: Any) -> dict[str, float]:
    if not is_multiprocess():
        return dict(values)
    keys = sorted(values)
    table = allgather(np.array([float(values[k]) for k in keys], np.float64))  # [processes, keys]
    return {k: float(v) for k, v in zip(keys, op(table, axis=0))}


def process_max(values: Mapping[str, float]) -> dict[str, float]:
    """Per-key maximum over processes (wall-clock timings: the slowest process sets the pace)."""
    return _reduce(values, np.max)


def process_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Per-key sum over processes (counters such as verifier errors)."""
    return _reduce(values, np.sum)


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value that is the same on every process (each places its own shards).

    Unlike ``jax.device_put``, which checks across processes that a host value is identical (a collective
    and a compilation per shape), this trusts the caller."""
    x = np.asarray(x)
    if not is_multiprocess():
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def row_owners(x: jax.Array) -> np.ndarray:
    """i32[R]: the process that handles each row of the global array ``x`` (R = x.shape[0]).

    A row belongs to the lowest-indexed process that holds it in an addressable shard, so the owners
    partition the rows, and a row replicated over processes is handled once."""
    rows = x.shape[0]
    if getattr(x, "is_fully_addressable", True):
        return np.full(rows, jax.process_index(), np.int32)
    owner = np.full(rows, np.iinfo(np.int32).max, np.int32)
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        held = np.arange(rows)[index[0]]
        owner[held] = np.minimum(owner[held], device.process_index)
    return owner


def fetch_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` as numpy, copied only from this process's addressable shards (every row must be held
    here, with all its columns: e.g. the rows ``row_owners`` gives this process)."""
    rows = np.asarray(rows, np.int64)
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))[rows]
    out = np.zeros((len(rows),) + x.shape[1:], x.dtype)
    filled = np.zeros(len(rows), bool)
    for shard in x.addressable_shards:
        if shard.data.shape[1:] != x.shape[1:]:
            raise ValueError(f"fetch_rows needs whole rows but a shard of {x.shape} holds {shard.data.shape}.")
        start, stop, _ = shard.index[0].indices(x.shape[0])
        take = ~filled & (rows >= start) & (rows < stop)
        if take.any():
            out[take] = np.asarray(shard.data)[rows[take] - start]
            filled |= take
    if not filled.all():
        raise ValueError(f"rows {rows[~filled][:8].tolist()} of a {x.shape} array are not held by process "
                         f"{jax.process_index()}.")
    return out


def gather_rows(local: Mapping[str, np.ndarray], owners: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row host results computed by their owners, assembled on every process (one collective).

    ``local[name]`` holds the rows r with ``owners[r] == jax.process_index()``, in increasing r; returns the
    full [R, ...] arrays (bit-exact: each row is copied from its owner, nothing is summed)."""
    if not is_multiprocess():
        return {name: np.asarray(v) for name, v in local.items()}
    mine = owners == jax.process_index()
    dtype = np.dtype([(name, np.asarray(v).dtype, np.asarray(v).shape[1:]) for name, v in local.items()])
    packed = np.zeros(len(owners), dtype)
    for name, v in local.items():
        packed[name][mine] = v
    table = allgather(packed)  # [processes, R]
    picked = table[owners, np.arange(len(owners))]
    return {name: np.ascontiguousarray(picked[name]) for name in local}
