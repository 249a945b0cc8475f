"""Training recipe (DESIGN.md §3) on a tiny model: exact resume after SIGKILL, the auxiliary-loss-free bias hook,
global expert counts across data shards, MTP / balance losses against numpy, gradient accumulation, the lr
schedule, the weight-decay mask, the non-finite guard and run-config / resume errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CLI, REPO, cli_env
from jax.sharding import NamedSharding, PartitionSpec

import dsv3_jax as d
from dsv3_jax.errors import ConfigError
from dsv3_jax.model import moe
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train import losses
from dsv3_jax.train.run_config import load_run_config, run_config_from_dict
from dsv3_jax.train.step import (
    TrainConfig,
    decay_mask,
    init_state,
    jit_train_step,
    lr_schedule,
    make_loss_fn,
    make_optimizer,
    make_train_step,
)

# 1 dense + 1 MoE layer (+ the MTP block, itself an MoE layer): 8 experts in 4 groups keeping 2, top-2.
MODEL_TABLE = dict(
    preset="tiny", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    max_position_embeddings=64)
MC = run_config_from_dict({"model": MODEL_TABLE}).model.replace(vocab_size=259)  # the byte tokenizer's vocabulary
E, K = MC.n_routed_experts, MC.num_experts_per_tok
B, T = 8, 16  # global batch: one sequence per device on the 8-device mesh

GAMMA = 0.05
GAMMA_STOP = 10**6  # a state whose step is >= this runs with γ = 0 through the same compiled step
# One compiled step serves most tests (compiles dominate the runtime): a small constant lr (30 steps move the
# weights by <= 0.03), weight decay on, α large enough that the balance term shows in the loss, γ > 0 before
# GAMMA_STOP. eps 1e-3 keeps Adam's first step a smooth function of the gradient (with eps 1e-8 it is
# ≈ lr·sign(g), which float noise on a near-zero gradient could flip between two equivalent computations).
TC = TrainConfig(steps=100, batch_size=B, seq_len=T, lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, eps=1e-3,
                 weight_decay=0.1, balance_alpha=1e-2, mtp_lambda=0.3, bias_gamma=GAMMA, bias_gamma_stop=GAMMA_STOP)
# Two microbatches and a literal γ = 0.
TC_ACC2 = dataclasses.replace(TC, grad_accum=2, bias_gamma=0.0, bias_gamma_stop=None)


def _keys(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _device(tree):
    """Fresh device copies (the jitted step donates its state argument)."""
    return jax.tree_util.tree_map(jnp.array, tree)


def _batch(seed: int, b: int = B, t: int = T) -> dict:
    stream = np.random.RandomState(seed).randint(3, MC.vocab_size, (b, t + 1)).astype(np.int32)
    return {"inputs": stream[:, :-1], "targets": stream[:, 1:]}


def _moe_biases(router) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(router)]


@pytest.fixture(scope="module")
def variables():
    """init_variables with a wider router gate (so routing depends on the token) and the correction bias strongly
    favouring experts 0 and 1 (one whole group): every token first goes to experts {0, 1}."""
    v = d.init_variables(MC, 0)
    rng = np.random.RandomState(1)

    def gate(path, x):
        return jnp.asarray(0.3 * rng.randn(*x.shape), x.dtype) if _keys(path)[-1] == "gate" else x

    skew = np.zeros(E, np.float32)
    skew[:2] = 1.0
    return {"params": jax.tree_util.tree_map_with_path(gate, v["params"]),
            "router": jax.tree_util.tree_map(lambda b: b + skew, v["router"])}


@pytest.fixture(scope="module")
def steps():
    """(optimizer, jitted step for TC, jitted step for TC_ACC2); make_optimizer(TC) == make_optimizer(TC_ACC2)."""
    opt = make_optimizer(TC)
    return opt, jit_train_step(make_train_step(MC, TC, opt)), jit_train_step(make_train_step(MC, TC_ACC2, opt))


@pytest.fixture(scope="module")
def bal_run(variables, steps):
    """30 steps with the hook on (step 0 → γ > 0) and 30 with it off (step ≥ GAMMA_STOP → γ = 0), same batches."""
    opt, step_fn, _ = steps
    state0 = _host(init_state(variables, opt))
    runs = {}
    for name, start in (("on", 0), ("off", GAMMA_STOP)):
        state = _device(dataclasses.replace(state0, step=np.asarray(start, np.int32)))
        history, routers = [], []
        for i in range(30):
            state, metrics = step_fn(state, _batch(100 + i))
            history.append(_host(metrics))
            routers.append(_host(state.router))
        runs[name] = {"metrics": history, "routers": routers, "params": _host(state.params)}
    return {"state0": state0, "batch0": _batch(100), **runs}


def _router_inputs_interceptor(next_fun, args, kwargs, context):
    """Sow every MoE layer's input next to its expert_load (scanned layers stack it on the layer axis)."""
    if isinstance(context.module, moe.MoE) and context.method_name == "__call__":
        context.module.sow(moe.STATS_COLLECTION, "router_input", args[0])
    return next_fun(*args, **kwargs)


