"""Memory plan without hardware: compile the train step and the sampler for a target mesh on fake CPU devices.

    python -m experiments.plan --config=NAME [--config.a.b=v ...] --topology=v5p-64 [--model=qwen2.5-32b]
        [--mesh=data,fsdp,tensor] [--prompt_len=512] [--sample_prompts=P] [--only=all|train|sample]
        [--lower_only] [--top=10] [--buffers=N]

The process gets as many virtual CPU devices as the target has chips (``--xla_force_host_platform_device_count``
is set from ``--topology`` before jax is imported), builds the model, the optimiser state and a batch of the
config's shapes abstractly (``nnx.eval_shape`` / ``jax.eval_shape``: no weight is ever materialised), lowers and
compiles ``rl.step.make_train_step``'s jitted step and the ``Sampler``'s prefill / decode for the mesh, and prints
XLA's per-device memory analysis next to the target's HBM per chip, plus the sharding of the largest arrays.

The numbers are the CPU compiler's buffer assignment of the same SPMD-partitioned program, so sharding, batch and
remat decisions show up faithfully; fusion, layout padding and the memory schedulers of the TPU/GPU compilers
differ, so treat them as an estimate (+-20 %), not as a guarantee.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

GiB = 1024 ** 3


# --------------------------------------------------------------------------------------------- topologies
@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: int              # chips (TPU) or GPUs: one JAX device each
    hbm_bytes: float | None   # memory per device (None: host memory, cpu-N)
    chip: str
    hbm_bw: float | None = None   # HBM bytes/s per device (vendor's nominal figure)
    link_bw: float | None = None  # interconnect bytes/s per device, one direction (NVLink / ICI, nominal)


_TPU = {  # generation -> (TensorCores per chip in the slice name, HBM per chip, chip name, HBM B/s, ICI B/s)
    "v4": (2, 32 * GiB, "TPU v4", 1.2e12, 2.7e11),
    "v5p": (2, 95 * GiB, "TPU v5p", 2.765e12, 6.0e11),
    "v5e": (1, 16 * GiB, "TPU v5e", 8.19e11, 2.0e11),
    "v5litepod": (1, 16 * GiB, "TPU v5e", 8.19e11, 2.0e11),
    "v6e": (1, 32 * GiB, "TPU v6e", 1.64e12, 4.5e11),
}
_GPU = {"H100": 80 * GiB, "H200": 140 * GiB, "A100": 80 * GiB}  # about what nvidia-smi reports
_GPU_BW = {"H100": (3.35e12, 4.5e11), "H200": (4.8e12, 4.5e11), "A100": (2.04e12, 3.0e11)}  # SXM: HBM, NVLink
KNOWN_TOPOLOGIES = ("v4-N and v5p-N (N TensorCores = N/2 chips: v5p-64 is 32 chips), v5e-N / v5litepod-N and "
                    "v6e-N (N chips), KxH100, KxH200, KxA100 (K GPUs) and cpu-K, e.g. v5p-64, v4-32, v5e-256, "
                    "v6e-8, 8xH100, 8xH200, cpu-8")


def parse_topology(name: str) -> Topology:
    """``v5p-64`` -> Topology(devices=32, 95 GiB); an unknown name is a one-sentence ValueError."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name or "")
    if m:
        cores, hbm, chip, hbm_bw, link_bw = _TPU[m.group(1)]
        n = int(m.group(2))
        if n >= cores and n % cores == 0:
            return Topology(name, n // cores, hbm, chip, hbm_bw, link_bw)
    m = re.fullmatch(r"(\d+)x(H100|H200|A100)", name or "", flags=re.IGNORECASE)
    if m and int(m.group(1)) >= 1:
        gpu = m.group(2).upper()
        return Topology(name, int(m.group(1)), _GPU[gpu], f"NVIDIA {gpu}", *_GPU_BW[gpu])
    m = re.fullmatch(r"cpu-(\d+)", name or "")
    if m and int(m.group(1)) >= 1:
        return Topology(name, int(m.group(1)), None, "CPU device")
    raise ValueError(f"unknown topology {name!r}; known topologies are {KNOWN_TOPOLOGIES}.")


DUMP_ENV = "PASSK_PLAN_XLA_DUMP"  # where XLA dumps the compiled programs when --buffers is set


def _topology_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--topology="):
            return arg.split("=", 1)[1]
        if arg == "--topology" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def configure_devices(argv: list[str]) -> None:
    """Give this process the target's device count as virtual CPU devices; must run before jax is imported."""
    name = _topology_arg(argv)
    if name is None:
        return  # absl reports the missing required flag
    try:
        topo = parse_topology(name)
    except ValueError as err:
        sys.exit(f"error: {err}")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={topo.devices}"
    joined = " ".join(argv[1:])
    if re.search(r"--buffers[= ]0*[1-9]", joined):  # XLA writes its buffer report when it dumps the programs
        import tempfile

        os.environ[DUMP_ENV] = tempfile.mkdtemp(prefix="passk_plan_")
        flags += f" --xla_dump_to={os.environ[DUMP_ENV]} --xla_dump_hlo_module_re=^jit__(step|prefill_fn|decode_fn)$"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    configure_devices(sys.argv)

import jax  # noqa: E402  (after configure_devices)
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import cli, configs  # noqa: E402
from passk_jax import hlo, parallel  # noqa: E402
from passk_jax.models import lora  # noqa: E402
from passk_jax.models.families import CHECKPOINTS  # noqa: E402
from passk_jax.models.transformer import ModelConfig, Transformer, split  # noqa: E402
from passk_jax.rl import step as rl_step  # noqa: E402
from passk_jax.rl.batch import Batch, batch_shardings  # noqa: E402
from passk_jax.sampling import Sampler, choose_decode_mesh, decode_copy_bytes, default_buckets  # noqa: E402
from passk_jax.run.spec import MeshSpec, ModelSpec, RunSpec  # noqa: E402

ARCHITECTURES = CHECKPOINTS  # named architectures (passk_jax/models/families.py): no checkpoint needed

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, f"Target: {KNOWN_TOPOLOGIES}.")
flags.DEFINE_string("model", "", f"Architecture from the built-in table {sorted(ARCHITECTURES)}; default: the "
                    "config's hf_path config.json, the named config's ARCHITECTURE (qwen25_7b_*: qwen2.5-7b), else the "
                    "config's preset.")
flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (one may be -1); default: the config's mesh section.")
flags.DEFINE_integer("prompt_len", 0, "Padded prompt length (sampler bucket); default 512, capped so that "
                     "prompt + max_new_tokens fits the model context.")
flags.DEFINE_integer("sample_prompts", 0, "Prompts per sampler call; default rollout.prompts_per_step.")
flags.DEFINE_enum("only", "all", ["all", "train", "sample"], "Which programs to plan.")
flags.DEFINE_bool("lower_only", False, "Lower but do not compile (fast; prints only the sharded argument sizes).")
flags.DEFINE_integer("top", 10, "How many of the largest arrays to list.")
flags.DEFINE_integer("buffers", 0, "Also list this many of the largest temporary buffer slots of each compiled "
                     "program (from XLA's memory-usage report; each slot is reused by the values listed).")


# --------------------------------------------------------------------------------------------- building
def plan_attention(kernel: str, topo: Topology | None) -> tuple[str, str]:
    """(kernel the plan compiles, note): the config's ``model.attention`` as the target would run it
    (``transformer.no_cache_kernel``); the accelerator kernels ("auto" picks cuDNN's on a GPU, Pallas splash
    on a TPU) are planned with the project's blocked kernel, the O(S)-memory stand-in the CPU compiler can
    build."""
    backend = "cpu" if topo is None or topo.hbm_bytes is None else "gpu" if topo.chip.startswith("NVIDIA") else "tpu"
    if kernel == "auto":
        kernel = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "blocked")  # bf16 models; see no_cache_kernel
    if kernel == "plain":
        return "plain", "plain XLA attention (O(S^2) f32 scores)"
    if kernel == "blocked":
        return "blocked", "the blocked O(S) kernel"
    name = "cuDNN flash attention" if kernel == "cudnn" else "Pallas splash attention"
    return "blocked", (f"{name} on the target, planned with the blocked O(S) kernel as its stand-in (the CPU "
                       "compiler cannot build it)")


def model_config(m: ModelSpec, name: str, topo: Topology | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, description) from --model, the config's hf_path, or its preset, with the attention kernel
    of ``plan_attention``."""
    numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                    attention=plan_attention(m.attention, topo)[0])
    if not name and m.hf_path:
        path = os.path.join(m.hf_path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"model.hf_path {m.hf_path!r} has no config.json; pass --model={'|'.join(ARCHITECTURES)}.")
        import json

        from passk_jax.models.hf import config_from_hf

        with open(path) as f:
            cfg = config_from_hf(json.load(f))
        return dataclasses.replace(cfg, **numerics), m.hf_path
    if not name and m.preset == "hf":
        name = configs.architecture(configs.selected_name())
        if not name:
            raise ValueError(f"config {configs.selected_name()!r} loads a checkpoint; pass "
                             f"--model={'|'.join(ARCHITECTURES)} or --config.model.hf_path=DIR.")
    if name:
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown --model {name!r}; known: {', '.join(sorted(ARCHITECTURES))}.")
        return ModelConfig.named(name, **numerics), name
    from passk_jax.tokenizer import build_char_tokenizer

    preset = getattr(ModelConfig, m.preset)
    return preset(vocab_size=len(build_char_tokenizer()), max_position_embeddings=m.max_len, **numerics), m.preset


def mesh_sizes(mesh: MeshSpec, spec: str, topo: Topology) -> dict[str, int]:
    """{data, fsdp, tensor} from --mesh or the config, checked against the topology's device count."""
    if spec:
        parts = spec.split(",")
        if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p.strip()) for p in parts):
            raise ValueError(f"--mesh must be three integers data,fsdp,tensor (one may be -1), got {spec!r}.")
        sizes = dict(zip(parallel.MESH_AXES, (int(p) for p in parts)))
    else:
        sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    wild = [k for k, v in sizes.items() if v == -1]
    ok = len(wild) <= 1 and all(v >= 1 or v == -1 for v in sizes.values()) and (
        topo.devices % fixed == 0 if wild else fixed == topo.devices)
    if not ok:
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} does not "
                         f"divide the {topo.devices} devices of {topo.name}.")
    if wild:
        sizes[wild[0]] = topo.devices // fixed
    return sizes


def abstract_batch(mesh, prompts: int, n: int, seq: int) -> Batch:
    rows = prompts * n
    sh = batch_shardings(mesh)
    sds = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=s)  # noqa: E731
    return Batch(sds((rows, seq), jnp.int32, sh.tokens), sds((rows, seq), jnp.int32, sh.positions),
                         sds((rows, seq), jnp.bool_, sh.token_mask), sds((rows, seq), jnp.bool_, sh.loss_mask),
                         sds((rows, seq), jnp.float32, sh.sampler_logprobs),
                         sds((prompts, n), jnp.float32, sh.rewards), sds((prompts, n), jnp.bool_, sh.valid))


# --------------------------------------------------------------------------------------------- reporting
def _name(path) -> str:
    """Readable pytree path: opt_state[1][0].mu['layers']['q_proj'].value -> opt_state.1.0.mu.layers.q_proj."""
    s = jax.tree_util.keystr(path)
    s = re.sub(r"\.value$|\.raw_value$", "", s)
    s = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), s)
    return s.lstrip(".")


def largest_arrays(state, top: int) -> list[tuple[str, tuple, str, float, str, float]]:
    """(name, shape, dtype, global bytes, spec, per-device bytes) of the ``top`` largest params/optimizer leaves."""
    rows = []
    for group in ("params", "opt_state", "ref_params"):
        tree = getattr(state, group)
        if tree is None:
            continue
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            size = math.prod(x.shape) * x.dtype.itemsize
            shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            rows.append((f"{group}.{_name(path)}", tuple(x.shape), str(x.dtype), size, str(x.sharding.spec), shard))
    rows.sort(key=lambda r: -r[3])
    return rows[:top]


def per_device_bytes(tree) -> float:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _unit(largest: float) -> tuple[str, float]:
    """GiB for real models, MiB for tiny ones (so small numbers are not all 0.00)."""
    return ("GiB", GiB) if largest >= GiB else ("MiB", 1024 ** 2)


