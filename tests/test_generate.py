"""Generation: absorbed MLA cache ≡ naive forward, cache layout, HF greedy parity, speculative ≡ greedy (also with
a trained MTP), sampling, stop tokens, input errors and the CLI.

Compiles dominate the run time on CPU, so the tests share configs and call shapes: every `generate` on the
`SPEC` config below uses 3 prompts of <= 16 tokens and 24 new tokens, so one compiled greedy loop (and one
speculative loop) serves several tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_CONFIGS, build_hf_model

import dsv3_jax as d
from dsv3_jax import cli
from dsv3_jax.ckpt.hf import load_hf_directory
from dsv3_jax.infer.sampling import Sampling, sample_logits
from dsv3_jax.model.attention import CACHE_COLLECTION
from dsv3_jax.model.layers import rms_norm
from dsv3_jax.model.rope import apply_rotary, rotary_tables
from dsv3_jax.train.step import TrainConfig, init_state, jit_train_step, make_optimizer, make_train_step

LOGIT_TOL = 1e-4
NEW = 24  # new tokens in every batched generate call below
HF_NAMES = ("yarn_groups_bias", "no_q_lora")
HF_PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 33))]  # lengths 5, 3, 13 (one width bucket of 16)
WEIGHT_SCALE = 3.0  # HF's init std 0.02 gives logits of std ~0.17 and top-2 gaps ~5e-4; x3 → std ~0.5

# One dense layer + the MTP module (an MoE block): the smallest model with an MTP drafter; cheap to compile.
SPEC = dataclasses.replace(d.ModelConfig.from_preset("tiny"), num_hidden_layers=1, first_k_dense_replace=1)


def _scale_params(variables: dict, factor: float) -> dict:
    """Every weight x factor except norm scales (the router bias lives in "router" and is kept)."""
    def scale(path, leaf):
        keys = {getattr(p, "key", None) for p in path}
        return leaf if keys & {"scale", "q_norm", "kv_norm"} else leaf * factor
    return {**variables, "params": jax.tree_util.tree_map_with_path(scale, variables["params"])}


def _not_flat(rows: list[list[int]]) -> None:
    flat = [t for row in rows for t in row]
    assert len(set(flat)) > len(flat) // 4, f"generated tokens look degenerate: {rows}"


def _truncate_at_stop(row: list[int], stops) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name → (HF model, loaded config, loaded variables, directory); weights scaled so logits are not flat."""
    out = {}
    for i, name in enumerate(HF_NAMES):
        model = build_hf_model(PARITY_CONFIGS[name], seed=10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" not in pname:
                    p.mul_(WEIGHT_SCALE)
        path = tmp_path_factory.mktemp(f"gen_{name}")
        model.save_pretrained(path)
        config, variables = load_hf_directory(path)
        out[name] = (model, config, variables, str(path))
    return out


@pytest.fixture(scope="module")
def spec_random():
    """SPEC with random (scaled-up) weights, MTP included, and 3 random prompts."""
    variables = _scale_params(d.init_variables(SPEC, 1), 3.0)
    rs = np.random.RandomState(5)
    prompts = [rs.randint(0, SPEC.vocab_size, n).tolist() for n in (7, 2, 16)]
    return variables, prompts


@pytest.fixture(scope="module")
def spec_greedy(spec_random):
    variables, prompts = spec_random
    return d.generate(SPEC, variables, prompts, NEW, stop_ids=()).tokens


# ---------------------------------------------------------------- 1. absorbed cache ≡ naive forward


DECODE_STEPS = 72
CACHE_LEN = 96
PROMPT_LENGTHS = (5, 11)


@pytest.fixture(scope="module")
def decoded(hf_models):
    """Prefill 2 right-padded prompts, then 72 jitted greedy decode steps with per-row positions (to ~83)."""
    _, config, variables, _ = hf_models["yarn_groups_bias"]
    assert config.rope_scaling.original_max_position_embeddings == 32
    model = d.Transformer(config, CACHE_LEN)
    lengths = np.asarray(PROMPT_LENGTHS, np.int32)
    rs = np.random.RandomState(3)
    prompt = np.zeros((2, 16), np.int32)  # right padded with id 0
    for b, n in enumerate(lengths):
        prompt[b, :n] = rs.randint(0, config.vocab_size, n)

    @jax.jit
    def prefill(variables, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        (logits, _), state = model.apply(variables, tokens, positions, mutable=[CACHE_COLLECTION])
        return logits, state[CACHE_COLLECTION]

    @jax.jit
    def step(variables, cache, token_B, position_B):
        (logits, _), state = model.apply({**variables, CACHE_COLLECTION: cache}, token_B[:, None],
                                         position_B[:, None], mutable=[CACHE_COLLECTION])
        return logits[:, 0], state[CACHE_COLLECTION]

    prefill_logits, cache = prefill(variables, prompt)
    prefill_logits = np.asarray(prefill_logits)
    logits = prefill_logits[np.arange(2), lengths - 1]
    seqs = [prompt[b, :n].tolist() for b, n in enumerate(lengths)]
    step_logits = []  # step k: logits at position lengths + k
    for k in range(DECODE_STEPS):
        token = logits.argmax(-1).astype(np.int32)
        for b in range(2):
            seqs[b].append(int(token[b]))
        logits, cache = step(variables, cache, jnp.asarray(token), jnp.asarray(lengths + k))
        logits = np.asarray(logits)
        step_logits.append(logits)
    return dict(config=config, variables=variables, lengths=lengths, prompt=prompt, seqs=seqs, cache=cache,
                prefill_logits=prefill_logits, step_logits=np.stack(step_logits, 1))


def test_absorbed_decode_matches_naive_forward(decoded):
    config, variables, lengths = decoded["config"], decoded["variables"], decoded["lengths"]
    seqs, step_logits = decoded["seqs"], decoded["step_logits"]
    total = max(len(s) for s in seqs)
    assert total - 1 > 2 * config.rope_scaling.original_max_position_embeddings  # far past the yarn original
    full = np.zeros((2, total), np.int32)  # trailing pad of the shorter row is invisible to causal attention
    for b, s in enumerate(seqs):
        full[b, : len(s)] = s
    naive = np.asarray(d.forward(config, variables, full))
    worst = 0.0
    for b, n in enumerate(lengths):
        # prefill (absorbed, many tokens at once) at every prompt position
        np.testing.assert_allclose(decoded["prefill_logits"][b, :n], naive[b, :n], atol=LOGIT_TOL, rtol=0)
        # every decode step k holds the logits of position n + k
        expected = naive[b, n: n + DECODE_STEPS]
        worst = max(worst, float(np.abs(step_logits[b] - expected).max()))
        np.testing.assert_allclose(step_logits[b], expected, atol=LOGIT_TOL, rtol=0,
                                   err_msg=f"row {b}: cached decode logits differ from the naive forward")
    assert worst < LOGIT_TOL
    assert np.std(naive) > 0.2  # logits are not flat
    # one prefix explicitly: forward on row 0's first 50 tokens, last position == decode step 50 - n0 - 1
    n0 = int(lengths[0])
    prefix = np.asarray(d.forward(config, variables, np.asarray([seqs[0][:50]], np.int32)))[0, -1]
    np.testing.assert_allclose(step_logits[0, 50 - n0 - 1], prefix, atol=LOGIT_TOL, rtol=0)


# ---------------------------------------------------------------- 2. cache contents


def test_cache_holds_latent_and_rotated_key_only(decoded):
    config, variables, cache = decoded["config"], decoded["variables"], decoded["cache"]
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]}
    stacks = {"dense_layers": config.num_dense_layers, "moe_layers": config.num_moe_layers}
    expected = {}
    for stack, count in stacks.items():
        expected[f"['{stack}']['layers']['attn']['ckv']"] = (count, 2, CACHE_LEN, config.kv_lora_rank)
        expected[f"['{stack}']['layers']['attn']['kpe']"] = (count, 2, CACHE_LEN, config.qk_rope_head_dim)
    assert {k: tuple(v.shape) for k, v in leaves.items()} == expected
    per_token_per_layer = sum(int(np.prod(v.shape)) for v in leaves.values()) // (
        2 * CACHE_LEN * config.num_hidden_layers)
    assert per_token_per_layer == config.kv_lora_rank + config.qk_rope_head_dim == 24

    # Layer 0's slots hold exactly rms_norm(c_kv) and the rotated k_pe of the token at that position.
    p = variables["params"]["dense_layers"]["layers"]
    attn = {k: np.asarray(v[0]) for k, v in p["attn"].items()}
    ckv_cache = np.asarray(cache["dense_layers"]["layers"]["attn"]["ckv"][0])
    kpe_cache = np.asarray(cache["dense_layers"]["layers"]["attn"]["kpe"][0])
    for b, seq in enumerate(decoded["seqs"]):
        live = len(seq)  # every token of seq was fed (prefill or a decode step)
        tokens = np.asarray(seq[:live])
        x = rms_norm(np.asarray(variables["params"]["embed_tokens"])[tokens], np.asarray(p["attn_norm"]["scale"][0]),
                     config.rms_norm_eps)
        kv = np.asarray(x) @ attn["wkv_a"]
        ckv = rms_norm(kv[:, : config.kv_lora_rank], attn["kv_norm"], config.rms_norm_eps)
        cos, sin = rotary_tables(config, np.arange(live))
        kpe = apply_rotary(kv[:, config.kv_lora_rank:], cos, sin)
        np.testing.assert_allclose(ckv_cache[b, :live], ckv, atol=1e-5, rtol=0)
        np.testing.assert_allclose(kpe_cache[b, :live], kpe, atol=1e-5, rtol=0)
        assert not ckv_cache[b, live:].any() and not kpe_cache[b, live:].any()  # untouched slots stay zero