@pytest.fixture(scope="module")
def eager_forward(bal_run):
    """The forward of step 1 (state0, batch0) run again outside the train step, with each MoE layer's input."""
    s = bal_run["state0"]

    @jax.jit
    def forward(variables, tokens):
        with nn.intercept_methods(_router_inputs_interceptor):
            return Transformer(MC).apply(variables, tokens, method=Transformer.forward_with_mtp,
                                         mutable=[moe.STATS_COLLECTION])

    (logits, mtp_logits), mutated = forward({"params": s.params, "router": s.router},
                                            jnp.asarray(bal_run["batch0"]["inputs"]))
    stats = mutated[moe.STATS_COLLECTION]
    layers = []  # (router input [B,T,D], gate [D,E], bias [E], sown load [E], sown balance) in per_layer_loads order
    main, mtp = stats["moe_layers"]["layers"]["moe"], stats["mtp_0"]["block"]["moe"]
    pm, pt = s.params["moe_layers"]["layers"]["moe"], s.params["mtp_0"]["block"]["moe"]
    rm, rt = s.router["moe_layers"]["layers"]["moe"], s.router["mtp_0"]["block"]["moe"]
    for i in range(MC.num_moe_layers):
        layers.append((np.asarray(main["router_input"][0][i]), pm["gate"][i], rm["bias"][i],
                       np.asarray(main["expert_load"][0][i]), float(main["balance"][0][i])))
    layers.append((np.asarray(mtp["router_input"][0]), pt["gate"], rt["bias"], np.asarray(mtp["expert_load"][0]),
                   float(mtp["balance"][0])))
    return {"logits": np.asarray(logits), "mtp_logits": np.asarray(mtp_logits), "layers": layers}


def _route_np(x_BTD, gate_DE, bias_E):
    """dsv3_jax.model.moe.route on the layer's own logits → (experts [B,T,K], scores [B,T,E]) as numpy."""
    b, t, dim = x_BTD.shape
    logits = jnp.einsum("nd,de->ne", jnp.asarray(x_BTD, jnp.float32).reshape(b * t, dim), jnp.asarray(gate_DE))
    _, experts, scores = moe.route(logits, jnp.asarray(bias_E), MC)
    return np.asarray(experts).reshape(b, t, -1), np.asarray(scores, np.float64).reshape(b, t, -1)


# ---------------------------------------------------------------- 1. exact resume after SIGKILL

RUN_STEPS, RUN_CKPT = 24, 4


def _run_toml(tmp_path) -> str:
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in MODEL_TABLE.items())
    text = f"""[model]
{model}

[data]
corpus = "stdlib"
max_bytes = 100000
tokenizer = "byte"

[train]
steps = {RUN_STEPS}
batch_size = 4
seq_len = 32
lr = 3e-3
warmup_steps = 4
decay_start = 8
mtp_lambda = 0.3
balance_alpha = 1e-3
bias_gamma = 1e-2
seed = 3

[run]
log_every = 1000
ckpt_every = {RUN_CKPT}
keep_checkpoints = 2
sample_tokens = 0
"""
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def _cli(toml: str, out, cache) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "train", "--config", toml, "--out", str(out)],
                            cwd=REPO, env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final_steps(out) -> list[int]:
    """Finalised checkpoint steps (orbax writes into a tmp dir, then renames it to the step number)."""
    ckpt = out / "checkpoints"
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if ckpt.is_dir() else []


