"""The jitted, sharded policy-gradient step: one compiled program per batch shape.

``train_step(state, batch) -> (state, metrics)`` runs, inside one XLA program (see ``docs/architecture.md``,
"Data flow of one RL step"):

1. old-policy log-probabilities and per-prompt mean token entropy: a forward of the current parameters under
   ``stop_gradient``, one micro-batch of logits at a time (``old_logprobs="recompute"``), or the batch's
   sampler log-probabilities, whose negative mean is then the entropy estimate (``"sampler"``);
2. advantages ``advantages.compute(estimator, rewards [P, n], valid, k=..., key=..., entropy=...)`` (paper
   Alg. 1-3, Eq. 11-18; ``docs/paper.md`` sections 3-7), broadcast to the completion tokens of each row under
   ``stop_gradient``;
3. a ``lax.scan`` over mini-batches (contiguous blocks of prompts with all their n rows; the paper's 128
   prompts = 4 x 32), each an AdamW update from gradients accumulated over micro-batches by an inner
   ``lax.scan``. Every micro-batch loss is ``sum / D`` with ``D`` the denominator of the *whole mini-batch*
   (``losses.loss_denominator``), so accumulation is exact for every partition and device count.

Rows are prompt-major (row = p * n + j) and sharded over ('data', 'fsdp'); parameters follow the logical
rules of ``passk_jax.parallel``. The optimiser schedule counts optimiser updates (num_minibatches per step).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from passk_jax import advantages, parallel
from passk_jax.optim import OptimConfig, learning_rate_schedule, make_optimizer
from passk_jax.metrics import PASS_THRESHOLD, is_pass, pass_at_k, pass_hat_k
from passk_jax.models import lora
from passk_jax.models.transformer import forward, head_weight
from passk_jax.rl import losses
from passk_jax.rl.batch import BATCH, Batch, batch_shardings

PACKINGS: tuple[str, ...] = ("lengths", "off")


@dataclasses.dataclass(frozen=True)
class StepConfig(OptimConfig):
    """Everything the step needs besides the model; ``validate()`` checks it before anything compiles. The
    optimiser fields (learning_rate, warmup_steps, lr_schedule, ..., grad_clip_norm; paper: lr 1e-6, 10
    warm-up steps) come from ``passk_jax.optim.OptimConfig``."""

    # advantages (passk_jax.advantages registry)
    estimator: str = "grpo"
    k: int = 1
    k_schedule: tuple[tuple[int, int], ...] = ()  # k-annealing (PKPO): (RL step of the stage, k) knots, k
    #                                               linear in between (rounded half up), the first knot's
    #                                               (step 0, k) equal to k, the last k after it; () = k throughout
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # surrogate (paper: DAPO clip-higher, token-level loss, no KL, no entropy bonus)
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    log_ratio_clip: float | None = 20.0
    ratio_level: str = "token"  # "token" | "sequence" (GSPO)
    aggregation: str = "token_mean"
    norm_length: int | None = None  # Dr.GRPO constant length; None = padded width S
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the trained policy is softmax(logits / temperature)
    logprob_chunk: int = 0  # positions per LM-head chunk (0 = all at once; see losses.chunked_...)
    old_logprobs: str = "recompute"  # "recompute" | "sampler"
    # batch split (paper: 4 mini-batches of 32 prompts)
    num_minibatches: int = 1
    num_microbatches: int = 1
    success_threshold: float = PASS_THRESHOLD  # metrics.is_pass: reward >= threshold passes (rollout pass@k)
    # which rows and positions the update computes (passk_jax.rl.packed_step)
    packing: str = "lengths"  # "lengths": only rows that can move the parameters, trimmed to length buckets;
    #                           "off": every row at the full padded width, in one compiled program
    max_tokens_per_microbatch: int = 0  # rows x width of a packed micro-batch; 0 = the padded micro-batch's
    length_buckets: int = 4  # widths a packed micro-batch may take (prompt + j/length_buckets of the completion)
    share_prompts: bool = True  # packed: a group's prompt runs once per micro-batch and data shard, its rows
    #                             attend to its keys/values (transformer models, rows of <= attention.LONG_FROM)

    def __post_init__(self):  # JSON and ConfigDict give lists: knots are compared and hashed as tuples
        try:
            object.__setattr__(self, "k_schedule", tuple(tuple(knot) for knot in self.k_schedule))
        except TypeError:
            pass  # validate() names the problem

    def k_at(self, step: int) -> int:
        """k at RL step ``step`` of the stage (0-based): ``k`` without a schedule, else the schedule's
        piecewise-linear value, rounded half up, constant after the last knot."""
        if not self.k_schedule:
            return self.k
        for (s0, k0), (s1, k1) in zip(self.k_schedule, self.k_schedule[1:]):
            if step < s1:
                return int(math.floor(k0 + (k1 - k0) * (max(step, s0) - s0) / (s1 - s0) + 0.5))
        return self.k_schedule[-1][1]

    def at(self, step: int) -> StepConfig:
        """The configuration of RL step ``step`` of the stage: ``k = k_at(step)`` and no schedule (itself
        when there is none), what the compiled step of that step is built from."""
        return self if not self.k_schedule else dataclasses.replace(self, k=self.k_at(step), k_schedule=())

    @property
    def ks(self) -> tuple[int, ...]:
        """Every k the step may use (the knots' values bound the interpolated ones)."""
        return tuple(sorted({self.k, *(k for _, k in self.k_schedule)}))

    @property
    def skips_zero_advantage(self) -> bool:
        """Whether a row with advantage 0 leaves the loss and its gradient unchanged: its only per-token term
        is then the clipped surrogate, -A r or -A clip(r), which is 0 with a zero gradient for every finite
        ratio (the log-ratio is clamped at ``log_ratio_clip``); a KL or entropy term would still count."""
        return self.kl_coef == 0.0 and self.entropy_coef == 0.0 and self.log_ratio_clip is not None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown step config field(s) {unknown}; known fields are {sorted(names)}.")
        return cls(**dict(d))

    def validate(self) -> None:
        """Eager checks of every field that does not depend on the batch shape."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(self.estimator in advantages.names(),
             f"estimator {self.estimator!r} is not registered; choose one of {advantages.names()}.")
        knots = self.k_schedule
        need(all(isinstance(kn, tuple) and len(kn) == 2 and all(advantages.is_integer(x) for x in kn) for kn in knots),
             f"k_schedule must be a sequence of (step, k) integer pairs, got {knots!r}.")
        need(not knots or tuple(knots[0]) == (0, self.k),
             f"k_schedule must start at (0, k) with k={self.k} (step.k), but its first knot is {knots[0] if knots else ()}; "
             "set both.")
        need(all(a[0] < b[0] for a, b in zip(knots, knots[1:])),
             f"k_schedule steps must increase strictly, got {[kn[0] for kn in knots]}.")
        need(all(kn[1] >= 1 for kn in knots), f"k_schedule values of k must be >= 1, got {[kn[1] for kn in knots]}.")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "eps_low must be in [0, 1) and eps_high >= 0.")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip must be None or > 1.")
        need(self.ratio_level in losses.RATIO_LEVELS, f"ratio_level must be one of {losses.RATIO_LEVELS}.")
        need(self.aggregation in losses.AGGREGATIONS, f"aggregation must be one of {losses.AGGREGATIONS}.")
        need(self.kl_estimator in losses.KL_ESTIMATORS, f"kl_estimator must be one of {losses.KL_ESTIMATORS}.")
        need(self.temperature > 0, "temperature must be > 0.")
        need(self.logprob_chunk >= 0, f"logprob_chunk must be >= 0 (0 = no chunking), got {self.logprob_chunk}.")
        need(self.old_logprobs in ("recompute", "sampler"), "old_logprobs must be 'recompute' or 'sampler'.")
        need(self.packing in PACKINGS, f"packing must be one of {PACKINGS}, got {self.packing!r}.")
        need(self.max_tokens_per_microbatch >= 0,
             f"max_tokens_per_microbatch must be >= 0 (0 = the padded micro-batch's size), got "
             f"{self.max_tokens_per_microbatch}.")
        need(self.length_buckets >= 1, f"length_buckets must be >= 1, got {self.length_buckets}.")
        need(self.num_minibatches >= 1 and self.num_microbatches >= 1,
             "num_minibatches and num_microbatches must be >= 1.")
        need(self.learning_rate >= 0 and self.warmup_steps >= 0, "learning_rate and warmup_steps must be >= 0.")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'.")
        need(self.lr_schedule != "cosine" or (self.total_updates or 0) > self.warmup_steps,
             "lr_schedule='cosine' needs total_updates > warmup_steps.")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm must be None or > 0.")


class TrainState(NamedTuple):
    step: jax.Array        # i32[] train steps taken
    params: Any            # the model's parameters, or a lora.LoraParams (frozen base + the adapters)
    opt_state: Any         # of the trainable part only (lora.trainable(params))
    key: jax.Array         # u32[2] base key; step t uses fold_in(key, t) (bootstrap advantages)
    ref_params: Any = None  # frozen reference policy, only when kl_coef != 0 (LoRA: None, the base is it)


def validate_batch(cfg: StepConfig, num_prompts: int, n: int, rows: int, mesh: Mesh | None = None) -> None:
    """Batch arithmetic, checked before compiling; each error is one sentence naming the fields."""
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if rows != num_prompts * n:
        raise ValueError(f"batch.tokens has {rows} rows but rewards [P={num_prompts}, n={n}] needs P*n = "
                         f"{num_prompts * n}.")
    if num_prompts % cfg.num_minibatches:
        raise ValueError(f"num_prompts P={num_prompts} is not divisible by num_minibatches="
                         f"{cfg.num_minibatches}.")
    mb_rows = rows // cfg.num_minibatches
    if mb_rows % cfg.num_microbatches:
        raise ValueError(f"mini-batch rows ({mb_rows} = P*n/num_minibatches) are not divisible by "
                         f"num_microbatches={cfg.num_microbatches}.")
    micro_rows = mb_rows // cfg.num_microbatches
    if micro_rows % dp:
        raise ValueError(f"micro-batch rows ({micro_rows} = P*n/num_minibatches/num_microbatches) are not "
                         f"divisible by the data-parallel size data*fsdp={dp}.")
    for k in cfg.ks:
        advantages.validate(cfg.estimator, n, k, **cfg.estimator_options)


def policy_logprobs(graphdef: Any, params: Any, tokens: jax.Array, positions: jax.Array,
                    token_mask: jax.Array, temperature: float = 1.0, chunk: int = 0,
                    start: int = 0, prefix: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """Forward + next-token log-probs and entropies aligned with ``tokens`` (f32[B, S] each); ``chunk`` > 0
    applies the LM head ``chunk`` positions at a time (no [B, S, V] logits in the forward or backward).

    ``start`` > 0: only tokens at positions >= ``start`` are scored (the LM head runs on the hidden states of
    positions ``start - 1 .. S - 2`` only, never on the prompt); the earlier positions get 0.

    ``prefix`` (a transformer): the rows continue shared prompts, run once: ``tokens`` / ``positions`` /
    ``token_mask`` i32[P, W] and ``rows`` (row b continues prompt ``rows[b]``, i32[B] or per shard i32[G, B/G],
    see ``transformer.gather_prefix_rows``); the scores equal those of the concatenated rows."""
    if prefix is not None:
        _, pre = forward(graphdef, params, prefix["tokens"], prefix["positions"], prefix["token_mask"],
                         head=False, kv_out=True)
        hidden, _ = forward(graphdef, params, tokens, positions, token_mask, prefix=pre,
                            prefix_rows=prefix["rows"], head=False)
        return _head_scores(graphdef, params, hidden, tokens, start, temperature, chunk)
    if start > 1:
        if not hasattr(nnx.merge(graphdef, lora.frozen_policy(params)), "head_weight"):  # no head=False: slice
            logits, _ = forward(graphdef, params, tokens, positions, token_mask)
            lp, ent = losses.shifted_logprobs_and_entropy(logits[:, start - 1:], tokens[:, start - 1:], temperature)
            pad = jnp.zeros((tokens.shape[0], start - 1), jnp.float32)
            return jnp.concatenate([pad, lp], axis=1), jnp.concatenate([pad, ent], axis=1)
        hidden, _ = forward(graphdef, params, tokens, positions, token_mask, head=False)
        return _head_scores(graphdef, params, hidden, tokens, start, temperature, chunk)
    if chunk:
        hidden, _ = forward(graphdef, params, tokens, positions, token_mask, head=False)
        return losses.chunked_shifted_logprobs_and_entropy(hidden, head_weight(graphdef, params), tokens,
                                                           temperature, chunk)
    logits, _ = forward(graphdef, params, tokens, positions, token_mask)
    return losses.shifted_logprobs_and_entropy(logits, tokens, temperature)


def _head_scores(graphdef: Any, params: Any, hidden: jax.Array, tokens: jax.Array, start: int, temperature: float,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """``policy_logprobs``' scores from the final hidden states: the LM head on positions ``start - 1`` on
    (``chunk`` at a time when > 0), 0 before them."""
    s0 = max(start - 1, 0)
    head, h, t = head_weight(graphdef, params), hidden[:, s0:], tokens[:, s0:]
    if chunk:
        lp, ent = losses.chunked_shifted_logprobs_and_entropy(h, head, t, temperature, chunk)
    else:
        z = jnp.einsum("bsd,dv->bsv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        lp, ent = losses.shifted_logprobs_and_entropy(z, t, temperature)
    pad = jnp.zeros((tokens.shape[0], s0), jnp.float32)
    return jnp.concatenate([pad, lp], axis=1), jnp.concatenate([pad, ent], axis=1)


def make_micro_loss(graphdef: Any, cfg: StepConfig, start: int = 0) -> Callable[..., tuple[jax.Array, dict]]:
    """``micro_loss(params, micro, denom) -> (loss, sums)``: one micro-batch's share ``sum / denom`` of its
    mini-batch's loss, and token sums of the diagnostics; ``micro`` holds tokens, positions, token_mask, mask,
    old_logp, adv (per row), sampler_logp and, with KL, ref_logp, all [rows, S] but adv, and optionally the
    shared ``prefix`` of ``policy_logprobs``. ``start``: see ``policy_logprobs`` (no loss position may lie
    before it)."""
    def micro_loss(params, micro, denom):
        lp, ent = policy_logprobs(graphdef, params, micro["tokens"], micro["positions"], micro["token_mask"],
                                  cfg.temperature, cfg.logprob_chunk, start, micro.get("prefix"))
        mask = micro["mask"]
        total, stats = losses.per_token_objective(
            lp, micro["old_logp"], micro["adv"][:, None], mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            dual_clip=cfg.dual_clip, log_ratio_clip=cfg.log_ratio_clip, ratio_level=cfg.ratio_level,
            entropy=ent, entropy_coef=cfg.entropy_coef, ref_logp=micro.get("ref_logp"),
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
        loss = losses.aggregate_sum(total, mask, cfg.aggregation) / denom
        m = mask.astype(jnp.float32)
        sums = {name: jnp.sum(v * m) for name, v in stats.items()}
        sums["pg"] = losses.aggregate_sum(stats["pg"], mask, cfg.aggregation)
        sums["kl"] = losses.aggregate_sum(stats["kl"], mask, cfg.aggregation)
        diff = jnp.abs(jax.lax.stop_gradient(lp) - micro["sampler_logp"]) * m
        sums["lp_diff_sum"], sums["lp_diff_max"] = jnp.sum(diff), jnp.max(diff)
        return loss, sums

    return micro_loss


def make_grad_fn(graphdef: Any, cfg: StepConfig, start: int = 0) -> Callable[..., Any]:
    """``grad_fn(trainable, params, micro, denom) -> ((loss, sums), grads)``: ``make_micro_loss`` differentiated
    with respect to ``trainable`` only (the adapters under LoRA, whose base then gets no weight gradient;
    the parameters otherwise), ``params`` supplying the rest."""
    micro_loss = make_micro_loss(graphdef, cfg, start)
    return jax.value_and_grad(lambda t, params, micro, denom: micro_loss(lora.with_trainable(params, t), micro,
                                                                         denom), has_aux=True)


def make_loss_and_grads(graphdef: Any, cfg: StepConfig) -> Callable[..., tuple[jax.Array, Any, dict]]:
    """``loss_and_grads(params, mb) -> (loss, grads, sums)`` for one mini-batch ``mb`` split as [K, rows, S].

    ``mb`` is a dict with tokens, positions, token_mask, mask, old_logp, adv (per row), sampler_logp and,
    with KL, ref_logp. Gradients are accumulated over the K micro-batches (``lax.scan``), each micro-batch
    loss divided by the whole mini-batch's denominator. ``sums`` are token sums of the diagnostics.
    """
    grad_fn = make_grad_fn(graphdef, cfg)

    def loss_and_grads(params, mb):
        flat_mask = mb["mask"].reshape(-1, mb["mask"].shape[-1])
        denom = losses.loss_denominator(flat_mask, cfg.aggregation, cfg.norm_length)
        safe = jnp.maximum(denom, 1e-30)

        def body(acc, micro):
            (loss, sums), g = grad_fn(lora.trainable(params), params, micro, safe)
            return jax.tree.map(jnp.add, acc, g), (loss, sums)

        zeros = jax.tree.map(jnp.zeros_like, lora.trainable(params))
        grads, (loss, sums) = jax.lax.scan(body, zeros, mb)
        sums = {k: (jnp.max(v) if k == "lp_diff_max" else jnp.sum(v)) for k, v in sums.items()}
        sums["denom"] = denom
        return jnp.sum(loss), grads, sums

    return loss_and_grads


def state_shardings(cfg: StepConfig, mesh: Mesh, params: Any) -> TrainState:
    """The shardings of the ``TrainState`` that ``make_train_step``'s ``init_state`` makes for ``params``."""
    p_sh = parallel.param_shardings(params, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    opt = parallel.param_shardings(jax.eval_shape(make_optimizer(cfg).init, lora.trainable(params)), mesh)
    return TrainState(rep, p_sh, opt, rep, p_sh if uses_ref_copy(cfg, params) else None)


def uses_ref_copy(cfg: StepConfig, params: Any) -> bool:
    """Whether the state keeps a frozen copy of the initial parameters as the KL reference (with LoRA the
    reference is the base model, the adapters switched off: no copy)."""
    return cfg.kl_coef != 0.0 and not lora.is_lora(params)


def reference_policy(state: TrainState) -> Any:
    return state.ref_params if state.ref_params is not None else lora.frozen_policy(state.params)


def abstract_state(cfg: StepConfig, mesh: Mesh, params: Any) -> TrainState:
    """That ``TrainState`` as ShapeDtypeStructs with its shardings, from concrete or abstract ``params``;
    nothing is allocated or compiled (a checkpoint's restore target, a memory plan's input)."""
    tx = make_optimizer(cfg)

    def build(p):
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(lora.trainable(p)), jax.random.PRNGKey(0),
                          p if uses_ref_copy(cfg, p) else None)

    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        jax.eval_shape(build, params), state_shardings(cfg, mesh, params))


