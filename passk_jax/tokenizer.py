"""Tokenisation shared by real models and the character-level CPU model.

Real models use their own Hugging Face tokenizer and chat template. The CPU default is a character-level
tokenizer built with the `tokenizers` library (one token per character: printable ASCII and newline by
default), wrapped as `transformers.PreTrainedTokenizerFast` and saved as a normal tokenizer directory
(tokenizer.json + tokenizer_config.json), so both paths load the same way (`load_tokenizer`, or
`AutoTokenizer.from_pretrained`) and go through the same `encode_prompt` / `decode_response` code.
It is a byte-level BPE without merges whose vocabulary holds the characters' byte-level forms (" " is "Ġ",
"\\n" is "Ċ"), NFC-normalised, with no unk token: what transformers' Qwen2Tokenizer builds around a
tokenizer.json's vocabulary and merges (it ignores the file's normaliser, pre-tokeniser and decoder; its word
split changes nothing without merges). AutoTokenizer takes Qwen2Tokenizer for every directory whose config.json
has model_type qwen2 (an export of the qwen2-shaped presets), whatever tokenizer_config.json names, so the export
reads back exactly. Like Qwen2Tokenizer it drops characters outside the alphabet.
Special ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3; plain-text encoding prepends <bos>; its chat template
concatenates the message contents after <bos>.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_ALPHABET = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A PreTrainedTokenizerFast with one token per character of `alphabet` (ASCII) after the 4 specials."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet must contain at least one character.")
    if not all(c.isascii() for c in chars):
        raise ValueError(f"alphabet must be ASCII (one byte, so one byte-level token, per character); got "
                         f"{''.join(c for c in chars if not c.isascii())!r}.")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + [byte_level.pre_tokenize_str(c)[0][0] for c in chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no unk token: unknown characters are dropped
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def char_alphabet(tokenizer: Any) -> str | None:
    """The alphabet of a tokenizer made by `build_char_tokenizer` (also the WordLevel format over raw
    characters that older runs saved), in id order; None for any other tokenizer."""
    if tokenizer.chat_template != CHAT_TEMPLATE:
        return None
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if tuple(tokens[:len(SPECIALS)]) != SPECIALS or [vocab[t] for t in tokens] != list(range(len(tokens))):
        return None
    chars = [tokenizer.convert_tokens_to_string([t]) for t in tokens[len(SPECIALS):]]
    return "".join(chars) if chars and all(len(c) == 1 for c in chars) else None


def save_char_tokenizer(path: str, alphabet: str = DEFAULT_ALPHABET):
    """Build and save to directory `path` (tokenizer.json, tokenizer_config.json, chat template)."""
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(path)
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local directory, never the network; its chat template comes with it.

    A model checkpoint (a directory with config.json) goes through ``AutoTokenizer``, which picks the class
    its configs name; a bare tokenizer directory (the character tokenizer a run saves) loads as
    ``PreTrainedTokenizerFast`` from its tokenizer.json, without AutoTokenizer's seconds-long import.
    A directory without tokenizer files is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in local directory {path}.")
    if (path / "config.json").is_file():
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def encode_prompt(tokenizer, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a rendered prompt: chat messages go through the tokenizer's chat template with the
    generation prompt; plain text is encoded with the tokenizer's own special tokens (e.g. <bos>)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_lengths(tokenizer, prompts: Sequence[str | Sequence[dict[str, str]]], batch: int = 1024) -> list[int]:
    """``[len(encode_prompt(tokenizer, p)) for p in prompts]``, tokenized in batches."""
    texts, special = [], []
    for p in prompts:
        if isinstance(p, str):
            texts.append(p)
            special.append(True)
        else:
            texts.append(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False))
            special.append(False)
    out = []
    for start in range(0, len(texts), batch):
        for flag in (True, False):
            idx = [i for i in range(start, min(start + batch, len(texts))) if special[i] == flag]
            if idx:
                ids = tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
                out += list(zip(idx, (len(x) for x in ids)))
    return [n for _, n in sorted(out)]


def decode_response(tokenizer, ids: Sequence[int]) -> str:
    """Completion text for the verifier (special tokens such as <eos>/<pad> dropped)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)