def _metrics(out) -> list[dict]:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    toml, cache = _run_toml(tmp_path), tmp_path / "jax_cache"
    a, b = tmp_path / "A", tmp_path / "B"
    _finished(_cli(toml, a, cache))

    proc = _cli(toml, b, cache)
    deadline = time.monotonic() + 300
    while not _final_steps(b) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended (rc {proc.returncode}) before it was killed:\n{out}"
    killed_at = _final_steps(b)
    assert killed_at and killed_at[-1] < RUN_STEPS
    assert len(_metrics(b)) < RUN_STEPS

    log = _finished(_cli(toml, b, cache))
    resumed = int(log.split("resumed from step ")[1].split()[0])
    assert RUN_CKPT <= resumed < RUN_STEPS and resumed % RUN_CKPT == 0

    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == list(range(1, RUN_STEPS + 1))
    assert [m["step"] for m in mb] == list(range(1, RUN_STEPS + 1))
    for x, y in zip(ma, mb, strict=True):
        for key in ("loss", "ce", "mtp", "grad_norm", "balance", "expert_load", "max_vio", "lr"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    assert ma[-1]["loss"] < ma[0]["loss"]  # it trained


# ---------------------------------------------------------------- 2. the bias hook


def test_bias_hook_lowers_maxvio_only_when_on(bal_run):
    on, off = bal_run["on"]["metrics"], bal_run["off"]["metrics"]
    assert all(float(m["bias_gamma"]) == np.float32(GAMMA) for m in on)
    assert all(float(m["bias_gamma"]) == 0.0 for m in off)
    vio_on = np.array([m["max_vio"] for m in on])  # [steps, MoE layers (main + MTP)]
    vio_off = np.array([m["max_vio"] for m in off])
    assert vio_on.shape == (30, MC.num_moe_layers + 1)
    # The bias skew (1.0 > any score difference) sends every token to experts {0, 1}: load 2·(B·T) on them,
    # mean B·T·K/E → MaxVio = E/K - 1 = 3.
    np.testing.assert_allclose(vio_on[0], E / K - 1)
    np.testing.assert_allclose(vio_off, E / K - 1)  # stays skewed without the hook
    assert np.all(vio_on[-5:].mean(axis=0) < 0.3 * vio_on[0])
    loads = np.array(on[-1]["expert_load"])
    np.testing.assert_array_equal(loads.sum(-1), B * T * K)


def test_bias_moves_by_gamma_sign_and_never_otherwise(bal_run):
    s0 = bal_run["state0"]
    first = bal_run["on"]["metrics"][0]
    loads = np.array(first["expert_load"])
    expected = [b + np.float32(GAMMA) * np.sign(load.mean() - load)
                for b, load in zip(_moe_biases(s0.router), loads, strict=True)]
    for got, want in zip(_moe_biases(bal_run["on"]["routers"][0]), expected, strict=True):
        np.testing.assert_array_equal(got.reshape(want.shape), want.astype(np.float32))
    # γ = 0: the bias is bit-identical after every step.
    for router in bal_run["off"]["routers"]:
        for got, want in zip(_moe_biases(router), _moe_biases(s0.router), strict=True):
            np.testing.assert_array_equal(got, want)


def test_bias_is_not_a_parameter_and_gets_no_gradient_or_decay(variables):
    param_paths = [_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
    assert not any("bias" in p for p in param_paths)
    router_paths = [_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["router"])[0]]
    assert len(router_paths) == MC.num_moe_layers + 1 and all(p[-1] == "bias" for p in router_paths)

    loss_fn = make_loss_fn(MC, TC)
    batch = _batch(0)
    grads = jax.eval_shape(lambda p: jax.grad(lambda q: loss_fn(q, variables["router"], batch, 0.3)[0])(p),
                           variables["params"])
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables["params"])
    assert not any("bias" in _keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0])

    opt = make_optimizer(TC)
    opt_state = opt.init(variables["params"])
    assert not any("bias" in _keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0])
    assert not any("bias" in _keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        decay_mask(variables["params"]))[0])


def test_gamma_zero_keeps_bias_bit_identical_under_lr_and_weight_decay(variables, steps):
    opt, _, step_gamma0 = steps
    state = _device(init_state(variables, opt))
    for i in range(3):
        state, metrics = step_gamma0(state, _batch(200 + i))
        assert bool(metrics["finite"]) and float(metrics["bias_gamma"]) == 0.0
    assert int(state.step) == 3
    for got, want in zip(_moe_biases(state.router), _moe_biases(variables["router"]), strict=True):
        np.testing.assert_array_equal(got, want)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   state.params, variables["params"])
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every parameter moved (lr > 0, weight decay on matrices)


# ---------------------------------------------------------------- 3. global counts across data shards