def test_671b_cache_is_576_values_per_token_per_layer():
    config = d.ModelConfig.from_preset("deepseek-v3-671b")
    shapes = jax.eval_shape(lambda key: d.Transformer(config, cache_len=8).init(key, jnp.zeros((1, 1), jnp.int32)),
                            jax.random.key(0))[CACHE_COLLECTION]
    leaves = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert leaves == {
        "['dense_layers']['layers']['attn']['ckv']": (3, 1, 8, 512),
        "['dense_layers']['layers']['attn']['kpe']": (3, 1, 8, 64),
        "['moe_layers']['layers']['attn']['ckv']": (58, 1, 8, 512),
        "['moe_layers']['layers']['attn']['kpe']": (58, 1, 8, 64),
    }
    values = sum(int(np.prod(s)) for s in leaves.values())
    assert values == 61 * 8 * 576
    assert config.kv_lora_rank + config.qk_rope_head_dim == 576
    # a per-head K/V cache would hold H·(N+R+V) values per token per layer
    per_head = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    assert per_head == 40960 and per_head / 576 > 70


# ---------------------------------------------------------------- 3. greedy parity with HF generate


@pytest.mark.parametrize("name", HF_NAMES)
def test_greedy_matches_hf_generate(hf_models, name):
    model, config, variables, _ = hf_models[name]
    ours = d.generate(config, variables, HF_PROMPTS, NEW, stop_ids=()).tokens
    _not_flat(ours)
    with torch.no_grad():
        singles = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in HF_PROMPTS]
        width = max(map(len, HF_PROMPTS))  # HF batched: left padded with an attention mask
        ids = torch.tensor([[0] * (width - len(p)) + p for p in HF_PROMPTS])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in HF_PROMPTS])
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[:, width:].tolist()
    assert all(len(row) == NEW for row in ours)
    assert ours == singles
    assert ours == batched