@dataclasses.dataclass
class Planned:
    name: str
    lower_s: float
    compile_s: float | None
    stats: object | None  # CompiledMemoryStats
    args_bytes: float     # per-device bytes of the (sharded) arguments, from the shardings
    resident_bytes: float = 0.0  # live state that is not an argument (the training state while sampling)
    hlo_text: str | None = None  # the compiled program (decode only)


def plan_one(name: str, fn, args, kwargs=None, lower_only=False, resident_bytes=0.0) -> Planned:
    t0 = time.perf_counter()
    lowered = fn.lower(*args, **(kwargs or {}))
    return compile_lowered(name, lowered, time.perf_counter() - t0, per_device_bytes(args), lower_only,
                           resident_bytes)


def compile_lowered(name: str, lowered, lower_s: float, args_bytes: float, lower_only=False,
                    resident_bytes=0.0) -> Planned:
    print(f"  {name}: lowered in {lower_s:.1f} s", flush=True)
    if lower_only:
        return Planned(name, lower_s, None, None, args_bytes, resident_bytes)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    print(f"  {name}: compiled in {t2 - t1:.1f} s", flush=True)
    return Planned(name, lower_s, t2 - t1, compiled.memory_analysis(), args_bytes, resident_bytes,
                   compiled.as_text() if name == "decode" else None)


def decode_step_report(decode: Planned, topo: Topology, weight_bytes: float, kv_bytes: float,
                       layout: str, weight_shapes: set[tuple[int, ...]] = frozenset()) -> list[str]:
    """Per generated token (one iteration of a decode loop; the largest phase): collective bytes from the
    compiled HLO, HBM bytes read (the decode weights + the KV slots of the last phase, per device) and the
    roofline time on the target."""
    loops = hlo.loop_collectives(decode.hlo_text)
    step = max(loops, key=lambda lp: lp.bytes_per_iteration) if loops else None
    coll = step.bytes_per_iteration if step else 0
    unit, scale = _unit(max(weight_bytes, coll, kv_bytes))
    kinds = ", ".join(f"{k} {v / scale:.3g}" for k, v in sorted(step.by_kind.items())) if step and coll else "none"
    lines = [f"decode step (one generated token, layout {layout!r}; from the compiled HLO):",
             f"  collectives per step, per device          {coll / scale:.3f} {unit} ({kinds})",
             f"  = {100 * coll / max(weight_bytes, 1):.2f}% of the decode weights' bytes per device"
             f" ({weight_bytes / scale:.2f} {unit})",
             f"  HBM read per step (weights + KV slots)     {(weight_bytes + kv_bytes) / scale:.2f} {unit} "
             f"({weight_bytes / scale:.2f} + {kv_bytes / scale:.2f})"]
    if topo.hbm_bw:
        t_hbm = (weight_bytes + kv_bytes) / topo.hbm_bw
        t_link = coll / topo.link_bw
        lines.append(f"  roofline per step on {topo.chip}: HBM {1e3 * t_hbm:.2f} ms "
                     f"({topo.hbm_bw / 1e12:.2f} TB/s), interconnect {1e3 * t_link:.2f} ms "
                     f"({topo.link_bw / 1e9:.0f} GB/s) -> {1e3 * max(t_hbm, t_link):.2f} ms "
                     f"({'HBM' if t_hbm >= t_link else 'interconnect'}-bound; nominal bandwidths)")
    if decode.stats is not None and weight_shapes:
        upcast = hlo.upcast_copies(decode.hlo_text, weight_shapes)
        if upcast:
            lines.append(f"  note: {upcast / scale:.2f} {unit} of the decode temporaries are f32 copies of bf16 weights "
                         "that the CPU compiler makes (no bf16 matmul on CPU); an accelerator reads the bf16 "
                         f"weights, so its decode peak is about {upcast / scale:.2f} {unit} lower")
    if step and step.unknown_trip_counts:
        lines.append(f"  ({step.unknown_trip_counts} nested loop(s) without a known trip count were counted once)")
    return lines