def test_expert_counts_are_global_across_data_shards(variables, steps, bal_run, eager_forward):
    from dsv3_jax.parallel import get_layout, make_mesh

    assert len(jax.devices()) == 8
    mesh = make_mesh(get_layout("data"))
    assert mesh.shape["data"] == 8
    opt = steps[0]
    state0 = bal_run["state0"]
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = jax.tree_util.tree_map(lambda _: replicated, state0)
    batch_sh = {k: NamedSharding(mesh, PartitionSpec("data")) for k in ("inputs", "targets")}
    sharded_fn = jit_train_step(make_train_step(MC, TC, opt), state_sh, batch_sh)
    state = jax.device_put(_device(state0), state_sh)
    batch = jax.device_put(bal_run["batch0"], batch_sh)
    assert len(batch["inputs"].sharding.device_set) == 8
    new, metrics = sharded_fn(state, batch)

    single = bal_run["on"]["metrics"][0]  # the same step on one device
    load = np.asarray(metrics["expert_load"])
    np.testing.assert_array_equal(load, single["expert_load"])
    assert np.all(load == np.round(load)) and np.all(load.sum(-1) == B * T * K)
    for got, want in zip(_moe_biases(new.router), _moe_biases(bal_run["on"]["routers"][0]), strict=True):
        np.testing.assert_array_equal(got, want)

    # A numpy count of the experts chosen over the whole global batch (route() on each layer's own logits).
    for layer, (x, gate, bias, _, _) in enumerate(eager_forward["layers"]):
        experts, _ = _route_np(x, gate, bias)
        global_count = np.bincount(experts.reshape(-1), minlength=E)
        np.testing.assert_array_equal(load[layer], global_count)
        shard0 = np.bincount(experts[: B // 8].reshape(-1), minlength=E)
        assert not np.array_equal(load[layer], shard0)
    # With γ > 0 and global counts, the update is sign(global mean - global load) (one shard's would differ).
    for got, b0, n in zip(_moe_biases(new.router), _moe_biases(state0.router), load, strict=True):
        np.testing.assert_array_equal(got.reshape(-1), (b0 + np.float32(GAMMA) * np.sign(n.mean() - n)).reshape(-1))


# ---------------------------------------------------------------- 4. MTP loss and the total


def _np_ce(logits, targets):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_mtp_losses_match_hand_computation():
    rng = np.random.RandomState(5)
    b, t, v = 2, 5, 7
    logits = rng.randn(1, b, t, v).astype(np.float32) * 2
    targets = rng.randint(0, v, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    got = np.asarray(losses.mtp_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    # depth 1 at position i predicts targets[i + 1]; the last position has no target.
    want = np.mean([_np_ce(logits[0, bi, i], targets[bi, i + 1]) for bi in range(b) for i in range(t - 1)])
    assert got.shape == (1,)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    # a masked target drops the position that predicts it
    mask[0, 3] = False
    got = np.asarray(losses.mtp_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    want = np.mean([_np_ce(logits[0, bi, i], targets[bi, i + 1]) for bi in range(b) for i in range(t - 1)
                    if (bi, i + 1) != (0, 3)])
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_step_losses_match_model_logits_and_total(bal_run, eager_forward):
    m = bal_run["on"]["metrics"][0]
    targets = bal_run["batch0"]["targets"]
    ce = _np_ce(eager_forward["logits"], targets).mean()
    mtp = _np_ce(eager_forward["mtp_logits"][0][:, :-1], targets[:, 1:]).mean()
    np.testing.assert_allclose(float(m["ce"]), ce, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(m["mtp"]), [mtp], rtol=2e-5)
    lam = float(m["mtp_lambda"])
    assert lam == np.float32(TC.mtp_lambda)
    total = float(m["ce"]) + lam * float(np.mean(m["mtp"])) + TC.balance_alpha * float(m["balance"])
    np.testing.assert_allclose(float(m["loss"]), total, rtol=1e-6)
    assert TC.balance_alpha * float(m["balance"]) > 1e-3 * float(m["loss"])  # the term is visible


# ---------------------------------------------------------------- 5. balance loss


def _np_balance(experts_BTK, scores_BTE):
    """DESIGN.md §3 per sequence: f_i = E/(K·T)·Σ_t 1[i ∈ TopK_t], P_i = (1/T)·Σ_t s_it/Σ_j s_jt, Σ_i f_i·P_i;
    averaged over sequences (without α)."""
    out = []
    for experts, scores in zip(experts_BTK, scores_BTE, strict=True):
        t = experts.shape[0]
        f = E / (K * t) * np.array([(experts == i).any(-1).sum() for i in range(E)])
        p = (scores / scores.sum(-1, keepdims=True)).mean(0)
        out.append((f * p).sum())
    return float(np.mean(out))


def test_balance_term_matches_design_formula():
    rng = np.random.RandomState(9)
    b, t = 3, 11
    logits = jnp.asarray(2 * rng.randn(b * t, E), jnp.float32)
    bias = jnp.asarray(np.where(np.arange(E) < 2, 0.6, 0.0), jnp.float32)
    _, experts, scores = moe.route(logits, bias, MC)
    experts, scores = np.asarray(experts).reshape(b, t, K), np.asarray(scores).reshape(b, t, E)
    got = float(moe.balance_term(jnp.asarray(scores), jnp.asarray(experts), E))
    np.testing.assert_allclose(got, _np_balance(experts, scores.astype(np.float64)), rtol=1e-6)


def test_model_balance_uses_dispatched_topk(bal_run, eager_forward):
    total = 0.0
    for x, gate, bias, load, balance in eager_forward["layers"]:
        experts, scores = _route_np(x, gate, bias)
        np.testing.assert_array_equal(load, np.bincount(experts.reshape(-1), minlength=E))
        want = _np_balance(experts, scores)
        np.testing.assert_allclose(balance, want, rtol=1e-5)
        unbiased, _ = _route_np(x, gate, np.zeros_like(bias))  # what a balance loss ignoring the bias would use
        assert abs(_np_balance(unbiased, scores) - want) > 1e-3
        total += want
    np.testing.assert_allclose(float(bal_run["on"]["metrics"][0]["balance"]), total, rtol=1e-5)


# ---------------------------------------------------------------- 6. gradient accumulation


def test_grad_accum_matches_single_batch(variables, steps):
    opt, step1, step2 = steps
    batch = _batch(7)
    # Both from step GAMMA_STOP: γ = 0 for TC as for TC_ACC2, and the lr is constant.
    start = dataclasses.replace(_host(init_state(variables, opt)), step=np.asarray(GAMMA_STOP, np.int32))
    s1, m1 = step1(_device(start), batch)
    s2, m2 = step2(_device(start), batch)
    assert bool(m1["finite"]) and bool(m2["finite"])
    assert float(m1["lr"]) == float(m2["lr"]) == np.float32(TC.lr)
    np.testing.assert_array_equal(np.asarray(m1["expert_load"]), np.asarray(m2["expert_load"]))
    for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose(np.asarray(m2[key]), np.asarray(m1[key]), rtol=1e-5, err_msg=key)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   s1.params, s2.params)
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-5, diffs
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                   s1.params, variables["params"])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step did something the comparison can see
    assert int(s1.step) == int(s2.step) == GAMMA_STOP + 1


# ---------------------------------------------------------------- 7. lr schedule


def test_lr_schedule_shape():
    lr, final = 2.0, 0.1
    tc = TrainConfig(steps=100, lr=lr, warmup_steps=10, decay_start=30, decay_end=80, final_lr_ratio=final)
    sched = lr_schedule(tc)

    def want(s):
        if s < 10:
            return lr * s / 10
        if s < 30:
            return lr
        if s < 80:
            return lr * final + (lr - lr * final) * 0.5 * (1 + math.cos(math.pi * (s - 30) / 50))
        return lr * final

    got = np.array([float(sched(s)) for s in range(0, 120)])
    np.testing.assert_allclose(got, [want(s) for s in range(0, 120)], rtol=1e-5, atol=1e-7)
    assert got[0] == 0.0 and got[10] == lr and got[55] == pytest.approx(lr * (final + (1 - final) / 2))
    assert np.all(np.diff(got[30:81]) <= 0) and np.all(got[80:] == pytest.approx(lr * final))
    # defaults: decay starts after warmup, ends at the last step
    tc = TrainConfig(steps=50, lr=1.0, warmup_steps=5, final_lr_ratio=0.1)
    sched = lr_schedule(tc)
    assert float(sched(5)) == pytest.approx(1.0)
    assert float(sched(6)) < 1.0
    assert float(sched(50)) == pytest.approx(0.1) and float(sched(70)) == pytest.approx(0.1)


# ---------------------------------------------------------------- 8. decay mask


@pytest.mark.parametrize("flat", [False, True])
def test_weight_decay_skips_norms(variables, flat):
    tc = TrainConfig(lr=0.1, warmup_steps=0, decay_start=1000, steps=2000, weight_decay=0.1)
    opt = make_optimizer(tc, flat=flat)
    params = variables["params"]

    @jax.jit
    def one_update(p):
        updates, _ = opt.update(jax.tree_util.tree_map(jnp.zeros_like, p), opt.init(p), p)
        return optax.apply_updates(p, updates)

    new = one_update(params)
    # "norm" is the logical axis of every RMSNorm scale (block norms, q_norm, kv_norm, MTP norms)
    axes = d.logical_axes(MC)["params"]
    is_norm = jax.tree_util.tree_map(lambda spec: "norm" in tuple(spec), axes,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_norm = jax.tree_util.tree_leaves(is_norm)
    assert sum(flat_norm) >= 3 * MC.num_hidden_layers and not all(flat_norm)
    leaves = zip(flat_norm, jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new), strict=True)
    for norm, old, upd in leaves:
        if norm:
            np.testing.assert_array_equal(np.asarray(upd), np.asarray(old))
        else:
            np.testing.assert_allclose(np.asarray(upd), np.asarray(old) * (1 - tc.lr * tc.weight_decay), rtol=1e-6)
    assert jax.tree_util.tree_leaves(decay_mask(params)) == [not n for n in flat_norm]


def test_flat_optimizer_equals_per_leaf(variables):
    """make_optimizer(flat=True) (what flat one-device checkpoints resume with) takes the same steps as the per-leaf
    chain: clip, Adam, masked decay and the lr schedule, its moments one vector each."""
    tc = TrainConfig(lr=1e-2, warmup_steps=2, decay_start=3, steps=6, weight_decay=0.1, clip_norm=0.5)
    params = variables["params"]
    size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    rng = np.random.RandomState(3)
    grads = [jax.tree_util.tree_map(lambda x, s=s: jnp.asarray(rng.randn(*x.shape) * s, x.dtype), params)
             for s in (0.1, 3.0, 0.01, 1.0)]  # the second is clipped
    results = {}
    for flat in (False, True):
        opt = make_optimizer(tc, flat=flat)
        p, state = params, opt.init(params)
        update = jax.jit(lambda g, st, p, opt=opt: opt.update(g, st, p))
        for g in grads:
            updates, state = update(g, state, p)
            p = optax.apply_updates(p, updates)
        results[flat] = (p, state)
    for got, want in zip(jax.tree_util.tree_leaves(results[True][0]), jax.tree_util.tree_leaves(results[False][0]),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree_util.tree_leaves(results[True][0]), jax.tree_util.tree_leaves(params), strict=True)]
    assert min(moved) > 0
    flat_state = [x for x in jax.tree_util.tree_leaves(results[True][1]) if x.ndim]
    assert [x.shape for x in flat_state] == [(size,), (size,)]  # mu and nu, nothing per leaf


# ---------------------------------------------------------------- 9. non-finite guard


def test_non_finite_step_keeps_previous_state(variables, steps):
    opt, step1, _ = steps
    state = _host(init_state(variables, opt))
    state, _ = step1(_device(state), _batch(11))  # one good step: non-trivial opt_state, step 1
    state = _host(state)
    params = jax.tree_util.tree_map(np.copy, state.params)
    params["lm_head"][0, 0] = np.nan
    bad = dataclasses.replace(state, params=params)
    new, metrics = step1(_device(bad), _batch(12))
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    new = _host(new)
    assert int(new.step) == 1
    for got, want in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(bad), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """trainer.train with a huge lr after a zero-lr first step (warmup from 0): a checkpoint every step, then a
    non-finite loss. Returns (run config, run directory, the TrainingError)."""
    from dsv3_jax.errors import TrainingError
    from dsv3_jax.train.loop import train

    table = {"model": MODEL_TABLE, "data": {"corpus": "stdlib", "max_bytes": 20000, "tokenizer": "byte"},
             "train": {"steps": 6, "batch_size": 2, "seq_len": 16, "lr": 1e30, "warmup_steps": 1000},
             "run": {"ckpt_every": 1, "keep_checkpoints": 10, "sample_tokens": 0, "log_every": 1000}}
    rc = run_config_from_dict(table)
    out = str(tmp_path_factory.mktemp("nan_run") / "run")
    try:
        train(rc, out, log=lambda *_: None)
    except TrainingError as e:
        return rc, out, e
    return rc, out, None


def test_the_step_compiled_ahead_is_the_program_the_loop_runs(tmp_path):
    """train() compiles the one-device step on a helper thread while it initialises the state (`_compile_ahead`);
    the loop's first call must run that program, not compile its own."""
    from dsv3_jax.train.loop import train

    compiles = []

    def listen(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(train_step)":
            compiles.append(threading.current_thread().name)

    table = {"model": MODEL_TABLE, "data": {"corpus": "stdlib", "max_bytes": 20000, "tokenizer": "byte"},
             "train": {"steps": 2, "batch_size": 3, "seq_len": 16},
             "run": {"ckpt_every": 1000, "sample_tokens": 0, "log_every": 1000}}
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        train(run_config_from_dict(table), str(tmp_path / "run"), log=lambda *_: None)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiles) == 1 and compiles[0].startswith("dsv3-compile"), compiles


def test_trainer_stops_on_non_finite_loss_and_keeps_checkpoint(nan_run):
    from dsv3_jax.train.loop import load_run

    rc, out, error = nan_run
    assert error is not None, "training with lr 1e30 finished without a TrainingError"
    message = str(error)
    assert "non-finite loss or gradient at step" in message and "last checkpoint" in message
    failed = int(message.split("at step ")[1].split()[0])
    assert 2 <= failed <= rc.train.steps
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged] == list(range(1, failed)) and all(m["finite"] for m in logged)
    steps = sorted(int(n) for n in os.listdir(os.path.join(out, "checkpoints")) if n.isdigit())
    assert steps and steps[-1] == failed - 1  # the failed step was not saved
    _, loaded, tokenizer = load_run(out)
    assert tokenizer.vocab_size == MC.vocab_size
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(loaded))