def make_train_step(graphdef: Any, cfg: StepConfig, mesh: Mesh, params: Any
                    ) -> tuple[Callable[[Any, jax.Array | None], TrainState], Callable[[TrainState, Batch], Any]]:
    """Build ``(init_state, train_step)`` for a model and a mesh.

    ``params`` (concrete or abstract, e.g. ``nnx.eval_shape``) fixes the parameter structure and shardings.
    ``init_state(params, key=None) -> TrainState`` places a *copy* of the parameters (and, with KL, a frozen
    reference copy) on the mesh. ``train_step(state, batch) -> (state, metrics)`` is ``jax.jit`` with the
    state donated; metrics are replicated f32 scalars plus ``advantages`` f32[P, n] and ``prompt_entropy``
    f32[P] (the in-graph inputs of the estimator, for logging and analysis).
    """
    cfg.validate()
    tx = make_optimizer(cfg)
    use_ref = cfg.kl_coef != 0.0
    ref_copy = uses_ref_copy(cfg, params)
    state_sh = state_shardings(cfg, mesh, params)
    p_sh, rep = state_sh.params, state_sh.step
    row_spec = parallel.logical_spec(BATCH, mesh)
    row_axes = row_spec[0] if len(row_spec) else None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    M, K = cfg.num_minibatches, cfg.num_microbatches
    loss_and_grads = make_loss_and_grads(graphdef, cfg)

    def _init(params, key):
        own = jax.tree.map(jnp.copy, params)
        ref = jax.tree.map(jnp.copy, params) if ref_copy else None
        return TrainState(jnp.zeros((), jnp.int32), own, tx.init(lora.trainable(own)), key, ref)

    init_jit = jax.jit(_init, out_shardings=state_sh)

    def init_state(params: Any, key: jax.Array | None = None) -> TrainState:
        key = jax.random.PRNGKey(0) if key is None else key
        return init_jit(jax.device_put(params, p_sh), jax.device_put(key, rep))

    def split_rows(x: jax.Array) -> jax.Array:
        """[R, ...] rows over (data, fsdp) -> [M, K, R/(M K), ...], the last row axis sharded.

        Going through [M K, dp, rows/dp] makes the move one all-to-all (a plain reshape makes XLA replicate).
        """
        C, tail = M * K, x.shape[1:]
        rest = (None,) * len(tail)
        y = x.reshape((C, dp, x.shape[0] // (C * dp)) + tail)
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, row_axes, None, *rest)))
        y = y.reshape((M, K, x.shape[0] // C) + tail)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, None, row_axes, *rest)))

    def old_policy_pass(state: TrainState, data: dict) -> dict:
        """Log-probs (and entropies) of the old policy and the reference, one micro-batch of logits at a time."""
        models = {}
        if cfg.old_logprobs == "recompute":
            models["old"] = jax.lax.stop_gradient(state.params)
        if use_ref:
            models["ref"] = reference_policy(state)
        if not models:
            return {}

        def chunk(x):
            return {name: policy_logprobs(graphdef, p, x["tokens"], x["positions"], x["token_mask"],
                                          cfg.temperature, cfg.logprob_chunk) for name, p in models.items()}

        inputs = {name: data[name].reshape((M * K,) + data[name].shape[2:])
                  for name in ("tokens", "positions", "token_mask")}
        out = jax.lax.map(chunk, inputs)
        return jax.tree.map(lambda x: x.reshape((M, K) + x.shape[1:]), out)

    def minibatch_update(carry, mb):
        params, opt_state = carry
        loss, grads, sums = loss_and_grads(params, mb)
        grads = jax.lax.with_sharding_constraint(grads, lora.trainable(p_sh))
        own = lora.trainable(params)
        updates, new_opt = tx.update(grads, opt_state, own)
        new_own = optax.apply_updates(own, updates)
        keep = sums["denom"] > 0  # a mini-batch without tokens must not move the parameters
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(keep, x, y), a, b)  # noqa: E731
        sums["grad_norm"] = optax.global_norm(grads)
        return (lora.with_trainable(params, pick(new_own, own)), pick(new_opt, opt_state)), (loss, sums)

    def _step(state: TrainState, batch: Batch):
        num_prompts, n = batch.rewards.shape
        rows = batch.tokens.shape[0]
        validate_batch(cfg, num_prompts, n, rows, mesh)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            mask = batch.loss_mask & batch.token_mask & batch.valid.reshape(rows)[:, None]
            data = {"tokens": split_rows(batch.tokens), "positions": split_rows(batch.positions),
                    "token_mask": split_rows(batch.token_mask), "mask": split_rows(mask),
                    "sampler_logp": split_rows(jnp.where(mask, batch.sampler_logprobs, 0.0))}
            m = data["mask"].astype(jnp.float32)
            # 1. old-policy log-probs and per-token entropy
            pre = old_policy_pass(state, data)
            if "old" in pre:
                data["old_logp"], ent_tok = pre["old"][0], pre["old"][1] * m
                lp_diff = jnp.abs(data["old_logp"] - data["sampler_logp"]) * m
            else:  # sampler log-probs; -log pi of sampled tokens is an unbiased estimate of the entropy
                data["old_logp"], ent_tok, lp_diff = data["sampler_logp"], -data["sampler_logp"], None
            if use_ref:
                data["ref_logp"] = pre["ref"][0]
            # 2. advantages in-graph from the rewards, validity and per-prompt mean token entropy
            tok_per_row = jnp.sum(m, axis=-1).reshape(num_prompts, n)
            prompt_entropy = jnp.sum(jnp.sum(ent_tok, -1).reshape(num_prompts, n), -1) / jnp.maximum(
                jnp.sum(tok_per_row, -1), 1.0)
            key = jax.random.fold_in(state.key, state.step)
            adv = advantages.compute(cfg.estimator, batch.rewards, batch.valid, k=cfg.k, key=key,
                                     entropy=prompt_entropy, **cfg.estimator_options)
            adv = jax.lax.stop_gradient(jnp.where(batch.valid, adv, 0.0).astype(jnp.float32))
            data["adv"] = split_rows(adv.reshape(rows))
            # 3. mini-batch updates, each from gradients accumulated over micro-batches
            (params, opt_state), (mb_loss, mb_sums) = jax.lax.scan(
                minibatch_update, (state.params, state.opt_state), data)
            metrics = _metrics(cfg, mb_loss, mb_sums, m, adv, batch, tok_per_row, prompt_entropy, lp_diff)
            metrics["lr"] = learning_rate_schedule(cfg)(state.step * M + M - 1)  # of the step's last update
        return TrainState(state.step + 1, params, opt_state, state.key, state.ref_params), metrics

    train_step = jax.jit(_step, in_shardings=(state_sh, batch_shardings(mesh)), out_shardings=(state_sh, rep),
                         donate_argnums=(0,))
    return init_state, train_step


def _metrics(cfg, mb_loss, mb_sums, m, adv, batch, tok_per_row, ent_per_prompt, lp_diff) -> dict[str, jax.Array]:
    """Scalar diagnostics of the step (token means over the whole batch unless stated)."""
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    if lp_diff is not None:  # recomputed old log-probs vs the sampler's, every token
        lp_diff = (jnp.sum(lp_diff) / tokens, jnp.max(lp_diff))
    else:  # the first mini-batch's forward, before its update, is the trainer at the sampling parameters
        lp_diff = (mb_sums["lp_diff_sum"][0] / jnp.maximum(jnp.sum(m[0]), 1.0), mb_sums["lp_diff_max"][0])
    return step_metrics(cfg, mb_loss, mb_sums, tokens, tokens, lp_diff, adv, batch, tok_per_row, ent_per_prompt)


def step_metrics(cfg, mb_loss, mb_sums, tokens, stat_tokens, lp_diff, adv, batch, tok_per_row,
                 ent_per_prompt) -> dict[str, jax.Array]:
    """The step's metrics from the per-mini-batch losses and token sums: ``tokens`` counts the trained tokens of
    the batch (clip fractions), ``stat_tokens`` those the entropy and approximate-KL sums were taken over;
    ``lp_diff`` is (mean, max) of |trainer - sampler| log-prob."""
    denom = mb_sums["denom"]
    out = {
        "loss": jnp.mean(mb_loss),
        "pg_loss": jnp.mean(losses.finalize(mb_sums["pg"], denom)),
        "kl": jnp.mean(losses.finalize(mb_sums["kl"], denom)),
        "grad_norm": jnp.mean(mb_sums["grad_norm"]),
        "entropy": jnp.sum(mb_sums["entropy"]) / stat_tokens,
        "approx_kl": jnp.sum(mb_sums["approx_kl"]) / stat_tokens,
        "prompt_entropy_mean": jnp.nanmean(ent_per_prompt),
        "sampler_lp_diff_mean": lp_diff[0],
        "sampler_lp_diff_max": lp_diff[1],
    }
    for name in ("clip_low", "clip_high", "clip_dual"):
        out[f"{name}_frac"] = jnp.sum(mb_sums[name]) / tokens
    out.update(group_metrics(adv, batch.rewards, batch.valid, tok_per_row, cfg.k, cfg.success_threshold))
    out["advantages"], out["prompt_entropy"] = adv, ent_per_prompt
    return out


def group_metrics(adv: jax.Array, rewards: jax.Array, valid: jax.Array, tok_per_row: jax.Array, k: int,
                    threshold: float) -> dict[str, jax.Array]:
    """Advantage, reward, group pass@k and pass^k and response-length statistics over the valid rollouts."""
    v = valid.astype(jnp.float32)
    nv = jnp.maximum(jnp.sum(v), 1.0)
    adv_mean = jnp.sum(adv * v) / nv
    any_valid = jnp.any(valid)
    return {
        "adv_mean": adv_mean,
        "adv_std": jnp.sqrt(jnp.sum(jnp.square(adv - adv_mean) * v) / nv),
        "adv_abs_mean": jnp.sum(jnp.abs(adv) * v) / nv,
        "adv_zero_prompt_frac": jnp.mean(jnp.all(adv == 0, axis=-1).astype(jnp.float32)),
        "reward_mean": jnp.sum(rewards * v) / nv,
        "rollout_pass@k": jnp.mean(group_pass_at_k(is_pass(rewards, threshold), valid, k)),
        "rollout_pass^k": jnp.mean(group_pass_hat_k(is_pass(rewards, threshold), valid, k)),
        "response_length_mean": jnp.sum(tok_per_row * v) / nv,
        "response_length_max": jnp.max(jnp.where(valid, tok_per_row, 0.0)),
        "response_length_min": jnp.where(any_valid, jnp.min(jnp.where(valid, tok_per_row, jnp.inf)), 0.0),
        "valid_frac": jnp.mean(v),
    }


def _per_prompt(correct: jax.Array, valid: jax.Array, k: int, estimator, few) -> jax.Array:
    """``estimator(m, c, k)`` per prompt over its m valid samples (c correct), or ``few(m, c)`` when m < k."""
    m = jnp.sum(valid, axis=-1).astype(jnp.int32)
    c = jnp.sum(correct & valid, axis=-1).astype(jnp.int32)
    enough = m >= k
    exact = estimator(jnp.where(enough, m, k), jnp.where(enough, c, 0), k)
    return jnp.where(enough, exact, few(m, c).astype(jnp.float32))


def group_pass_at_k(correct: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Unbiased pass@k per prompt from its valid samples (``passk_jax.metrics.pass_at_k``, Chen et al. 2021).

    correct, valid bool[P, n] -> f32[P]; a prompt with fewer than k valid samples scores whether any is correct.
    """
    return _per_prompt(correct, valid, k, pass_at_k, lambda m, c: c > 0)


def group_pass_hat_k(correct: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Unbiased pass^k per prompt (all k samples correct; ``passk_jax.metrics.pass_hat_k``) from its valid
    samples, f32[P]; a prompt with fewer than k valid samples scores whether all of them are correct."""
    return _per_prompt(correct, valid, k, pass_hat_k, lambda m, c: (c == m) & (m > 0))
