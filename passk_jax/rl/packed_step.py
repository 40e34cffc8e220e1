"""The policy update that computes only what can move the parameters (``step.packing="lengths"``).

The padded update (``passk_jax.rl.step.make_train_step``, ``packing="off"``) runs every row of the batch at the
full width ``S`` = prompt bucket + ``max_new_tokens`` and applies the LM head at every position. This one gives
the same update, up to float32 summation order, with less work:

1. **Rows that cannot move the parameters are left out.** Without a KL or entropy term
   (``StepConfig.skips_zero_advantage``) a row's only loss term is the clipped surrogate, which is exactly 0
   with a zero gradient when its advantage is 0; rows without trained tokens never count. The loss
   denominators (token-mean, sequence-mean, ...) are still those of the whole mini-batch, so nothing else
   changes. A mini-batch with no row left costs no forward or backward; its optimiser update (zero gradients,
   which still moves AdamW's moments) is applied as in the padded update.
2. **No padded completion positions.** The computed rows go into micro-batches by length
   (``passk_jax.rl.packing``): each micro-batch is trimmed on the right to one of ``length_buckets`` widths and
   holds at most ``max_tokens_per_microbatch`` tokens (default: the padded micro-batch's rows x S, so no
   micro-batch needs more memory than the padded update's).
3. **The LM head only where it is needed**: log-probs and entropies at the positions that predict a completion
   token (``policy_logprobs(start=...)``), never over the prompt.
4. **Each prompt once** (``share_prompts``, transformer models, rows of at most ``attention.LONG_FROM``
   columns): the n rows of a group repeat its prompt, so a micro-batch runs each group's prompt (all columns
   before the last one) once per data shard, and its rows only their continuation, attending to the prompt's
   keys and values (``transformer.forward(kv_out=True)`` / ``prefix=``): the same scores and gradients (the
   prompt's gradient is the sum over its rows). The step checks on the device that every row of a group holds
   its group's prompt, and runs the rows whole otherwise.

The step is a short host loop over a few compiled programs, each per shape: ``prelim`` (advantages,
denominators, widths), ``layout`` (the rows in micro-batch order, data-parallel shard-major, one permutation
per step), per micro-batch ``old`` (old-policy / reference log-probs, when recomputed) and ``grad`` (gradient
accumulation; rows are sliced from the laid-out arrays on each shard, no communication), per mini-batch
``apply`` (the optimiser update) and ``finish`` (metrics). Micro-batch shapes are bounded by
``packing.shape_bound``; the laid-out arrays have a power-of-two number of slots per shard.

Statistics read from the computed rows only: ``entropy``, ``approx_kl`` and ``sampler_lp_diff_*`` are token means
over the computed rows, ``prompt_entropy`` is NaN for a prompt none of whose rows was computed (with
``old_logprobs="recompute"``; with ``"sampler"`` the entropy estimate reads every row, as in the padded update).
The clip fractions count over all tokens, as in the padded update (a zero-advantage token never clips).
With ``old_logprobs="recompute"`` and an estimator that ranks prompts by entropy (``entropy_adaptive``) the
advantages need the old-policy pass over every row first, so no row is skipped there (padding still is).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import advantages, parallel
from passk_jax.optim import learning_rate_schedule, make_optimizer
from passk_jax.rl import losses, packing
from passk_jax.rl.batch import BATCH, Batch, batch_shardings
from passk_jax.models import lora
from passk_jax.models import attention
from passk_jax.models.transformer import Transformer, gather_prefix_rows
from passk_jax.rl.step import (StepConfig, TrainState, make_grad_fn, make_train_step, policy_logprobs,
                               reference_policy, step_metrics, validate_batch)

ROW_KEYS = ("tokens", "positions", "token_mask", "mask", "sampler_logp")


def make_packed_train_step(graphdef: Any, cfg: StepConfig, mesh: Mesh, params: Any
                           ) -> tuple[Callable[..., TrainState], Callable[[TrainState, Batch], Any]]:
    """``(init_state, train_step)`` as ``make_train_step``'s, computing the update as described above.

    ``train_step(state, batch) -> (state, metrics)`` takes and returns the same values (the state is donated)
    and adds the metrics ``rows_computed_frac``, ``tokens_computed_frac`` (of the trained tokens),
    ``positions_frac`` (positions computed / the padded update's R x S) and ``microbatches``."""
    cfg.validate()
    init_state, _ = make_train_step(graphdef, cfg, mesh, params)
    progs = _Programs(graphdef, cfg, mesh, params)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    M, K = cfg.num_minibatches, cfg.num_microbatches
    entropy_first = advantages.entry(cfg.estimator).needs_entropy and cfg.old_logprobs == "recompute"

    def train_step(state: TrainState, batch: Batch):
        num_prompts, n = np.shape(batch.rewards)
        rows, width = np.shape(batch.tokens)
        validate_batch(cfg, num_prompts, n, rows, mesh)
        budget = cfg.max_tokens_per_microbatch or (rows // (M * K)) * width
        if packing.capacity(width, budget, dp) < dp:
            raise ValueError(f"step.max_tokens_per_microbatch={budget} is smaller than {dp} row(s) of this "
                             f"batch's full width {width} (prompt bucket + max_new_tokens) x the data-parallel "
                             f"size {dp}; raise it to at least {width * dp}.")
        batch = jax.device_put(batch, batch_shardings(mesh))
        pre = progs.prelim(state.step, state.key, batch, entropy_first)
        host = jax.device_get({k: pre[k] for k in ("widths", "counts", "first", "adv", "prompts_shared")})
        start = int(host["first"])
        # the shared prompt: every column before the first scored position's input (start - 1)
        lo = start - 1 if progs.can_share and width <= attention.LONG_FROM and bool(host["prompts_shared"]) \
            and 2 <= start < width else 0
        counts = host["counts"]
        need = counts > 0
        if cfg.skips_zero_advantage and not entropy_first:
            need &= host["adv"].reshape(rows) != 0
        minibatch = np.arange(rows) // (rows // M)
        lad = packing.ladder(min(start, width), width, cfg.length_buckets)
        plan = packing.plan(host["widths"].astype(np.int64), need, minibatch, M, lad, budget, dp)
        order, offsets, slots = _order(plan, dp)
        groups = _groups_per_minibatch(rows, M, n) if lo else 0
        prow, prep = _prompt_slots(plan, offsets, slots, dp, n, groups)
        packed = progs.layout(batch, pre["adv"], *(parallel.put_global(a, progs.rep) for a in (order, prow, prep)))
        shared = lambda micro: min(len(micro.rows) // dp, groups)  # noqa: E731  prompt slots per shard
        if cfg.old_logprobs == "recompute" or progs.use_ref:
            for micros, offs in zip(plan, offsets):
                for micro, c in zip(micros, offs):
                    packed = progs.old(state.params, reference_policy(state) if progs.use_ref else None, packed,
                                       np.int32(c), per=len(micro.rows) // dp, width=micro.width, start=start,
                                       lo=lo, prompts=shared(micro))
        adv = pre["adv"]
        if entropy_first:
            adv = progs.late_advantages(state.step, state.key, batch.rewards, batch.valid, packed)
            packed = progs.set_adv(packed, adv)
        params, opt_state = state.params, state.opt_state
        mb_loss, mb_sums = [], []
        for m, (micros, offs) in enumerate(zip(plan, offsets)):
            acc, sums = progs.zeros(params)
            for micro, c in zip(micros, offs):
                acc, sums = progs.grad(params, acc, sums, packed, np.int32(c), pre["denoms"][m],
                                       per=len(micro.rows) // dp, width=micro.width, start=start, lo=lo,
                                       prompts=shared(micro))
            params, opt_state, sums = progs.apply(params, opt_state, acc, sums, pre["denoms"][m])
            mb_loss.append(sums.pop("loss"))
            mb_sums.append(sums)
        computed = {"rows": float(need.sum()), "tokens": float(counts[need].sum()),
                    "all_tokens": float(counts.sum()),
                    "positions": float(sum(len(x.rows) * (x.width - lo) + dp * shared(x) * lo
                                           for micros in plan for x in micros)),
                    "microbatches": float(sum(len(micros) for micros in plan))}
        computed["tokens_mb0"] = float(counts[need & (minibatch == 0)].sum())
        computed = {k: np.float32(v) for k, v in computed.items()}
        metrics = progs.finish(state.step, pre, adv, batch, packed, jnp.stack(mb_loss),
                               jax.tree.map(lambda *x: jnp.stack(x), *mb_sums), computed)
        return TrainState(state.step + 1, params, opt_state, state.key, state.ref_params), metrics

    train_step.programs = progs  # for tests and benchmarks: the compiled programs and their caches
    return init_state, train_step


def _groups_per_minibatch(rows: int, num_minibatches: int, n: int) -> int:
    """The most groups (prompts, rows p * n .. p * n + n - 1) whose rows one mini-batch holds: the prompt slots a
    micro-batch shard needs at most (a static number, so sharing adds no compiled shape)."""
    per = rows // num_minibatches
    return max((m * per + per - 1) // n - (m * per) // n + 1 for m in range(num_minibatches))


def _prompt_slots(plan: list[list[packing.Micro]], offsets: list[list[int]], q: int, dp: int, n: int,
                  groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For the laid-out [dp, Q] slots: ``prow``, the prompt slot each row reads within its micro-batch shard,
    and ``prep``, whose first min(per, groups) columns of each micro-batch shard name the local row whose
    prompt fills each prompt slot (its group's first row there; unused slots repeat slot 0). Zeros when
    ``groups`` is 0 (no sharing)."""
    prow, prep = np.zeros((dp, q), np.int32), np.zeros((dp, q), np.int32)
    if not groups:
        return prow.reshape(-1), prep.reshape(-1)
    for micros, offs in zip(plan, offsets):
        for micro, c in zip(micros, offs):
            per = len(micro.rows) // dp
            for d, local in enumerate(micro.rows.reshape(dp, per)):
                slot: dict[int, int] = {}  # group -> its prompt slot, in order of first appearance
                reps: list[int] = []
                for i, r in enumerate(local):
                    if r >= 0:
                        g = int(r) // n
                        if g not in slot:
                            slot[g] = len(reps)
                            reps.append(i)
                        prow[d, c + i] = slot[g]
                slots = min(per, groups)
                if len(reps) > slots:
                    raise AssertionError(f"{len(reps)} prompts in a micro-batch shard of {slots} prompt slots")
                prep[d, c:c + slots] = (reps + [reps[0] if reps else 0] * slots)[:slots]
    return prow.reshape(-1), prep.reshape(-1)


def _order(plan: list[list[packing.Micro]], dp: int) -> tuple[np.ndarray, list[list[int]], int]:
    """The row index of every slot of the laid-out arrays (shard-major [dp, Q], -1 = empty), each micro-batch's
    first column on every shard, and Q (a power of two, so the laid-out shapes are few)."""
    offsets, cols = [], 0
    for micros in plan:
        offsets.append([])
        for micro in micros:
            offsets[-1].append(cols)
            cols += len(micro.rows) // dp
    q = 1
    while q < max(cols, 1):
        q *= 2
    order = np.full((dp, q), -1, np.int64)
    for micros, offs in zip(plan, offsets):
        for micro, c in zip(micros, offs):
            per = len(micro.rows) // dp
            order[:, c:c + per] = micro.rows.reshape(dp, per)
    return order.reshape(-1).astype(np.int32), offsets, q


class _Programs:
    """The jitted programs of one (model, config, mesh); each compiles once per input shape."""

    def __init__(self, graphdef: Any, cfg: StepConfig, mesh: Mesh, params: Any):
        self.graphdef, self.cfg, self.mesh = graphdef, cfg, mesh
        self.dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.use_ref = cfg.kl_coef != 0.0
        self.tx = make_optimizer(cfg)
        self.rep = NamedSharding(mesh, PartitionSpec())
        self.rows_sh = parallel.logical_sharding(mesh, BATCH)
        row_spec = parallel.logical_spec(BATCH, mesh)
        self.row_axes = row_spec[0] if len(row_spec) else None
        self.p_sh = parallel.param_shardings(params, mesh)
        self.t_sh = lora.trainable(self.p_sh)  # gradients and accumulators: the trainable part only
        self.opt_sh = parallel.param_shardings(jax.eval_shape(self.tx.init, lora.trainable(params)), mesh)
        self.grad_fn = functools.lru_cache(maxsize=None)(lambda start: make_grad_fn(graphdef, cfg, start))
        self.can_share = cfg.share_prompts and isinstance(nnx.merge(graphdef, lora.frozen_policy(params)),
                                                          Transformer)
        rep, rows = self.rep, self.rows_sh
        self.prelim = jax.jit(self._prelim, static_argnums=(3,), out_shardings=rep)
        self.layout = jax.jit(self._layout, out_shardings=rows)
        static = ("per", "width", "start", "lo", "prompts")
        self.old = jax.jit(self._old, static_argnames=static, donate_argnums=(2,), out_shardings=rows)
        self.late_advantages = jax.jit(self._late_advantages, out_shardings=rep)
        self.set_adv = jax.jit(self._set_adv, donate_argnums=(0,), out_shardings=rows)
        self.zeros = jax.jit(self._zeros, out_shardings=(self.t_sh, rep))
        self.grad = jax.jit(self._grad, static_argnames=static, donate_argnums=(1, 2),
                            out_shardings=(self.t_sh, rep))
        self.apply = jax.jit(self._apply, donate_argnums=(0, 1), out_shardings=(self.p_sh, self.opt_sh, rep))
        self.finish = jax.jit(self._finish, out_shardings=rep)

    # ------------------------------------------------------------------ helpers
    def _local(self, x: jax.Array, c: jax.Array, per: int, width: int) -> jax.Array:
        """Rows [c, c + per) of every shard of a laid-out [dp Q, ...] array, trimmed to ``width`` columns."""
        dp = self.dp
        spec = (None,) * (x.ndim - 1)
        y = jax.lax.with_sharding_constraint(x.reshape((dp, x.shape[0] // dp) + x.shape[1:]),
                                             NamedSharding(self.mesh, PartitionSpec(self.row_axes, None, *spec)))
        y = jax.lax.dynamic_slice_in_dim(y, c, per, axis=1)
        if x.ndim == 2:
            y = y[:, :, :width]
        return jax.lax.with_sharding_constraint(y.reshape((dp * per,) + y.shape[2:]),
                                                NamedSharding(self.mesh, PartitionSpec(self.row_axes, *spec)))

    def _put_local(self, x: jax.Array, value: jax.Array, c: jax.Array, per: int, lo: int = 0) -> jax.Array:
        """``x`` [dp Q, S] with rows [c, c + per) of every shard's columns from ``lo`` set to ``value``
        [dp per, W] (the columns before ``lo`` to 0)."""
        dp, S = self.dp, x.shape[1]
        y = x.reshape(dp, x.shape[0] // dp, S)
        v = jnp.pad(value.reshape(dp, per, value.shape[1]), ((0, 0), (0, 0), (lo, S - lo - value.shape[1])))
        y = jax.lax.dynamic_update_slice(y, v.astype(x.dtype), (0, c, 0))
        return y.reshape(x.shape)

    def _advantages(self, step, key, rewards, valid, entropy):
        cfg = self.cfg
        adv = advantages.compute(cfg.estimator, rewards, valid, k=cfg.k, key=jax.random.fold_in(key, step),
                                 entropy=entropy, **cfg.estimator_options)
        return jnp.where(valid, adv, 0.0).astype(jnp.float32)

    # ------------------------------------------------------------------ programs
    def _prelim(self, step, key, batch: Batch, entropy_first: bool) -> dict:
        cfg = self.cfg
        num_prompts, n = batch.rewards.shape
        rows, S = batch.tokens.shape
        mask = batch.loss_mask & batch.token_mask & batch.valid.reshape(rows)[:, None]
        m = mask.astype(jnp.float32)
        cols = jnp.arange(S, dtype=jnp.int32)
        counts = jnp.sum(m, -1)
        tok_per_row = counts.reshape(num_prompts, n)
        first = jnp.min(jnp.where(mask, cols, S))
        group_first = (jnp.arange(rows) // n) * n  # every row's prompt columns must equal its group's first row's
        prompt = cols[None, :] < first - 1
        same = lambda x: jnp.all(jnp.where(prompt, x == x[group_first], True))  # noqa: E731
        out = {"counts": counts, "tok_per_row": tok_per_row,
               "widths": jnp.max(jnp.where(batch.token_mask, cols + 1, 0), -1), "first": first,
               "prompts_shared": same(batch.tokens) & same(batch.positions) & same(batch.token_mask),
               "denoms": jax.vmap(lambda x: losses.loss_denominator(x, cfg.aggregation, cfg.norm_length))(
                   mask.reshape(cfg.num_minibatches, rows // cfg.num_minibatches, S))}
        # S, not the trimmed width, is the padded width of Dr.GRPO's default norm_length: loss_denominator above
        if cfg.old_logprobs == "sampler":  # -log pi of the sampled tokens estimates the entropy, every row
            ent = jnp.sum((-jnp.where(mask, batch.sampler_logprobs, 0.0)).sum(-1).reshape(num_prompts, n), -1)
            out["prompt_entropy"] = ent / jnp.maximum(jnp.sum(tok_per_row, -1), 1.0)
            out["entropy_sum"] = jnp.sum(ent)
        out["adv"] = (jnp.zeros((num_prompts, n), jnp.float32) if entropy_first else
                      self._advantages(step, key, batch.rewards, batch.valid, out.get("prompt_entropy")))
        return out

    def _layout(self, batch: Batch, adv: jax.Array, order: jax.Array, prow: jax.Array, prep: jax.Array) -> dict:
        cfg = self.cfg
        rows = batch.tokens.shape[0]
        real = order >= 0
        idx = jnp.maximum(order, 0)  # an empty slot repeats row 0's tokens (finite activations) with no loss
        mask = (batch.loss_mask & batch.token_mask & batch.valid.reshape(rows)[:, None])[idx] & real[:, None]
        out = {"tokens": batch.tokens[idx], "positions": batch.positions[idx], "token_mask": batch.token_mask[idx],
               "mask": mask, "sampler_logp": jnp.where(mask, batch.sampler_logprobs[idx], 0.0),
               "adv": jnp.where(real, adv.reshape(rows)[idx], 0.0), "row": order, "prow": prow, "prep": prep}
        zeros = jnp.zeros(out["tokens"].shape, jnp.float32)
        if cfg.old_logprobs == "recompute":
            out["old_logp"], out["ent"] = zeros, zeros
        if self.use_ref:
            out["ref_logp"] = zeros
        return out

    def _rows(self, packed, keys, c, per, width, lo, prompts) -> dict:
        """A micro-batch's arrays ``keys`` [dp per, width - lo] (its columns from ``lo``) and, when ``lo`` > 0,
        its shared prompts (``policy_logprobs``' ``prefix``: ``prompts`` per shard, columns [0, lo))."""
        x = {k: self._local(packed[k], c, per, width) for k in keys}
        if not lo:
            return x
        dp = self.dp
        prep = self._local(packed["prep"], c, prompts, width).reshape(dp, prompts)
        prefix = {k: gather_prefix_rows(x[k][:, :lo], prep) for k in ("tokens", "positions", "token_mask")}
        prefix["rows"] = self._local(packed["prow"], c, per, width).reshape(dp, per)
        x = {k: (v[:, lo:] if v.ndim == 2 else v) for k, v in x.items()}
        x["prefix"] = prefix
        return x

    def _old(self, params, ref_params, packed, c, *, per, width, start, lo, prompts):
        cfg = self.cfg
        x = self._rows(packed, ("tokens", "positions", "token_mask"), c, per, width, lo, prompts)
        models = {}
        if cfg.old_logprobs == "recompute":
            models["old_logp"] = jax.lax.stop_gradient(params)
        if self.use_ref:
            models["ref_logp"] = ref_params
        packed = dict(packed)
        for name, p in models.items():
            lp, ent = policy_logprobs(self.graphdef, p, x["tokens"], x["positions"], x["token_mask"],
                                      cfg.temperature, cfg.logprob_chunk, start - lo, x.get("prefix"))
            packed[name] = self._put_local(packed[name], lp, c, per, lo)
            if name == "old_logp":
                packed["ent"] = self._put_local(packed["ent"], ent, c, per, lo)
        return packed

    @staticmethod
    def _prompt_entropy_sums(packed, num_prompts: int, n: int) -> tuple[jax.Array, jax.Array]:
        """Per prompt, the old policy's entropy summed over the computed trained tokens, and their count."""
        m = packed["mask"].astype(jnp.float32)
        row = jnp.where(packed["row"] >= 0, packed["row"], num_prompts * n)
        per_row = lambda x: jnp.zeros(num_prompts * n).at[row].add(jnp.sum(x, -1), mode="drop")  # noqa: E731
        return (jnp.sum(per_row(packed["ent"] * m).reshape(num_prompts, n), -1),
                jnp.sum(per_row(m).reshape(num_prompts, n), -1))

    def _late_advantages(self, step, key, rewards, valid, packed):
        ent, tok = self._prompt_entropy_sums(packed, *rewards.shape)
        return self._advantages(step, key, rewards, valid, ent / jnp.maximum(tok, 1.0))

    def _set_adv(self, packed, adv):
        real = packed["row"] >= 0
        return {**packed, "adv": jnp.where(real, adv.reshape(-1)[jnp.maximum(packed["row"], 0)], 0.0)}

    def _zeros(self, params):
        sums = {name: jnp.zeros((), jnp.float32) for name in
                ("loss", "pg", "kl", "entropy", "approx_kl", "clip_low", "clip_high", "clip_dual", "lp_diff_sum",
                 "lp_diff_max")}
        return jax.tree.map(jnp.zeros_like, lora.trainable(params)), sums

    def _grad(self, params, acc, sums, packed, c, denom, *, per, width, start, lo, prompts):
        keys = ROW_KEYS + (("old_logp",) if self.cfg.old_logprobs == "recompute" else ()) + (
            ("ref_logp",) if self.use_ref else ()) + ("adv",)
        micro = self._rows(packed, keys, c, per, width, lo, prompts)
        if self.cfg.old_logprobs != "recompute":
            micro["old_logp"] = micro["sampler_logp"]
        (loss, s), g = self.grad_fn(start - lo)(lora.trainable(params), params, micro, jnp.maximum(denom, 1e-30))
        s["loss"] = loss
        g = jax.lax.with_sharding_constraint(g, self.t_sh)
        out = {k: (jnp.maximum(v, s[k]) if k == "lp_diff_max" else v + s[k]) for k, v in sums.items()}
        return jax.tree.map(jnp.add, acc, g), out

    def _apply(self, params, opt_state, grads, sums, denom):
        own = lora.trainable(params)
        updates, new_opt = self.tx.update(grads, opt_state, own)
        new_own = optax.apply_updates(own, updates)
        keep = denom > 0  # a mini-batch without tokens must not move the parameters
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(keep, x, y), a, b)  # noqa: E731
        return (lora.with_trainable(params, pick(new_own, own)), pick(new_opt, opt_state),
                {**sums, "grad_norm": optax.global_norm(grads)})

    def _finish(self, step, pre, adv, batch, packed, mb_loss, mb_sums, computed):
        cfg = self.cfg
        num_prompts, n = batch.rewards.shape
        m = packed["mask"].astype(jnp.float32)
        c_tokens = jnp.maximum(jnp.sum(m), 1.0)
        if cfg.old_logprobs == "recompute":  # entropy and sampler difference over the computed rows
            ent_p, tok_p = self._prompt_entropy_sums(packed, num_prompts, n)
            prompt_entropy = jnp.where(tok_p > 0, ent_p / jnp.maximum(tok_p, 1.0), jnp.nan)
            diff = jnp.abs(packed["old_logp"] - packed["sampler_logp"]) * m
            lp_diff = (jnp.sum(diff) / c_tokens, jnp.max(diff))
        else:  # the first mini-batch's computed rows, before its update
            prompt_entropy = pre["prompt_entropy"]
            lp_diff = (mb_sums["lp_diff_sum"][0] / jnp.maximum(computed["tokens_mb0"], 1.0),
                       mb_sums["lp_diff_max"][0])
        out = step_metrics(cfg, mb_loss, dict(mb_sums, denom=pre["denoms"]),
                           jnp.maximum(jnp.sum(pre["counts"]), 1.0), c_tokens, lp_diff, adv, batch,
                           pre["tok_per_row"], prompt_entropy)
        out["lr"] = learning_rate_schedule(cfg)(step * cfg.num_minibatches + cfg.num_minibatches - 1)
        out["rows_computed_frac"] = computed["rows"] / (num_prompts * n)
        out["tokens_computed_frac"] = computed["tokens"] / jnp.maximum(computed["all_tokens"], 1.0)
        out["positions_frac"] = computed["positions"] / (batch.tokens.shape[0] * batch.tokens.shape[1])
        out["microbatches"] = computed["microbatches"]
        return out
