"""The base config every named config starts from: the CPU default (tiny model, mazes, Pass@k analytical).

Sections:
  model     preset ("tiny" | "small") for a fresh character-level model, or hf_path for a local checkpoint
  task      registry name + options for ``passk_jax.tasks.get``
  rollout   prompts per step, samples per prompt (N_rollout), sampling settings, dynamic sampling
  step      every ``passk_jax.rl.step.StepConfig`` field (estimator, k, clip, aggregation, optimiser, ...):
            the ones below set here, the rest at the library's default (``step_section``)
  train     number of RL steps, eval / checkpoint / log cadence, sequential stages
  eval      held-out evaluation (paper: temperature 1.0, top-p 0.95, unbiased pass@k for k = 1, 2, 4, ...)
  sft       supervised warm start on task demonstrations (cached across runs)
  mesh      device mesh sizes over ('data', 'fsdp', 'tensor'); -1 = all remaining devices
"""
import dataclasses
import typing
from collections.abc import Mapping

from ml_collections import ConfigDict, config_dict

from passk_jax.rl.step import StepConfig


def step_section(**values) -> ConfigDict:
    """Every ``StepConfig`` field, at ``values`` or else the library's default, so that each can be set with
    ``--config.step.FIELD=value``; a field whose default is None takes a value of its declared type."""
    hints = typing.get_type_hints(StepConfig)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(StepConfig)})
    if unknown:
        raise ValueError(f"step_section: {unknown} are not StepConfig fields.")
    out = {}
    for f in dataclasses.fields(StepConfig):
        value = values.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if isinstance(value, Mapping):
            value = ConfigDict(dict(value))
        elif value is None:
            value = config_dict.placeholder(next(t for t in typing.get_args(hints[f.name]) if t is not type(None)))
        out[f.name] = value
    return ConfigDict(out)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.preset = "tiny"         # "tiny" | "small"; ignored when hf_path is set
    c.model.hf_path = ""            # local Hugging Face directory (config.json + *.safetensors + tokenizer)
    c.model.dtype = "float32"       # compute dtype ("bfloat16" on accelerators)
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.scan_layers = False     # True: lax.scan over layers (fast compile); False: unrolled (fast steps)
    c.model.attention = "auto"      # no-cache attention kernel: "auto" (splash on TPU, cuDNN on GPU, else blocked)
    c.model.max_len = 256           # context length of a fresh model (prompt + completion)

    c.task = ConfigDict()
    c.task.name = "maze"
    c.task.options = ConfigDict({
        "template": "compact",
        "train_sizes": (5,),
        "test_sizes": (5,),
    })
    c.task.num_train = 4000           # training problems generated (or the first rows of train_files)
    c.task.verifier_workers = 1
    c.task.verifier_timeout_s = 10.0
    c.task.max_error_frac = 0.5       # warn loudly when a step's share of failed verifier calls exceeds this
    c.task.max_failed_steps = 3       # stop when every response of this many consecutive steps failed
    c.task.long_prompts = "error"     # a data row whose prompt + max_new_tokens exceeds the context: "error"
                                      # (names file:line before anything compiles) or "skip" (left out, counted)

    c.rollout = ConfigDict()
    c.rollout.prompts_per_step = 16   # P
    c.rollout.num_samples = 16        # N_rollout
    c.rollout.max_new_tokens = 24
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.sample_prompts = 0      # prompts per sampler call (0 = all; big models need chunks: KV cache)
    c.rollout.ignore_eos = False      # True: every rollout decodes max_new_tokens (fixed-length workloads)
    c.rollout.decode_slots = 64       # continuous batching over this many decode slots (0 = lockstep rows);
                                      # at most prompts x samples of a sampler call (bench/RESULTS.md)
    c.rollout.decode_layout = "auto"  # decode weights: "replicated" (no per-token gathers), "training", "auto"
    c.rollout.dynamic_sampling = False
    c.rollout.max_refills = 4         # extra prompt batches to draw per step under dynamic sampling

    c.step = step_section(
        estimator="passk_analytic",
        k=4,
        eps_low=0.2,
        eps_high=0.28,
        aggregation="token_mean",
        kl_coef=0.0,
        entropy_coef=0.0,
        num_minibatches=1,
        num_microbatches=1,
        learning_rate=1e-4,
        warmup_steps=5,
        weight_decay=0.0,
        grad_clip_norm=1.0,
        old_logprobs="sampler",
        logprob_chunk=0,              # LM head over this many positions at a time (0 = all; real vocabularies: 512)
    )

    c.train = ConfigDict()
    c.train.steps = 40
    c.train.eval_every = 0            # 0 = evaluate only before and after training
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 3
    c.train.log_every = 1
    c.train.stages = ()               # sequence of {"steps": int, "step": {StepConfig overrides}}
    c.train.export_hf = True          # write the final policy as a Hugging Face checkpoint
    c.train.samples_prompts = 4       # prompts (with their responses, rewards, answers) recorded per evaluation
    c.train.samples_responses = 2     # responses recorded per prompt
    c.train.samples_every = 0         # also record an RL step's rollouts every N steps (0 = evaluations only)
    c.train.wandb_project = ""        # also log to Weights & Biases (pip install '.[wandb]'); "" = TensorBoard only
    c.train.wandb_entity = ""
    c.train.wandb_mode = ""           # "online" | "offline" | "disabled"; "" = wandb's default (WANDB_MODE)

    c.eval = ConfigDict()
    c.eval.num_prompts = 64
    c.eval.num_samples = 16
    c.eval.temperature = 1.0
    c.eval.top_p = 0.95
    c.eval.greedy = True
    c.eval.sample_prompts = 64        # prompts per sampler call during evaluation

    c.sft = ConfigDict()
    c.sft.steps = 300
    c.sft.batch_size = 64
    c.sft.learning_rate = 3e-3
    c.sft.warmup_steps = 20
    c.sft.num_examples = 2000
    c.sft.demos_per_example = 1
    c.sft.cache = True
    c.sft.cache_dir = "runs/.sft_cache"
    c.sft.seed = -1                   # SFT data order / cache key; -1 = the run's seed (a study shares one)

    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