def buffer_report(program: str, top: int) -> list[str]:
    """The ``top`` largest slots of the temporary allocation in XLA's memory-usage report of ``program``."""
    import glob

    files = sorted(glob.glob(os.path.join(os.environ.get(DUMP_ENV, ""), f"*.jit__{program}.*memory-usage-report.txt")),
                   key=os.path.getmtime)
    if not files:
        return [f"  (no XLA memory-usage report for {program})"]
    with open(files[-1]) as f:
        block = f.read().split("------------------------------------------------------------\n", 1)[1]
    lines = []
    for line in block.split("\n\n", 1)[0].splitlines()[:top]:
        fields = [x.strip() for x in line.split(";")]
        if len(fields) == 5:
            shapes = fields[4] if len(fields[4]) <= 100 else fields[4][:97] + "..."
            lines.append(f"  {fields[1]:>11}  {shapes}")
    return lines


def memory_table(planned: list[Planned], topo: Topology) -> list[str]:
    """Per-device memory rows (GiB), one column per program."""
    width = max(14, *(len(p.name) + 2 for p in planned))
    largest = max([p.args_bytes for p in planned] + [float(p.stats.temp_size_in_bytes) for p in planned if p.stats])
    unit, scale = _unit(largest)
    fmt = lambda x: f"{x / scale:.2f}"  # noqa: E731
    lines = [f"  {'per device, ' + unit:<40}" + "".join(f"{p.name:>{width}}" for p in planned)]

    def row(label, values):
        lines.append(f"  {label:<40}" + "".join(f"{v:>{width}}" for v in values))

    def stat(p, attr):
        return None if p.stats is None else float(getattr(p.stats, attr))

    row("arguments (from shardings)", [fmt(p.args_bytes) for p in planned])
    if any(p.stats is not None for p in planned):
        for label, attr in (("arguments (XLA)", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
                            ("aliased (donated) -", "alias_size_in_bytes"), ("temporaries", "temp_size_in_bytes"),
                            ("generated code", "generated_code_size_in_bytes")):
            row(label, ["-" if stat(p, attr) is None else fmt(stat(p, attr)) for p in planned])
        peaks = []
        for p in planned:
            if p.stats is None:
                peaks.append(None)
                continue
            s = p.stats
            peaks.append(s.argument_size_in_bytes + s.output_size_in_bytes - s.alias_size_in_bytes
                         + s.temp_size_in_bytes + s.generated_code_size_in_bytes + p.resident_bytes)
        if any(p.resident_bytes for p in planned):
            row("+ resident training state", [fmt(p.resident_bytes) for p in planned])
        row("peak estimate (arg+out-alias+temp+code)", ["-" if v is None else fmt(v) for v in peaks])
        if topo.hbm_bytes is not None:
            row(f"HBM per {topo.chip}", [fmt(topo.hbm_bytes)] * len(planned))
            row("fits (peak / HBM)", ["-" if v is None else f"{'yes' if v <= topo.hbm_bytes else 'NO'} "
                                      f"{100 * v / topo.hbm_bytes:.0f}%" for v in peaks])
    row("lower / compile time, s", [f"{p.lower_s:.0f}/" + ("-" if p.compile_s is None else f"{p.compile_s:.0f}")
                                    for p in planned])
    return lines


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run()
    except ValueError as err:
        sys.exit(f"error: {err}")
    finally:
        if os.environ.get(DUMP_ENV):
            import shutil

            shutil.rmtree(os.environ[DUMP_ENV], ignore_errors=True)


def run() -> None:
    topo = parse_topology(FLAGS.topology)
    if jax.device_count() != topo.devices:
        raise ValueError(f"{topo.name} needs {topo.devices} devices but jax has {jax.device_count()}; run this "
                         "module as `python -m experiments.plan` so it sets the device count before jax starts.")
    config = configs.config_flag_value()
    # the planned sampler call: --sample_prompts prompts (default: all), at most its rows as decode slots
    c_r = config.rollout
    c_r.sample_prompts = FLAGS.sample_prompts or c_r.prompts_per_step
    c_r.decode_slots = min(c_r.decode_slots, c_r.sample_prompts * c_r.num_samples)
    spec = RunSpec.from_config(config, host_checks=False)  # planned for another machine
    cfg, source = model_config(spec.model, FLAGS.model, topo)
    sizes = mesh_sizes(spec.mesh, FLAGS.mesh, topo)
    mesh = parallel.make_mesh(**sizes)
    step_cfg = spec.stages[0].step
    r = spec.rollout
    P, n, T = int(r.prompts_per_step), int(r.num_samples), int(r.max_new_tokens)
    context = int(cfg.max_position_embeddings)
    fitting = [b for b in default_buckets(context) if b + T <= context]
    if FLAGS.prompt_len:
        prompt_len = FLAGS.prompt_len
    elif fitting:
        prompt_len = max(b for b in fitting if b <= 512)
    else:
        raise ValueError(f"rollout.max_new_tokens={T} leaves no room for a prompt in the model context {context}.")
    if prompt_len + T > context:
        raise ValueError(f"prompt_len {prompt_len} + rollout.max_new_tokens {T} exceeds the model context {context}.")
    S, R = prompt_len + T, P * n
    rl_step.validate_batch(step_cfg, P, n, R, mesh)
    sp = r.sample_prompts
    dp = sizes["data"] * sizes["fsdp"]
    M, K = step_cfg.num_minibatches, step_cfg.num_microbatches

    graphdef, params = split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    lora_cfg = spec.model.lora
    if lora_cfg is not None:  # the frozen base + float32 adapters: the state holds the adapters' optimiser only
        adapters = jax.eval_shape(lambda: lora.init_adapters(cfg, lora_cfg.check(cfg), jax.random.PRNGKey(0)))
        params = lora.LoraParams(params, adapters, lora_cfg.scale)
    state = rl_step.abstract_state(step_cfg, mesh, params)
    trained = ("every weight" if lora_cfg is None else
               f"LoRA rank {lora_cfg.rank} on {','.join(lora_cfg.targets)} "
               f"({_count(sum(math.prod(x.shape) for x in jax.tree.leaves(params.adapters)))} float32 adapters)")
    print(f"plan: config={configs.selected_name()} model={source} ({_count(cfg.num_params())} params, "
          f"params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}); trains {trained}; training "
          f"attention: {plan_attention(spec.model.attention, topo)[1]}")
    print(f"target: {topo.name} = {topo.devices} x {topo.chip}"
          + (f", {topo.hbm_bytes / GiB:.1f} GiB HBM each" if topo.hbm_bytes else "")
          + f"; mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} "
          f"({jax.device_count()} fake CPU devices)")
    print(f"train batch: {P} prompts x {n} samples = {R} rows x {S} tokens (prompt {prompt_len} + completion {T}); "
          f"{M} mini-batches x {K} micro-batches = {R // (M * K)} rows per micro-batch "
          f"({R // (M * K) / dp:g} per data-parallel shard); old log-probs: {step_cfg.old_logprobs}")
    # decode: one shared prompt cache per prompt plus each row's (or each slot's) own completion slots
    slots = r.decode_slots
    own_rows = slots or sp * n
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    kv_bytes = per_slot * (sp * prompt_len + own_rows * max(1, T - 1))
    # continuous batching keeps the (n x smaller) prompt prefix on every device, the slots split over the rows
    kv_device = (per_slot * sp * prompt_len + per_slot * own_rows * max(1, T - 1) / topo.devices if slots
                 else kv_bytes / topo.devices)
    unit, scale = _unit(kv_bytes)
    mode = f"continuous batching over {own_rows} slots" if slots else "lockstep rows"
    print(f"sampler: prefill {sp} prompts x {prompt_len}, decode {sp * n} rows x {T} new tokens ({mode}); KV cache "
          f"(shared prompt prefix + {own_rows} completion caches) {kv_bytes / scale:.2f} {unit} in all, "
          f"{kv_device / scale:.2f} {unit} per device")
    print("compiling (per-program times below):", flush=True)

    planned: list[Planned] = []
    opt_bytes = per_device_bytes(state.opt_state)
    if FLAGS.only in ("all", "train"):
        _, train_step = rl_step.make_train_step(graphdef, step_cfg, mesh, params)
        planned.append(plan_one("train_step", train_step, (state, abstract_batch(mesh, P, n, S)),
                                lower_only=FLAGS.lower_only))
    decode_info = None
    if FLAGS.only in ("all", "sample"):
        # the decode mesh (rollout.decode_mesh: "auto" splits over a node's GPUs when needed), the layer stack
        # Sampler(layers="auto") and the decode layout the target gets
        node = 8 if topo.chip.startswith("NVIDIA") else topo.devices
        decode_mesh = choose_decode_mesh(r.decode_mesh, mesh, cfg, decode_copy_bytes(cfg, params), topo.hbm_bytes, node,
                                         own_rows if slots else sp * n, r.decode_layout)
        sampler = Sampler(graphdef, cfg, mesh=decode_mesh, buckets=(prompt_len,),
                          layers="auto" if topo.hbm_bytes is None else "model",
                          decode_layout=r.decode_layout, device_memory=topo.hbm_bytes)
        layout = sampler.layout_for(state.params)
        weights = sampler.abstract_weights(state.params)
        resident = opt_bytes + (per_device_bytes(state.params) if layout != "training" else 0.0)
        t0 = time.perf_counter()
        lowered = sampler.lower(weights, num_prompts=sp, bucket=prompt_len, num_samples=n, max_new_tokens=T,
                                decode_slots=own_rows if slots else 0)
        lower_s = time.perf_counter() - t0
        for name in ("prefill", "decode"):
            planned.append(compile_lowered(name, lowered[name], lower_s / 2, per_device_bytes(weights.params),
                                           FLAGS.lower_only, resident))
        decode_info = (layout, per_device_bytes(weights.params),
                       {tuple(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(weights.params)
                        if x.dtype == jnp.bfloat16})
        unit, scale = _unit(max(decode_info[1], resident))
        print(f"decode mesh: data={decode_mesh.shape['data']} fsdp={decode_mesh.shape['fsdp']} "
              f"tensor={decode_mesh.shape['tensor']} ({r.decode_mesh!r} requested"
              + ("; the training mesh" if decode_mesh is mesh else "; the same devices, factored for decoding")
              + ")")
        print(f"decode layout: {layout!r} ({r.decode_layout!r} requested): decode weights "
              f"{decode_info[1] / scale:.2f} {unit} per device; the training parameters and optimizer state "
              f"({resident / scale:.2f} {unit} per device) stay resident while sampling")

    print()
    print("\n".join(memory_table(planned, topo)))
    if any(p.resident_bytes for p in planned):
        print("  (the training state stays on the devices while the sampler runs, so it is added to the "
              "sampler's peak: both copies of the weights are counted)")
    decode = next((p for p in planned if p.name == "decode" and p.hlo_text), None)
    if decode is not None:
        print()
        print("\n".join(decode_step_report(decode, topo, decode_info[1], kv_device, decode_info[0],
                                            decode_info[2])))
    if FLAGS.buffers and not FLAGS.lower_only:
        programs = {"train_step": "step", "prefill": "prefill_fn", "decode": "decode_fn"}
        for p in planned:
            print(f"\n  largest temporary buffers of {p.name} (size, values sharing the slot):")
            print("\n".join(buffer_report(programs[p.name], FLAGS.buffers)))
    print()
    rows = largest_arrays(state, FLAGS.top)
    unit, scale = _unit(max([r[3] for r in rows] + [per_device_bytes(state.params)]))
    if rows:
        print(f"largest arrays (params + optimizer state), {FLAGS.top}:")
        print(f"  {'name':<40}{'dtype':<10}{'global shape':<22}{unit:>8}  {'sharding':<30}{unit + '/device':>11}")
    for name, shape, dtype, size, spec, shard in rows:
        print(f"  {name:<40}{dtype:<10}{str(list(shape)):<22}{size / scale:>8.2f}  {spec:<30}{shard / scale:>11.3f}")
    print(f"  total per device: params {per_device_bytes(state.params) / scale:.3f} {unit}, optimizer state "
          f"{opt_bytes / scale:.3f} {unit}")


if __name__ == "__main__":
    flags.mark_flag_as_required("topology")
    configs.define_config_flag()
    app.run(main, flags_parser=cli.flags_parser)