# ---------------------------------------------------------------- 10. resume with another model, bad run configs


@pytest.mark.parametrize("field, value", [("rope_theta", 5000.0), ("hidden_size", 48)])
def test_resume_with_another_model_config_names_the_field(nan_run, field, value):
    from dsv3_jax.errors import TrainingError
    from dsv3_jax.train.loop import train

    rc, out, _ = nan_run
    other = dataclasses.replace(rc, model=rc.model.replace(**{field: value}))
    with pytest.raises(TrainingError, match=rf"\[model\] {field}=") as info:
        train(other, out, log=lambda *_: None)
    assert "another --out" in str(info.value)


def test_resume_on_a_mesh_from_a_single_device_checkpoint_is_refused(nan_run):
    """Resuming a one-device run's checkpoint under a mesh is refused with the fix; the checkpoint and the run's
    config.json are kept."""
    from dsv3_jax.errors import TrainingError
    from dsv3_jax.parallel.api import mesh_train_step
    from dsv3_jax.train.loop import train

    rc, out, _ = nan_run
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config_before = f.read()
    other = dataclasses.replace(rc, run=dataclasses.replace(rc.run, mesh="cpu-8-seq"))
    refusal = r"saved by a run on one device; this run is on a mesh: resume it with run.mesh = None"
    with pytest.raises(TrainingError, match=refusal):
        train(other, out, log=lambda *_: None, sharded_step=mesh_train_step)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert f.read() == config_before  # the refused run recorded nothing (a later load_run still works)


