"""The KV policy: its decision rule, capacity budget, files, TP slicing and resolution, and the
calibration measurements it decides from (tiny random-weight models, CPU)."""

import json
import math
import os

import pytest
import torch

from helpers import tiny_llama
from sglang_sawint4 import calibration as cal
from sglang_sawint4 import format as fmt
from sglang_sawint4 import policy as pol
from sglang_sawint4.policy import KVPolicy, ModelFacts, PolicyError


def _record(errors, kls=None, kl_full=None, head_dim=64, heads=2, method="int4-bdr"):
    """A calibration record: per-layer attention errors {block: (plain, centered)}, per-layer
    KLs quantized alone (default 0.002 each), full-model KL per block (default: equal)."""
    kls = kls or [0.002] * len(errors)
    layers = {l: cal.LayerRecord({b: tuple(e) for b, e in errs.items()}, torch.full((heads, head_dim), float(l)),
                                 kls[l]) for l, errs in enumerate(errors)}
    blocks = sorted(errors[0], reverse=True)
    kl_full = kl_full or {b: 0.05 for b in blocks}
    best = min(kl_full.values())
    kl_block = max(b for b, v in kl_full.items() if v <= best * (1 + cal.BLOCK_KL_TIE))
    return cal.CalibrationRecord("m", "LlamaForCausalLM", len(errors), heads, head_dim, method, "k", False, 2048,
                                 32768, "rope-average", "cpu", 1.0, layers, kl_full, kl_block)


def _typical(n, plain=0.2, centered=0.19):
    return [{16: (plain + 0.02, centered + 0.02), 32: (plain, centered), 64: (plain + 0.01, centered + 0.01)}
            for _ in range(n)]


def test_a_layer_whose_kl_is_an_outlier_keeps_bf16_and_centering_goes_where_it_helps():
    errors = _typical(24)
    errors[3] = {16: (0.6, 0.12), 32: (0.5, 0.11), 64: (0.55, 0.1)}  # fixed by centering
    errors[5] = {16: (0.2, 0.2), 32: (0.2, 0.2), 64: (0.2, 0.2)}  # centering gains nothing
    kls = [0.002] * 24
    kls[0] = 0.05  # quantized alone, layer 0 moves the output most
    p = pol.decide(_record(errors, kls, {64: 0.06, 32: 0.05, 16: 0.07}))
    assert p.bf16_layers == (0,)
    assert 3 in p.key_centers and 5 not in p.key_centers and 0 not in p.key_centers
    assert p.block_size == 32  # the lowest end-to-end KL
    assert p.capacity_vs_bf16() >= pol.MIN_CAPACITY_VS_BF16
    assert "L0 KL 0.0500" in p.reasons["bf16"]
    assert torch.equal(p.key_centers[3], torch.full((2, 64), 3.0))


def test_no_outlier_no_bf16_layer_and_near_ties_take_the_larger_block():
    errors = [{16: (0.2, 0.2), 32: (0.2, 0.2), 64: (0.2, 0.2)} for _ in range(10)]
    p = pol.decide(_record(errors, kl_full={64: 0.0505, 32: 0.05, 16: 0.06}))
    assert p.bf16_layers == () and p.block_size == 64 and not p.key_centers
    # small KLs are no outliers however they compare with the median
    kls = [0.0001] * 10
    kls[2] = 0.9 * pol.BF16_MIN_KL
    assert pol.decide(_record(errors, kls)).bf16_layers == ()


def test_bf16_layers_stop_at_the_capacity_floor():
    kls = [0.002] * 24
    kls[:3] = [0.2, 0.1, 0.15]
    p = pol.decide(_record(_typical(24), kls))
    assert p.bf16_layers == (0,)  # head_dim 64, 24 layers: one BF16 layer keeps 3.21x, two would be 2.93x
    assert pol.bf16_layer_budget(ModelFacts(24, 2, 64), fmt.Int4Format(64, 32), 3.0) == 1
    assert pol.bf16_layer_budget(ModelFacts(28, 2, 128), fmt.Int4Format(128, 128), 3.0) == 2
    assert pol.bf16_layer_budget(ModelFacts(18, 1, 256), fmt.Int4Format(256, 128), 3.0) == 1
    p28 = pol.decide(_record(_typical(28), [0.2, 0.1, 0.15] + [0.002] * 25))
    assert p28.bf16_layers == (0, 2)  # the two largest, within 3.0x at head_dim 64 and 28 layers


