"""The accuracy harness: GGUF conversion helpers and the KV methods inside HF attention."""

import numpy as np
import pytest
import torch

from sglang_sawint4.eval.gguf_model import hf_name, unpermute_qk
from sglang_sawint4.eval.kv_methods import KVMethod, install, standard_methods


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the direction we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (2, 128)])
def test_unpermute_inverts_llama_cpp(n_head, head_dim):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, 40)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)


def test_tensor_names():
    assert hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"


def test_standard_methods_cover_every_dividing_block():
    names = [(m.name, m.block, m.rotate) for m in standard_methods(64)]
    assert ("int4-bdr", 16, "k") in names and ("int4-bdr", 64, "k") in names and ("int4-bdr", 64, "kv") in names
    assert ("int4-bdr", 128, "k") not in names
    assert names[:4] == [("bf16", None, None), ("fp8_e4m3", None, None), ("int4", None, None), ("kivi", None, None)]


def test_methods_quantize_per_token_per_head(rng):
    k = torch.randn(1, 3, 50, 64, generator=rng)
    v = torch.randn(1, 3, 50, 64, generator=rng)
    assert KVMethod("bf16").apply(k, v)[0] is k
    for m in (KVMethod("int4"), KVMethod("int4-bdr", 32, "kv"), KVMethod("fp8_e4m3"), KVMethod("kivi")):
        kh, vh = m.apply(k, v)
        assert kh.shape == k.shape and kh.dtype == k.dtype
        err = ((kh - k).norm() / k.norm()).item()
        assert 0 < err < 0.15, (m, err)


def test_install_routes_hf_attention_through_the_method():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    seen = []
    current = {"m": KVMethod("bf16")}
    install(model, lambda: current["m"], lambda layer, k, kh: seen.append(layer))
    with torch.no_grad():
        same = model(ids).logits
        current["m"] = KVMethod("int4")
        quant = model(ids).logits
    assert torch.allclose(same, ref, atol=1e-5)
    assert not torch.allclose(quant, ref, atol=1e-4)
    assert seen[:2] == [0, 1]


def test_per_channel_keys_handle_outlier_channels(rng):
    """A channel offset that is constant over tokens costs per-token INT4 dearly, per-channel nothing."""
    from helpers import keys_with_outliers

    from sglang_sawint4.eval.kv_methods import per_channel_int4

    k = keys_with_outliers(200, 2, 64, rng).transpose(0, 1)[None]  # [1, heads, tokens, dim]
    per_channel = ((per_channel_int4(k, 128) - k).norm() / k.norm()).item()
    per_token = ((KVMethod("int4").apply(k, k)[0] - k).norm() / k.norm()).item()
    assert per_channel < 0.5 * per_token
