"""Test-wide setup: CPU only, 8 virtual devices for sharding tests, float32 matmuls exact, and a persistent
compilation cache (``.work/jax_cache``, shared by the xdist workers and the subprocesses the tests start)
so the many tests that compile the same programs (a tiny trainer run, the CLI) compile them once."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are tiny, so their time is compilation. COMPILE_FLAGS cut it (the subprocesses the tests
# start get them too): LLVM at -O0 for the CPU code XLA emits (~40% less; HLO passes unchanged), and XLA:CPU's
# classic LLVM IR emitter for fusions instead of the MLIR fusion emitters (half the compile time of the update
# and sampler tests again; its own fusion decisions). Neither enables fast math; equality tests compare
# programs compiled alike (BUILD_NOTES.md). Runs outside the tests keep XLA's defaults; set XLA_FLAGS to
# override either flag here.
COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in ("--xla_force_host_platform_device_count=8",) + COMPILE_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".work", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")  # small programs recur across tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The slowest files first (cold compilation cache, 2-core box): pytest-xdist's --dist loadfile hands files to
# the workers in collection order, so long files started last would leave the other worker idle at the end.
SLOW_FIRST = ("test_trainer.py", "test_multiprocess.py", "test_reproduce.py", "test_attention.py", "test_lora_run.py",
              "test_packed_step.py", "test_import_model.py", "test_plan.py", "test_decode_layout.py",
              "test_decode_slots.py", "test_transformer.py", "test_losses.py", "test_long_responses.py",
              "test_bench_gpu.py", "test_sampling.py", "test_lora_step.py", "test_custom_loop.py", "test_step.py",
              "test_step_transformer.py", "test_bench_profile.py", "test_sampling_ops.py", "test_advantages.py",
              "test_lora.py", "test_hf.py", "test_bandit.py", "test_decode_mesh.py",
              "test_advantages_bruteforce.py", "test_export_auto.py", "test_parallel.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept
