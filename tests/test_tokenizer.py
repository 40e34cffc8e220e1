"""Character-level tokenizer: round trip, special tokens, byte-level vocabulary, save/load as tokenizer.json,
shared encode path."""
import json
import os

import pytest

from passk_jax.tokenizer import (DEFAULT_ALPHABET, SPECIALS, build_char_tokenizer, char_alphabet,
                                       decode_response, encode_prompt, load_tokenizer, save_char_tokenizer)


def test_round_trip_and_specials():
    tok = build_char_tokenizer()
    assert len(tok) == 100 and [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    text = "S.*..\n..*.E\n>  RRDD <answer>(8-5)*7+3</answer>"
    ids = encode_prompt(tok, text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert decode_response(tok, ids) == text
    assert decode_response(tok, tok("RRDD", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 0, 0]) == "RRDD"
    # outside the alphabet: dropped, as the Qwen2Tokenizer that reads an export does
    assert tok("\u00e9x", add_special_tokens=False)["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="ASCII"):
        build_char_tokenizer("ab\u00e9")


def test_byte_level_vocab_and_alphabet():
    tok = build_char_tokenizer("ab \n")
    assert tok.convert_ids_to_tokens(list(range(4, 8))) == ["a", "b", "\u0120", "\u010a"]  # " ", "\n" byte-level
    assert char_alphabet(tok) == "ab \n" and char_alphabet(build_char_tokenizer()) == DEFAULT_ALPHABET
    tok.chat_template = None
    assert char_alphabet(tok) is None


def test_save_load_and_chat_path(tmp_path):
    path = str(tmp_path / "tok")
    save_char_tokenizer(path, alphabet="SE*.\n>UDLR")
    assert os.path.exists(os.path.join(path, "tokenizer.json"))
    vocab = json.load(open(os.path.join(path, "tokenizer.json")))["model"]["vocab"]
    assert list(vocab)[:4] == list(SPECIALS) and len(vocab) == 14
    tok = load_tokenizer(path)
    assert len(tok) == 14 and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    ids = encode_prompt(tok, "S.\n.E\n>")
    assert decode_response(tok, ids) == "S.\n.E\n>"
    chat = encode_prompt(tok, [{"role": "user", "content": "S.\n.E\n>"}])
    assert chat == ids  # chat template = <bos> + contents: both paths agree


def test_auto_tokenizer_loads_it(tmp_path):
    from transformers import AutoTokenizer

    path = str(tmp_path / "tok")
    save_char_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    expected = [tok.bos_token_id, *tok("ab", add_special_tokens=False)["input_ids"]]
    assert encode_prompt(tok, [{"role": "user", "content": "ab"}]) == expected
