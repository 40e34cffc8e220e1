"""An export read back through transformers' Auto classes behaves as trained: AutoTokenizer gives the training
tokenizer's ids and text (char-level, an older run's char tokenizer, or a real BPE tokenizer passed through from
model.hf_path) and AutoModelForCausalLM gives our logits."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from passk_jax.models import hf, transformer as T
from passk_jax.tokenizer import (CHAT_TEMPLATE, DEFAULT_ALPHABET, SPECIALS, build_char_tokenizer,
                                       char_alphabet, load_tokenizer)

TEXTS = ["S.*..\n..*.E\n>  RRDD <answer>(8-5)*7+3</answer>", "  two  spaces\n\n\nthree newlines   ",
         "<bos>S.\n.E<eos><pad><unk>", "Find a path from S to E.\nAnswer: <answer>RRDD</answer>\n", " ", "\n"]
CHAT = [{"role": "user", "content": "S.*\n..E\n  go"}]


def _same_tokenizer(ours, theirs, texts, chat=CHAT):
    assert len(theirs) == len(ours)
    assert [theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id] == [
        ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id]
    for text in texts:
        for add in (True, False):
            ids = ours(text, add_special_tokens=add)["input_ids"]
            assert theirs(text, add_special_tokens=add)["input_ids"] == ids, text
            for skip in (True, False):
                assert theirs.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)
    rendered = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == rendered
    assert theirs(rendered, add_special_tokens=False)["input_ids"] == ours(rendered, add_special_tokens=False)[
        "input_ids"]


def _write_config(path, family, vocab_size):
    cfg = T.ModelConfig.tiny(vocab_size=vocab_size, family=family, attention_bias=family == "qwen2",
                             qk_norm=family == "qwen3")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))


def test_char_export_loads_through_auto_classes(tmp_path):
    tok = build_char_tokenizer()
    cfg = T.ModelConfig.tiny(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    graphdef, params = T.init(cfg, seed=0)
    rng = np.random.default_rng(0)  # non-trivial norms and biases, so a misplaced tensor shows in the logits
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), params)
    hf.save_pretrained((graphdef, params), cfg, tmp_path, tokenizer=tok)

    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _same_tokenizer(tok, auto, TEXTS)
    for text in TEXTS[:2] + TEXTS[3:]:
        assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True) == text
    assert auto.decode(auto(TEXTS[2])["input_ids"]) == "<bos>" + TEXTS[2]

    # left-padded batch of real prompts; positions from the mask
    rows = [tok(t)["input_ids"] for t in TEXTS]
    S = max(map(len, rows))
    tokens = np.array([[tok.pad_token_id] * (S - len(r)) + r for r in rows])
    mask = np.array([[False] * (S - len(r)) + [True] * len(r) for r in rows])
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ours, _ = T.forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                       position_ids=torch.tensor(positions)).logits.numpy()
    # both float32 (matmuls at "highest" precision), so only summation order differs: ~1e-6 here for logits of
    # size ~2; a wrong token id or weight layout moves them by O(1)
    assert np.abs(np.asarray(ours) - theirs)[mask].max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_char_tokenizer_export_for_each_family(tmp_path, family):
    """AutoTokenizer picks Qwen2Tokenizer for a qwen2 config.json whatever tokenizer_config.json names, the
    named TokenizersBackend for qwen3 and llama: both must read the char tokenizer back exactly."""
    tok = build_char_tokenizer()
    _write_config(tmp_path, family, len(tok))
    hf.save_tokenizer(tok, tmp_path)
    _same_tokenizer(tok, transformers.AutoTokenizer.from_pretrained(tmp_path), TEXTS)


def _old_char_tokenizer():
    """The char tokenizer as runs before the byte-level format saved it (WordLevel over raw characters)."""
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(DEFAULT_ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def test_old_char_tokenizer_dir_loads_as_before_and_exports_faithfully(tmp_path):
    old = _old_char_tokenizer()
    old.save_pretrained(tmp_path / "tokenizer")
    loaded = load_tokenizer(str(tmp_path / "tokenizer"))
    for text in TEXTS + ["\u00e9x"]:  # unknown characters still map to <unk> in a resumed old run
        assert loaded(text)["input_ids"] == old(text)["input_ids"]
    _same_tokenizer(old, build_char_tokenizer(), TEXTS)  # the new format has the same ids
    assert char_alphabet(loaded) == char_alphabet(build_char_tokenizer()) == DEFAULT_ALPHABET

    _write_config(tmp_path / "export", "qwen2", len(loaded))
    hf.save_tokenizer(loaded, tmp_path / "export")
    _same_tokenizer(old, transformers.AutoTokenizer.from_pretrained(tmp_path / "export"), TEXTS)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen2_style_checkpoint(path):
    """A model.hf_path directory with a small byte-level BPE tokenizer laid out like Qwen2.5's."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [t for t in TEXTS for _ in range(5)] + ["the quick brown fox jumps over the lazy dog\n"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for s in specials}
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="Qwen2Tokenizer", added_tokens_decoder=added, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, chat_template=QWEN2_TEMPLATE, errors="replace",
        model_max_length=32768, split_special_tokens=False, clean_up_tokenization_spaces=False)))
    _write_config(path, "qwen2", tok.get_vocab_size())


@pytest.mark.parametrize("source", [True, False], ids=["copied", "saved"])
def test_hf_tokenizer_passes_through(tmp_path, source):
    _qwen2_style_checkpoint(tmp_path / "src")
    ref = hf.load_tokenizer(tmp_path / "src")
    _write_config(tmp_path / "export", "qwen2", len(ref))
    hf.save_tokenizer(ref, tmp_path / "export", source=tmp_path / "src" if source else None)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    texts = TEXTS + ["<|im_start|>user\nS.\n E  <|im_end|>\n", "K\u212a caf\u00e9 \u2192 12345"]
    assert auto(texts[-2])["input_ids"][0] == ref.convert_tokens_to_ids("<|im_start|>")
    _same_tokenizer(ref, auto, texts)
    assert auto.eos_token == "<|im_end|>" and auto.bos_token is None
    if source:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_trainer_export_from_hf_path_keeps_tokenizer_and_config(tmp_path):
    """``trainer.export(..., hf_path=...)`` (the run's and experiments.export's path) copies the source tokenizer
    and keeps the source config.json's own fields; both Auto classes load the result."""
    from passk_jax.run import trainer

    _qwen2_style_checkpoint(tmp_path / "src")
    source_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    source_cfg.update(bos_token_id=None, eos_token_id=[1, 2])
    (tmp_path / "src" / "config.json").write_text(json.dumps(source_cfg))
    ref = hf.load_tokenizer(tmp_path / "src")
    cfg = T.ModelConfig.tiny(vocab_size=len(ref), family="qwen2", attention_bias=True)
    graphdef, params = T.init(cfg, seed=1)
    trainer.export(graphdef, params, cfg, ref, str(tmp_path / "out"), hf_path=str(tmp_path / "src"))
    _same_tokenizer(ref, transformers.AutoTokenizer.from_pretrained(tmp_path / "out"), TEXTS)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [1, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(ref)
