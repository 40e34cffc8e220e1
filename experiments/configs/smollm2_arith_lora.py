"""``smollm2_arith`` with LoRA: rank-16 adapters (alpha 32) on every projection of SmolLM2-135M-Instruct, the
base frozen; a learning rate ten times the full fine-tuning one, as usual for LoRA. The final export writes
the merged model and the adapters as a PEFT directory (``hf_export/peft_adapter``)."""
from experiments.configs import smollm2_arith


def get_config():
    c = smollm2_arith.get_config()
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.step.learning_rate = 2e-4
    c.train.export_hf = True
    return c
