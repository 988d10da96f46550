"""The served-accuracy comparison: the harness in served mode and the replay of served tokens."""


import pytest
import torch
from helpers import tiny_llama

from sglang_sawint4.eval.kv_methods import KVMethod, install
from sglang_sawint4.eval import served as served_accuracy


@pytest.fixture
def model():
    return tiny_llama(vocab_size=64, hidden_size=128, head_dim=64)


def test_served_prefill_quantizes_decode_steps_only(model):
    prompts = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    ref_prefill = model(prompts).logits
    _, ref_lp, _ = served_accuracy.decode_steps(model, prompts, steps=4)
    current = {"m": KVMethod("int4")}
    install(model, lambda: current["m"], served_prefill=True)
    with torch.no_grad():
        # the prefill attends to unquantized K/V, like SGLang's extend attention
        assert torch.allclose(model(prompts).logits, ref_prefill, atol=1e-5)
        _, lp, _ = served_accuracy.decode_steps(model, prompts, steps=4)
        # step 0 is the prefill's distribution; the decode steps read quantized K/V
        assert torch.allclose(lp[:, 0], ref_lp[:, 0], atol=1e-6)
        assert not torch.allclose(lp[:, 1:], ref_lp[:, 1:], atol=1e-4)
        # a several-token forward over a cached prefix is not what the mode models
        out = model(prompts, use_cache=True)
        with pytest.raises(ValueError, match="empty cache"):
            model(prompts[:, :2], past_key_values=out.past_key_values)


def test_replay_of_the_harness_own_continuations_matches_exactly(model):
    prompts = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"], served_prefill=True)
    served = {}
    for cfg in ("bf16", "int4", "int4-bdr-64"):
        current["m"] = served_accuracy.method_of(cfg)
        ids, lps, _ = served_accuracy.decode_steps(model, prompts, steps=12)
        served[cfg] = [{"ids": i.tolist(), "logprobs": lp.tolist()} for i, lp in zip(ids, lps)]
    out = served_accuracy.compare(model, prompts, served, current)
    for cfg, r in out.items():
        assert r["replay_logprob_mae"] < 1e-9 and r["replay_argmax_agree"] == 1.0, cfg
        assert r["served_agree_vs_bf16"] == r["harness_agree_vs_bf16"], cfg
        assert r["served_bf16_ppl"] == pytest.approx(r["harness_bf16_ppl"], rel=1e-9), cfg
    assert out["bf16"]["served_agree_vs_bf16"] == 1.0
    # a served token the harness would not have picked shows up in the replay
    served["int4"][0]["ids"][5] = (served["int4"][0]["ids"][5] + 1) % 64
    bad = served_accuracy.compare(model, prompts, {"bf16": served["bf16"], "int4": served["int4"]}, current)
    assert bad["int4"]["replay_argmax_agree"] < 1.0 and bad["int4"]["replay_logprob_mae"] > 1e-6


def test_bf16_inputs_control_rounds_before_the_method():
    k, v = torch.randn(1, 2, 5, 64, dtype=torch.float64), torch.randn(1, 2, 5, 64, dtype=torch.float64)
    kh, vh = served_accuracy.BF16Inputs(KVMethod("bf16")).apply(k, v)
    assert torch.equal(kh, k.bfloat16().double()) and torch.equal(vh, v.bfloat16().double())
    kq, _ = served_accuracy.BF16Inputs(KVMethod("int4")).apply(k, v)
    assert torch.equal(kq, KVMethod("int4").apply(k.bfloat16().double(), v)[0])


def test_method_of_configs():
    assert served_accuracy.method_of("int4-bdr-32") == KVMethod("int4-bdr", 32, "k")
    assert served_accuracy.method_of("int4") == KVMethod("int4")
    with pytest.raises(SystemExit):
        served_accuracy.method_of("fp8_e4m3")