# ---------------------------------------------------------------- 4. speculative decoding


def test_speculative_equals_greedy_random_weights(spec_random, spec_greedy):
    variables, prompts = spec_random
    _not_flat(spec_greedy)
    spec = d.generate(SPEC, variables, prompts, NEW, stop_ids=(), speculative=True)
    print(f"random MTP: acceptance {spec.acceptance_rate:.3f} ({spec.accepted}/{spec.drafted})")
    assert spec.tokens == spec_greedy
    assert spec.drafted > 0 and 0 <= spec.accepted <= spec.drafted


@pytest.fixture(scope="module")
def trained():
    """SPEC trained on a period-8 token cycle until main model and MTP both predict it."""
    tc = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=5)
    optimizer = make_optimizer(tc)
    state = init_state(d.init_variables(SPEC, 2), optimizer)
    rs = np.random.RandomState(0)
    pattern = rs.choice(np.arange(2, SPEC.vocab_size), 8, replace=False)
    cycle = np.tile(pattern, 8)

    def batch():
        seqs = np.stack([cycle[o: o + tc.seq_len + 1] for o in rs.randint(0, 8, tc.batch_size)]).astype(np.int32)
        return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}

    step = jit_train_step(make_train_step(SPEC, tc, optimizer))
    # Same traced step, compiled without LLVM optimisation: halves the compile (the test's largest cost).
    step = step.lower(state, batch()).compile(compiler_options={"xla_backend_optimization_level": 0})
    for _ in range(tc.steps):
        state, metrics = step(state, batch())
    assert float(metrics["ce"]) < 0.05 and float(metrics["mtp"][0]) < 0.05, metrics
    variables = {"params": state.params, "router": state.router}
    prompts = [cycle[:5].tolist(), cycle[3:14].tolist(), cycle[6:9].tolist()]
    return variables, prompts, pattern


def test_speculative_equals_greedy_with_trained_mtp(trained):
    variables, prompts, pattern = trained
    greedy = d.generate(SPEC, variables, prompts, NEW, stop_ids=()).tokens
    spec = d.generate(SPEC, variables, prompts, NEW, stop_ids=(), speculative=True)
    print(f"trained MTP: acceptance {spec.acceptance_rate:.3f} ({spec.accepted}/{spec.drafted})")
    assert spec.tokens == greedy
    # the model learned the cycle: each row continues it
    for prompt, row in zip(prompts, greedy, strict=True):
        start = int(np.flatnonzero(pattern == prompt[-1])[0]) + 1
        assert row == [int(pattern[(start + i) % 8]) for i in range(NEW)]
    assert spec.acceptance_rate > 0.5
    # 24 tokens for 3 rows took fewer verify steps than plain decoding's 23 per row
    assert spec.drafted < 3 * (NEW - 1)


def test_speculative_stop_tokens_match_greedy(trained):
    variables, prompts, pattern = trained
    greedy = d.generate(SPEC, variables, prompts, NEW, stop_ids=()).tokens
    stop = int(pattern[5])
    spec = d.generate(SPEC, variables, prompts, NEW, stop_ids=(stop,), speculative=True)
    expected = [_truncate_at_stop(row, (stop,)) for row in greedy]
    assert spec.tokens == expected
    # row 0 stops on the prefill token, row 1 on the first token of a verify step, row 2 on an accepted draft
    assert [len(row) for row in expected] == [1, 8, 5]


# ---------------------------------------------------------------- 5. sampling


