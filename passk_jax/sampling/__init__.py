"""Group rollouts (see ``passk_jax.sampling.sampler`` for the flow). The package is split by role:
``prompts`` (host padding, buckets, checks), ``weights`` (the decode copy and its layout), ``decode`` (pure
prefill / decode programs over typed states) and ``sampler`` (the host API, `Sampler`)."""
from passk_jax.sampling.prompts import (MAX_EOS_IDS, PaddedPrompts, as_prompt_list, bucket_for, default_buckets,
                                        left_pad)
from passk_jax.sampling.weights import (DECODE_LAYOUTS, REPLICATED_MAX_FRACTION, DecodeLayout, DecodeWeights,
                                        check_decode_mesh, choose_decode_layout, choose_decode_mesh, decode_copy_bytes,
                                        decode_mesh_sizes, device_memory_bytes)
from passk_jax.sampling.decode import DecodeContext, decode_phases, row_keys, select_rows
from passk_jax.sampling.sampler import SampleOutput, Sampler

__all__ = ["MAX_EOS_IDS", "PaddedPrompts", "as_prompt_list", "bucket_for", "default_buckets", "left_pad",
           "DECODE_LAYOUTS", "REPLICATED_MAX_FRACTION", "DecodeLayout", "DecodeWeights", "check_decode_mesh",
           "choose_decode_layout", "choose_decode_mesh", "decode_copy_bytes", "decode_mesh_sizes", "device_memory_bytes", "DecodeContext", "decode_phases", "row_keys", "select_rows", "SampleOutput",
           "Sampler"]
