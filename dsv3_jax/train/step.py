"""One jitted `train_step(state, batch)`: next-token + MTP + balance loss, AdamW, gradient accumulation, the
auxiliary-loss-free bias hook, and a guard that never commits a non-finite update."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import ModelConfig
from dsv3_jax.host import compiler_options
from dsv3_jax.model.moe import STATS_COLLECTION
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.quant.matmul import target_platform
from dsv3_jax.train.balancing import BiasHook, balance_terms, expert_loads, per_layer_loads, sign_update, update_router
from dsv3_jax.train.losses import (
    LOSS_CHUNK,
    chunked_cross_entropy,
    chunked_mtp_losses,
    hidden_states_with_mtp,
    masked_mean,
    max_violation,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (report §3 defaults where it states them; CPU runs override lr and lengths)."""

    steps: int = 300
    batch_size: int = 8  # sequences per optimizer step (global, all data shards)
    seq_len: int = 256
    grad_accum: int = 1  # microbatches per step; batch_size must be divisible by it
    lr: float = 2.2e-4  # peak
    warmup_steps: int = 2000
    decay_start: int | None = None  # constant lr until here (default: warmup_steps)
    decay_end: int | None = None  # cosine reaches final_lr here (default: steps)
    final_lr_ratio: float = 0.1  # 2.2e-5 / 2.2e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    moment_dtype: str = "float32"  # report: bfloat16 AdamW first moments
    mtp_lambda: float = 0.3
    mtp_lambda_after: float = 0.1
    mtp_lambda_switch: int | None = None  # step where λ drops to mtp_lambda_after (None: never)
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (0 disables)
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed (0 disables)
    bias_gamma_stop: int | None = None  # step from which γ = 0
    bias_center: bool = False
    loss_chunk: int = LOSS_CHUNK  # positions per chunk of the cross-entropy (0: the whole sequence at once)
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train config field {name} must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train config field batch_size={self.batch_size} is not divisible by "
                             f"grad_accum={self.grad_accum}")
        if self.moment_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train config field moment_dtype={self.moment_dtype!r}: use float32 or bfloat16")
        if self.loss_chunk < 0:
            raise ValueError(f"train config field loss_chunk must be >= 0, got {self.loss_chunk}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    router: Any
    opt_state: Any


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 → lr, constant, cosine decay to lr·final_lr_ratio, then constant (report §3)."""
    decay_start = tc.warmup_steps if tc.decay_start is None else tc.decay_start
    decay_end = tc.steps if tc.decay_end is None else tc.decay_end
    final = tc.lr * tc.final_lr_ratio
    return optax.join_schedules([
        optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1)),
        optax.constant_schedule(tc.lr),
        optax.cosine_decay_schedule(tc.lr, max(decay_end - decay_start, 1), alpha=tc.final_lr_ratio),
        optax.constant_schedule(final),
    ], [tc.warmup_steps, max(decay_start, tc.warmup_steps), max(decay_end, decay_start, tc.warmup_steps)])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: no decay on norms (1-D scales). The router bias is not in params at all."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: not any(getattr(k, "key", "") in ("scale", "q_norm", "kv_norm") for k in path), params)


def make_optimizer(tc: TrainConfig, *, flat: bool = False) -> optax.GradientTransformation:
    """clip(global norm) → AdamW(β1, β2, ε, wd masked) on the lr schedule.

    flat=True runs the clip and the Adam moments on one vector of every parameter (`optax.flatten`), then the
    masked decay and the lr per leaf: the same update (the global norm summed in another order), with one [P] mu
    and nu instead of a pair per leaf. One-device runs used it until 2026-12-08, for its fewer kernels, and
    `train.loop` still resumes their checkpoints with it (`loop.saved_moments`). The per-leaf chain is the default:
    its train step is 8-9% faster on the CPU (in-process, in turn, medians: tiny_stdlib 460 → 425 ms, with MTP
    606 → 550 ms; `small` 1209 → 1102 ms), though the flat update alone is only ~4 ms slower (14.8 vs 10.6 ms):
    the rest shows only inside the whole step (not traced to one op). Its cold compile is longer: tiny_stdlib with
    MTP 18.3-19.4 → 21.7-24.6 s (fresh processes, 1069 → 1192 fusions), without MTP ~1 s; over the README's
    300-step run the faster steps win back 2-5x what the compile costs (3-8 s against ~16 s). Measured again once
    one-device CPU programs ran inline (`dsv3_jax.host`; one process, in turn, tiny_stdlib with MTP): flat 248.9
    vs per-leaf 233.3 ms per step, lower + compile 5.3 vs 7.2 s (the per-leaf program compiled first).
    """
    mu_dtype = jnp.bfloat16 if tc.moment_dtype == "bfloat16" else None
    clip = optax.clip_by_global_norm(tc.clip_norm)
    if not flat:
        return optax.chain(clip, optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                                             weight_decay=tc.weight_decay, mu_dtype=mu_dtype, mask=decay_mask))
    adam = optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps, mu_dtype=mu_dtype)
    return optax.chain(optax.flatten(optax.chain(clip, adam)),  # = adamw's chain, its first link flattened
                       optax.add_decayed_weights(tc.weight_decay, decay_mask),
                       optax.scale_by_learning_rate(lr_schedule(tc)))


def init_state(variables: dict, optimizer: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, router=variables.get("router", {}),
                      opt_state=optimizer.init(params))


def _schedules(tc: TrainConfig, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(MTP λ, bias γ) at `step`."""
    lam = tc.mtp_lambda if tc.mtp_lambda_switch is None else jnp.where(
        step < tc.mtp_lambda_switch, tc.mtp_lambda, tc.mtp_lambda_after)
    gamma = tc.bias_gamma if tc.bias_gamma_stop is None else jnp.where(step < tc.bias_gamma_stop, tc.bias_gamma, 0.0)
    return jnp.asarray(lam, jnp.float32), jnp.asarray(gamma, jnp.float32)


def make_loss_fn(config: ModelConfig, tc: TrainConfig):
    """loss(params, router, batch, λ) → (total, aux) for one microbatch {"inputs", "targets"[, "mask"]} [B,T].

    The cross-entropies are chunked over the sequence (`tc.loss_chunk`): [B,T,V] logits are never materialised.
    """
    model = Transformer(config)

    def loss_fn(params, router, batch, lam):
        (h_BTD, mtp_h_KBTD), mutated = hidden_states_with_mtp(
            model, {"params": params, "router": router}, batch["inputs"], mutable=[STATS_COLLECTION])
        stats = mutated.get(STATS_COLLECTION, {})
        mask = batch.get("mask", jnp.ones(batch["targets"].shape, bool))
        lm_head = params["lm_head"]
        ce = masked_mean(chunked_cross_entropy(h_BTD, lm_head, batch["targets"], tc.loss_chunk), mask)
        mtp = chunked_mtp_losses(mtp_h_KBTD, lm_head, batch["targets"], mask, tc.loss_chunk)
        mtp_total = lam * jnp.mean(mtp) if mtp.shape[0] else jnp.zeros((), jnp.float32)
        terms = balance_terms(stats)
        balance = sum(jnp.sum(t) for t in terms) if terms else jnp.zeros((), jnp.float32)
        total = ce + mtp_total + tc.balance_alpha * balance
        loads = expert_loads(router, stats) if router else {}
        return total, {"ce": ce, "mtp": mtp, "balance": balance, "loads": loads}

    return loss_fn


def _accumulate(loss_fn, params, router, batch, lam, accum: int):
    """Sum of gradients/aux over `accum` microbatches (scan), then averaged; loads are summed (global counts).

    One microbatch runs without the scan: a one-step loop still keeps XLA from optimising across its boundary
    (its zero-initialised carry, residual stacks built inside the loop body)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, aux), grads = grad_fn(params, router, batch, lam)
        loads = aux.pop("loads")
        return loss, aux, grads, loads
    micro = jax.tree_util.tree_map(lambda a: a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), batch)

    def body(carry, mb):
        (loss, aux), grads = grad_fn(params, router, mb, lam)
        return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.tree_util.tree_map(lambda a: a[0], micro)
    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, router, first, lam)
    init = jax.tree_util.tree_map(jnp.zeros_like, (loss0, aux0, grads0))
    (loss, aux, grads), _ = jax.lax.scan(body, init, micro)
    loads = aux.pop("loads")
    aux, grads = jax.tree_util.tree_map(lambda x: x / accum, (aux, grads))
    return loss / accum, aux, grads, loads


def make_train_step(config: ModelConfig, tc: TrainConfig, optimizer: optax.GradientTransformation,
                    bias_hook: BiasHook = sign_update):
    """The pure step function (state, batch) → (state, metrics); jit it with `jit_train_step`."""
    loss_fn = make_loss_fn(config, tc)
    hook = bias_hook if not tc.bias_center or bias_hook is not sign_update else (
        lambda b, load, g: sign_update(b, load, g, center=True))

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step = state.step
        lam, gamma = _schedules(tc, step)
        loss, aux, grads, loads = _accumulate(loss_fn, state.params, state.router, batch, lam, tc.grad_accum)
        # Decided before the update (finite loss and gradients give finite AdamW updates), so each leaf's update
        # and the guard's select fuse into one pass: no second, unselected copy of the whole state is held.
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        router = update_router(state.router, loads, gamma, hook) if state.router else state.router
        new = TrainState(step=state.step + 1, params=params, router=router, opt_state=opt_state)
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "ce": aux["ce"], "mtp": aux["mtp"], "balance": aux["balance"],
                   "grad_norm": grad_norm, "lr": lr_schedule(tc)(step), "finite": finite,
                   "mtp_lambda": lam, "bias_gamma": gamma}
        if loads:
            layer_loads = per_layer_loads(loads)
            metrics.update(expert_load=layer_loads, max_vio=max_violation(layer_loads))
        return state, metrics

    return train_step


def jit_train_step(step_fn, state_shardings=None, batch_shardings=None):
    """jit with the state donated and the package's compile options for its platform (`host.compiler_options`:
    LLVM O1 on the CPU); shardings (trees of NamedSharding) when running on a mesh, whose devices then name the
    platform (an abstract TPU slice compiled from a CPU host gets no CPU options)."""
    if state_shardings is None:
        return jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options(target_platform()))
    platform = next(iter(jax.tree_util.tree_leaves(state_shardings)[0].device_set)).platform
    return jax.jit(step_fn, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), compiler_options=compiler_options(platform))
