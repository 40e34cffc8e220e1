"""SFT warm start: demonstrations pack as prompt + response + EOS, the loss falls, and a stop request
(preemption) ends training early."""
import jax
import numpy as np

from passk_jax import parallel
from passk_jax.models.transformer import ModelConfig, init
from passk_jax.run import sft
from passk_jax.tasks import get as get_task
from passk_jax.tokenizer import build_char_tokenizer


def _setup():
    tok = build_char_tokenizer()
    task = get_task("maze", train_sizes=(5,), test_sizes=(5,))
    examples = task.examples("train", num=16, seed=0)
    data = sft.build_dataset(task, tok, examples, demos_per_example=2, max_new_tokens=24, seed=0)
    cfg = ModelConfig.tiny(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    graphdef, params = init(cfg, seed=0)
    return tok, data, graphdef, params


def test_dataset_and_loss_falls_and_stop():
    tok, (tokens, loss_mask, token_mask), graphdef, params = _setup()
    assert tokens.shape == loss_mask.shape == token_mask.shape
    for row, lm, tm in zip(tokens, loss_mask, token_mask):
        answer = row[lm]
        assert answer[-1] == tok.eos_token_id and set(tok.decode(answer[:-1])) <= set("UDLR")
        assert tm[lm].all() and row[0] == tok.bos_token_id
    mesh = parallel.make_mesh(devices=[jax.devices()[0]])
    logged = []
    _, history = sft.train(graphdef, params, mesh, (tokens, loss_mask, token_mask), steps=60, batch_size=8,
                           learning_rate=3e-3, warmup_steps=5, seed=0, log=lambda i, l: logged.append(i))
    assert history[-1] < history[0] - 0.5
    calls = []
    _, short = sft.train(graphdef, params, mesh, (tokens, loss_mask, token_mask), steps=60, batch_size=8,
                         learning_rate=3e-3, warmup_steps=5, seed=0, log=lambda i, l: calls.append(i),
                         should_stop=lambda: len(calls) >= 1)
    assert calls == [0] and len(short) == 1
    assert np.isfinite(short).all()