def _moment_shapes(opt_state) -> list[tuple]:
    """Shapes of the Adam state's arrays (the step count left out)."""
    return [x.shape for x in jax.tree_util.tree_leaves(opt_state) if x.ndim]


def test_runs_record_per_parameter_moments(nan_run):
    """A run keeps its Adam moments per parameter (a mu and a nu shaped like each parameter) and says so in every
    checkpoint's meta."""
    import orbax.checkpoint as ocp

    from dsv3_jax.train.loop import PER_PARAMETER, load_run

    _, out, _ = nan_run
    manager = ocp.CheckpointManager(os.path.join(out, "checkpoints"), item_names=("state", "meta"))
    steps = manager.all_steps()
    assert len(steps) >= 2
    for step in steps:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        assert meta["moments"] == PER_PARAMETER
    saved = manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    params = [p.shape for p in jax.tree_util.tree_leaves(load_run(out)[1]["params"])]
    assert _moment_shapes(saved["opt_state"]) == params * 2  # mu and nu, each shaped like the parameters


@pytest.mark.parametrize("meta, kind", [
    ({"run_config": {"run": {"mesh": None}}}, "flat"),  # one device, saved before the field existed
    ({"run_config": {"run": {"mesh": "cpu-8"}}}, "per_parameter"),  # a mesh run always was
    ({"run_config": {"run": {"mesh": None}}, "moments": "per_parameter"}, "per_parameter"),
    ({"run_config": {"run": {"mesh": None}}, "moments": "flat"}, "flat"),
])
def test_checkpoint_moments_kind(meta, kind):
    from dsv3_jax.train.loop import moments_of

    assert moments_of(meta) == kind