def test_sampling_seeded_and_degenerate_settings_equal_greedy(spec_random, spec_greedy):
    variables, prompts = spec_random
    a = d.generate(SPEC, variables, prompts, NEW, 1.0, seed=1, stop_ids=()).tokens
    b = d.generate(SPEC, variables, prompts, NEW, 1.0, seed=1, stop_ids=()).tokens
    c = d.generate(SPEC, variables, prompts, NEW, 1.0, seed=2, stop_ids=()).tokens
    assert a == b
    assert a != c and all(ra != rc for ra, rc in zip(a, c, strict=True))
    assert a != spec_greedy
    assert d.generate(SPEC, variables, prompts, NEW, 1.0, top_k=1, seed=3, stop_ids=()).tokens == spec_greedy
    assert d.generate(SPEC, variables, prompts, NEW, 1.0, top_p=1e-6, seed=3, stop_ids=()).tokens == spec_greedy


def test_sample_logits_respects_top_k_and_top_p():
    rs = np.random.RandomState(0)
    logits = rs.randn(40).astype(np.float32) * 2
    batch = jnp.asarray(np.broadcast_to(logits, (4000, 40)))
    order = np.argsort(-logits)
    drawn = np.asarray(sample_logits(batch, jax.random.key(0), Sampling(1.0, top_k=5)))
    assert set(drawn.tolist()) == set(order[:5].tolist())  # never outside the top 5, and each of them drawn
    probs = np.exp(logits - logits.max())
    probs = np.sort(probs / probs.sum())[::-1]
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.6) + 1)  # smallest set with mass >= 0.6
    drawn = np.asarray(sample_logits(batch, jax.random.key(1), Sampling(1.0, top_p=0.6)))
    assert set(drawn.tolist()) == set(order[:nucleus].tolist())
    drawn = np.asarray(sample_logits(batch, jax.random.key(2), Sampling(0.5, top_k=3, top_p=0.9)))
    assert set(drawn.tolist()) <= set(order[:3].tolist())
    np.testing.assert_array_equal(sample_logits(batch, jax.random.key(3), Sampling()), np.full(4000, order[0]))