def test_overrides_pin_block_and_bf16_layers():
    errors = _typical(8)
    p = pol.decide(_record(errors), block=16, bf16_layers=[5, 2])
    assert p.block_size == 16 and p.bf16_layers == (2, 5)
    assert 2 not in p.key_centers and 5 not in p.key_centers
    with pytest.raises(PolicyError, match="block 128 was not calibrated"):
        pol.decide(_record(errors), block=128)


def test_plain_int4_method_has_one_candidate():
    rec = _record([{0: (0.3, 0.2)} for _ in range(4)], method="int4")
    p = pol.decide(rec)
    assert p.block_size is None and p.layout() == fmt.Int4Format(64) and len(p.key_centers) == 4


def test_capacity_and_bytes_follow_the_layers():
    facts = ModelFacts(28, 2, 128)
    p = pol.plain_policy("int4-bdr", facts, 128, bf16_layers=(0,))
    assert p.bytes_per_token() == 2 * (27 * 136 + 512)
    assert p.bf16_bytes_per_token() == 2 * 28 * 512
    assert math.isclose(p.capacity_vs_bf16(), 28 * 512 / (27 * 136 + 512))
    assert p.bytes_per_token(range(14, 28), 1) == 14 * 136  # a pipeline stage's layers, one head


def test_policy_file_round_trip_and_content_named_files(tmp_path):
    rec = _record(_typical(4))
    p = pol.decide(rec, bf16_layers=[1])
    path = p.save_in(str(tmp_path))
    q = KVPolicy.load(path)
    assert q == p and set(q.key_centers) == set(p.key_centers)
    assert all(torch.equal(q.key_centers[l], p.key_centers[l]) for l in p.key_centers)
    assert p.save_in(str(tmp_path)) == path  # same content, same file
    assert json.loads(open(path).read())["version"] == pol.POLICY_VERSION


def test_policy_refuses_what_does_not_fit_the_model():
    facts = ModelFacts(4, 2, 64)
    with pytest.raises(PolicyError, match="outside the model's 4 layers"):
        pol.plain_policy("int4-bdr", facts, bf16_layers=(4,))
    with pytest.raises(PolicyError, match="both BF16 and centered"):
        KVPolicy("int4-bdr", facts, 64, bf16_layers=(1,), key_centers={1: torch.zeros(2, 64)})
    with pytest.raises(PolicyError, match="key center of layer 1 has shape"):
        KVPolicy("int4-bdr", facts, 64, key_centers={1: torch.zeros(1, 64)})
    with pytest.raises(PolicyError, match="does not divide"):
        KVPolicy("int4-bdr", ModelFacts(4, 2, 64), 128)


@pytest.mark.parametrize("total,tp,expected", [
    (8, 1, [list(range(8))]), (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]), (2, 2, [[0], [1]]),
    (2, 4, [[0], [0], [1], [1]]), (1, 2, [[0], [0]]),
])
def test_rank_kv_heads_follow_sglangs_sharding(total, tp, expected):
    p = pol.plain_policy("int4-bdr", ModelFacts(2, total, 64), 64)
    assert [p.rank_kv_heads(r, tp) for r in range(tp)] == expected
    c = torch.arange(total * 64, dtype=torch.float32).view(total, 64)
    centered = KVPolicy("int4-bdr", ModelFacts(2, total, 64), 64, key_centers={1: c})
    for r in range(tp):
        assert torch.equal(centered.rank_key_centers(r, tp)[1], c[expected[r]])


def test_fallback_keeps_layer_zero_when_capacity_allows():
    p = pol.fallback_policy("int4-bdr", ModelFacts(24, 2, 64), why="no weights")
    assert p.bf16_layers == (0,) and not p.key_centers and p.block_size == 64
    assert "fallback without calibration (no weights)" in p.source
    # with a capacity floor no BF16 layer fits, none is kept
    assert pol.fallback_policy("int4-bdr", ModelFacts(24, 2, 64), min_capacity=3.5).bf16_layers == ()


def test_resolve_auto_falls_back_with_the_reason_when_calibration_fails(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    monkeypatch.setenv(pol.ENV_CACHE_DIR, str(tmp_path / "cache"))
    facts = ModelFacts(24, 2, 64)
    p = pol.resolve_policy("auto", str(model), facts, "int4-bdr")
    assert p.bf16_layers == (0,) and p.source.startswith("auto: fallback without calibration (")
    assert pol.resolve_policy("auto", str(model), facts, "int4-bdr", bf16_layers=(2,)).bf16_layers == (2,)
    none = pol.resolve_policy("none", str(model), facts, "int4-bdr", block=32)
    assert none.bf16_layers == () and none.block_size == 32 and not none.key_centers


def test_resolve_auto_calibrates_once_and_caches(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _record(_typical(6)).save(cmd[cmd.index("--out") + 1])
        return type("P", (), {"returncode": 0, "stderr": "", "stdout": ""})()

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setenv(pol.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(pol.subprocess, "run", fake_run)
    facts = ModelFacts(6, 2, 64)
    first = pol.resolve_policy("auto", str(model), facts, "int4-bdr")
    second = pol.resolve_policy("auto", str(model), facts, "int4-bdr")
    assert len(calls) == 1 and first.replace(source="") == second.replace(source="") and "cached at" in second.source
    assert calls[0][1:4] == ["-m", "sglang_sawint4.policy", "calibrate"]
    # another weight file is another model: calibrated again
    (model / "model.safetensors").write_bytes(b"x" * 11)
    pol.resolve_policy("auto", str(model), facts, "int4-bdr")
    assert len(calls) == 2
    # a record that does not match config.json's shape is not used
    mismatched = pol.resolve_policy("auto", str(model), ModelFacts(7, 2, 64), "int4-bdr")
    assert "fallback" in mismatched.source and "config.json says" in mismatched.source


def test_served_policy_reads_the_launchers_file_and_checks_it(tmp_path, monkeypatch):
    from sglang_sawint4.config import ENV_POLICY_FILE, KVQuantConfig

    facts = ModelFacts(6, 2, 64)
    config = KVQuantConfig("int4-bdr")
    monkeypatch.delenv(ENV_POLICY_FILE, raising=False)
    assert pol.served_policy(config, facts).bf16_layers == ()  # no launcher: the configured format
    path = pol.plain_policy("int4-bdr", facts, 32, bf16_layers=(0,)).save_in(str(tmp_path))
    monkeypatch.setenv(ENV_POLICY_FILE, path)
    assert pol.served_policy(config, facts).bf16_layers == (0,)
    with pytest.raises(PolicyError, match="was made for"):
        pol.served_policy(config, ModelFacts(7, 2, 64))
    with pytest.raises(PolicyError, match="the server runs int4 "):
        pol.served_policy(KVQuantConfig("int4"), facts)


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def _rope(d, positions, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()


def test_rope_average_center_is_the_mean_of_the_rotated_constant():
    d, n = 64, 500
    cos, sin = _rope(d, n)
    m = torch.randn(2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rotated = cal.rotate_half_rope(m[:, None, :].expand(2, n, d), cos, sin)  # R(p) m for every p
    center = cal.center_from_pre_rope(m, *cal.rope_average(cos, sin))
    assert torch.allclose(center.double(), rotated.mean(1), atol=1e-5)
    # fast pairs average out, the slowest keep their constant
    assert center[:, 0].abs().max() < 0.05 * m[:, 0].abs().max() + 1e-3
    assert torch.allclose(center[:, d // 2 - 1].double(), m[:, d // 2 - 1], rtol=0.1)


def test_attention_error_is_zero_for_exact_kv_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    pos = cal.query_positions(64)
    exact = cal.causal_attention(q[:, pos], k, v, pos, 0.2)
    assert cal.rel_error(exact, exact) == 0
    noisy = cal.causal_attention(q[:, pos], k + 0.3 * torch.randn(k.shape, generator=g), v, pos, 0.2)
    assert 0 < cal.rel_error(noisy, exact) < 1
    windowed = cal.causal_attention(q[:, pos], k, v, pos, 0.2, window=4)
    assert cal.rel_error(windowed, exact) > 0.01


class _ByteTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [b % 60 + 2 for b in text.encode()]}


def test_mean_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(5, 11, generator=torch.Generator().manual_seed(0)), -1)
    assert cal.mean_kl(logp, logp) == pytest.approx(0, abs=1e-7)
    other = torch.log_softmax(logp + 0.3 * torch.randn(5, 11, generator=torch.Generator().manual_seed(1)), -1)
    expected = sum((logp[i].exp() * (logp[i] - other[i])).sum().item() for i in range(5)) / 5
    assert cal.mean_kl(logp, other) == pytest.approx(expected)


def test_calibration_finds_and_removes_a_bias_like_constant():
    """A tiny Llama whose layer-0 keys carry a large constant in slowly turning RoPE pairs:
    the calibration measures the damage, the RoPE-average center removes it."""
    model = tiny_llama(64, 128, 64, num_hidden_layers=2)
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight *= 20  # peaked attention, as trained models have: key content matters
        attn.k_proj.weight *= 20
    without_bias = cal.calibrate(model, _ByteTokenizer(), "int4-bdr", tokens=256,
                                 sensitivity_tokens=64).layers[0].errors[64][0]
    with torch.no_grad():
        attn.k_proj.bias = torch.nn.Parameter(torch.zeros(64))
        # the slowest RoPE pair: channels 31 and 63 (rotate_half pairs i and i + 32)
        attn.k_proj.bias[[31, 63]] = torch.tensor([60.0, -45.0])
    rec = cal.calibrate(model, _ByteTokenizer(), "int4-bdr", tokens=256, sensitivity_tokens=128)
    assert rec.center_source == "rope-average" and rec.num_layers == 2 and rec.tokens == 256
    # end to end: every block measured, the chosen one among them, each layer's KL positive
    assert set(rec.kl_full) == {16, 32, 64} and rec.kl_block in rec.kl_full
    assert all(r.kl > 0 for r in rec.layers.values())
    plain, centered = rec.layers[0].errors[64]
    # the constant costs accuracy; centered, the layer is as good as without it
    assert plain > 1.3 * without_bias and centered < 1.1 * without_bias, (plain, centered, without_bias)
    assert rec.layers[0].center[0, 31] > 30 and rec.layers[0].center[0, 63] < -20
    again = cal.CalibrationRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert again.layers[0].errors == rec.layers[0].errors and torch.equal(again.layers[1].center, rec.layers[1].center)
    assert again.kl_full == rec.kl_full and again.layers[1].kl == rec.layers[1].kl
    # the model's own attention is back afterwards
    assert model.config._attn_implementation != "sawint4_calibration"


def test_calibration_candidates_per_method():
    assert cal.candidate_blocks("int4", 128) == [None]
    assert cal.candidate_blocks("int4-bdr", 64) == [16, 32, 64]
    assert cal.candidate_blocks("int4-bdr", 256) == [16, 32, 64, 128]


def test_calibration_text_ships_with_the_package():
    text = cal.calibration_text()
    assert "Dashwood" in text and "def topological_order" in text and len(text) > 6000
    assert os.path.dirname(cal.__file__) in str(cal.files("sglang_sawint4") / "data")


def test_calibration_is_deterministic_for_a_model():
    model = tiny_llama(64, 128, 64, num_hidden_layers=2)
    first = cal.calibrate(model, _ByteTokenizer(), "int4-bdr", tokens=192, sensitivity_tokens=96).to_json()
    second = cal.calibrate(model, _ByteTokenizer(), "int4-bdr", tokens=192, sensitivity_tokens=96).to_json()
    for record in (first, second):
        record.pop("seconds")
    assert first == second


def test_qwen3_weights_calibrate_and_evaluate():
    """Qwen3 (q/k RMSNorm before RoPE, no bias): the calibration reads its keys after k_norm,
    reproduces its RoPE, and the harness serves the resulting policy."""
    import transformers

    from sglang_sawint4.eval.kv_methods import KVMethod, install

    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=4096)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    rec = cal.calibrate(model, _ByteTokenizer(), "int4-bdr", tokens=160, sensitivity_tokens=64)
    assert rec.center_source == "rope-average" and rec.architecture == "Qwen3ForCausalLM"
    policy = pol.decide(rec)
    current = {"m": KVMethod.from_policy(policy)}
    install(model, lambda: current["m"])
    with torch.no_grad():
        served = model(torch.arange(2, 40)[None]).logits
        current["m"] = KVMethod("bf16")
        exact = model(torch.arange(2, 40)[None]).logits
    assert torch.isfinite(served).all() and 0 < (served - exact).abs().max() < (exact.abs().max() + 1)


def test_bf16_layers_override_drops_their_centers():
    c = torch.ones(2, 64)
    p = KVPolicy("int4-bdr", ModelFacts(4, 2, 64), 64, key_centers={1: c, 2: c})
    q = p.with_bf16_layers([2, 0, 2])
    assert q.bf16_layers == (0, 2) and set(q.key_centers) == {1}