def test_load_run_without_checkpoints_says_so_and_creates_nothing(nan_run, tmp_path):
    from dsv3_jax.errors import TrainingError
    from dsv3_jax.train.loop import load_run

    _, out, _ = nan_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((Path(out) / "config.json").read_text())
    with pytest.raises(TrainingError, match="no checkpoint to load"):
        load_run(str(run))
    assert sorted(os.listdir(run)) == ["config.json"]


def test_unknown_checkpoint_moments_is_named():
    from dsv3_jax.errors import TrainingError
    from dsv3_jax.train.loop import moments_of

    with pytest.raises(TrainingError, match=r"run/checkpoints/7: unknown \"moments\" 'dense'"):
        moments_of({"run_config": {"run": {"mesh": None}}, "moments": "dense"}, "run/checkpoints/7")


def test_flat_moments_checkpoint_resumes_with_the_flat_optimizer(tmp_path, monkeypatch):
    """A one-device checkpoint from before per-parameter moments (one flat mu / nu, no "moments" in its meta) resumes
    with the flat optimizer: the resumed run ends where an uninterrupted flat run does, bit for bit."""
    from dsv3_jax.train import loop

    table = {"model": MODEL_TABLE, "data": {"corpus": "stdlib", "max_bytes": 20000, "tokenizer": "byte"},
             "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "warmup_steps": 1},
             "run": {"ckpt_every": 2, "sample_tokens": 0, "log_every": 1000}}
    rc = run_config_from_dict(table)

    def old_save(manager, step, state, batches, rc, out_dir, moments):  # the trainer's save before the field
        import orbax.checkpoint as ocp

        meta = {"step": step, "data_state": batches.state(), "run_config": json.loads(json.dumps(rc.to_dict()))}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    with monkeypatch.context() as m:  # the old trainer: flat moments on one device
        m.setattr(loop, "saved_moments", lambda out_dir: loop.FLAT)
        whole = loop.train(rc, str(tmp_path / "whole"), log=lambda *_: None)["state"]
        m.setattr(loop, "_save", old_save)
        loop.train(dataclasses.replace(rc, train=dataclasses.replace(rc.train, steps=2)), str(tmp_path / "cut"),
                   log=lambda *_: None)
    size = sum(x.size for x in jax.tree_util.tree_leaves(whole.params))
    assert _moment_shapes(whole.opt_state) == [(size,), (size,)]  # the old trainer's flat mu and nu
    loop.load_run(str(tmp_path / "cut"))  # loads with the flat optimizer
    logs = []
    resumed = loop.train(rc, str(tmp_path / "cut"), log=logs.append)["state"]
    assert logs and logs[0].startswith("resumed from step 2")
    assert loop.saved_moments(str(tmp_path / "cut")) == loop.FLAT  # and goes on saving flat
    assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(whole)
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("text, name", [
    ("[modle]\nhidden_size = 32\n", "modle"),
    ("[train]\nstpes = 3\n", "stpes"),
    ("[model]\npreset = \"tiny\"\nhiden_size = 32\n", "hiden_size"),
    ("[data]\ntokeniser = \"byte\"\n", "tokeniser"),
    ("[run]\nckpt_evry = 3\n", "ckpt_evry"),
])
def test_unknown_section_or_field_is_named(tmp_path, text, name):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=name) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_logged_tokens_per_s_times_each_step_from_when_it_was_computed(tmp_path):
    """The logger writes a step late; at a checkpoint it writes two steps back to back. A step whose results were
    already computed when its call returned (inline CPU dispatch) is timed from then, not from the write: the
    second of two back-to-back writes showed millions of tokens/s before. A step still running is timed when its
    fetch returns."""
    from tqdm import tqdm

    from dsv3_jax.train import loop

    metrics = {"loss": jnp.float32(1.0), "finite": jnp.bool_(True)}
    logger = loop._Logger(str(tmp_path / "metrics.jsonl"), tqdm(disable=True), tokens_per_step=1000)
    start = logger.last_time = time.perf_counter() - 2.0  # the logger started 2 s ago
    assert loop._ready_time(metrics) > start  # computed: now
    logger.write(1, metrics, start + 0.5)
    logger.write(2, metrics, start + 0.75)  # written right after step 1, computed 0.25 s after it
    logger.write(3, metrics, None)  # fetched: timed now, >= 1.25 s after step 2
    logger.close()
    logged = _metrics(tmp_path)
    assert [round(m["tokens_per_s"]) for m in logged[:2]] == [2000, 4000]
    assert 0 < logged[2]["tokens_per_s"] <= 1000 / 1.25