def test_top_p_zero_keeps_the_top_token(spec_random):
    logits = jnp.asarray([[0.0, 1.0, 5.0, 2.0]])
    assert int(sample_logits(logits, jax.random.key(0), Sampling(1.0, top_p=0.0))[0]) == 2
    variables, _ = spec_random
    for kwargs, message in [(dict(top_p=0.0), "top_p"), (dict(top_k=SPEC.vocab_size + 1), "top_k"),
                            (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(d.InputError, match=message):
            d.generate(SPEC, variables, [1, 2, 3], 2, **kwargs)


# ---------------------------------------------------------------- 6. stop tokens


def test_stop_tokens_per_row(spec_random, spec_greedy):
    variables, prompts = spec_random
    assert all(len(row) == NEW for row in spec_greedy)  # max_new_tokens respected without stops
    # a stop id that row 0 produces mid-way and some other row never produces
    stop = next(t for t in spec_greedy[0][3:] if any(t not in row for row in spec_greedy[1:]))
    got = d.generate(SPEC, variables, prompts, NEW, stop_ids=(stop,)).tokens
    expected = [_truncate_at_stop(row, (stop,)) for row in spec_greedy]
    assert got == expected
    assert got[0][-1] == stop and len(got[0]) < NEW
    assert any(len(row) == NEW and stop not in row for row in got)  # that row kept going to max_new_tokens


# ---------------------------------------------------------------- 7. bad input


def test_bad_input_raises_input_error(spec_random, hf_models):
    variables, _ = spec_random
    cases = [
        (dict(prompt_ids=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompt_ids=[]), "no prompts"),
        (dict(prompt_ids=[[1, -3]]), "token id -3"),
        (dict(prompt_ids=[[1, SPEC.vocab_size]]), f"token id {SPEC.vocab_size}"),
        (dict(prompt_ids=[1] * 100, max_new_tokens=29), "max_position_embeddings=128"),
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(max_new_tokens=-2), "max_new_tokens must be > 0"),
        (dict(speculative=True, temperature=0.7), "speculative"),
    ]
    for overrides, message in cases:
        kwargs = {"prompt_ids": [[1, 2, 3]], "max_new_tokens": 4, **overrides}
        with pytest.raises(d.InputError, match=message):
            d.generate(SPEC, variables, **kwargs)
    other = dataclasses.replace(SPEC, hidden_size=32)
    names_tensor = r"variables do not match the config: params\['\w+'\].* has shape \(.*64.*\), config expects"
    with pytest.raises(d.InputError, match=names_tensor):
        d.generate(other, variables, [1, 2, 3], 4)
    no_mtp = dataclasses.replace(SPEC, num_nextn_predict_layers=0)
    with pytest.raises(d.InputError, match="MTP"):
        d.generate(no_mtp, variables, [1, 2, 3], 4, speculative=True)
    _, hf_config, hf_variables, _ = hf_models["yarn_groups_bias"]  # HF checkpoints carry no MTP layer
    with pytest.raises(d.InputError, match=r"mtp_0.*missing"):
        d.generate(hf_config, hf_variables, [1, 2, 3], 4, speculative=True)


def test_numpy_prompt_is_accepted(spec_random):
    variables, _ = spec_random
    one = d.generate(SPEC, variables, np.asarray([1, 2, 3]), 2, stop_ids=()).tokens
    assert one == d.generate(SPEC, variables, [1, 2, 3], 2, stop_ids=()).tokens
    two = d.generate(SPEC, variables, np.asarray([[1, 2, 3], [4, 5, 6]]), 2, stop_ids=()).tokens
    assert len(two) == 2 and two[0] == one[0]


# ---------------------------------------------------------------- 8. CLI


def test_cli_generate_prints_ids(tmp_path, capsys):
    config = dataclasses.replace(SPEC, num_nextn_predict_layers=0)
    model = build_hf_model(config, seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(WEIGHT_SCALE)
    model.save_pretrained(tmp_path)
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    ids = [int(t) for t in printed.split(",")]
    assert len(ids) == 5 and all(0 <= t < config.vocab_size for t in ids)
    loaded_config, variables = load_hf_directory(tmp_path)
    assert ids == d.generate(loaded_config, variables, [1, 2, 3], 5).tokens[0]


@pytest.mark.parametrize("preset", ["spec", "tiny"])
def test_bfloat16_batched_decode_runs_and_equals_one_prompt_at_a_time(spec_random, preset):
    """A bfloat16 model decoding 3 prompts at once: its attention core's batched bf16 dots failed at run time on
    the CPU ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32") until `quant.matmul.dot_f32`
    widened them; each row's tokens equal that prompt decoded alone (the rows never mix). "tiny" decodes through
    two MoE layers (their combines go through dot_f32 too)."""
    variables, prompts = spec_random
    config = SPEC if preset == "spec" else d.ModelConfig.from_preset("tiny")
    if preset == "tiny":
        variables = _scale_params(d.init_variables(config, 1), WEIGHT_SCALE)
    config = dataclasses.replace(config, dtype="bfloat16")
    batched = d.generate(config, variables, prompts, 4, stop_ids=()).tokens
    alone = [d.generate(config, variables, [p], 4, stop_ids=()).tokens[0] for p in prompts]
    assert batched == alone
    _not_flat(batched)


def test_dot_f32_equals_the_float32_product_of_bf16_values():
    """dot_f32 of bf16 operands equals the float32 product of the same (bf16) values: exact products, float32
    accumulation; the batched form XLA:CPU cannot run in bf16 (see above) is among the shapes."""
    from dsv3_jax.quant.matmul import dot_f32

    rs = np.random.RandomState(0)
    for eq, a_shape, b_shape in (("bhts,bsu->bthu", (3, 4, 1, 40), (3, 40, 16)), ("mk,kn->mn", (8, 32), (32, 16))):
        a, b = (jnp.asarray(rs.randn(*s), jnp.bfloat16) for s in (a_shape, b_shape))
        got = jax.jit(lambda a, b, eq=eq: dot_f32(eq, a, b))(a, b)
        want = np.einsum(eq, np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
