"""Gemma 3 GGUF conversion: weights, config and the SentencePiece-BPE tokenizer.

The tokenizer is checked against the sentencepiece library itself, given a model
built from the same vocabulary and scores: the reference implementation of the
algorithm the GGUF declares (tokenizer.ggml.model = llama).
"""

import gguf
import numpy as np
import pytest
import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 1, 32, 96
CONTROL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
USER_DEFINED = ["\n", "\n\n", "  ", "   "]  # Gemma's whitespace-run pieces are user-defined
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CHARS = list("\u2581abcdefghilnorstuwTHE.,")
# normal multi-character pieces, best (highest score) first
MERGED = ["\u2581t", "he", "\u2581the", "er", "in", "\u2581a", "\u2581w", "or", "\u2581wor", "ld",
          "\u2581world", "\u2581in", "th", "at", "\u2581that", "st", "\u2581s", "\u2581st", "\u2581sh", "\u2581sha",
          "ll", "\u2581shall", "TH", "THE"]


def vocabulary():
    """(tokens, scores, llama.cpp token types) in id order, laid out like Gemma's."""
    tokens = CONTROL_TOKENS + USER_DEFINED + BYTES + MERGED + CHARS
    scores = ([-1000.0] * (len(CONTROL_TOKENS) + len(USER_DEFINED)) + [0.0] * 256
              + [-float(i) for i in range(len(MERGED) + len(CHARS))])
    types = [3] * len(CONTROL_TOKENS) + [4] * len(USER_DEFINED) + [6] * 256 + [1] * (len(MERGED) + len(CHARS))
    return tokens, scores, types


def write_tiny_gemma_gguf(path):
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
              "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    # llama.cpp writes Gemma's norm weights as 1 + w
    norms = {"output_norm.weight": HIDDEN, "blk.0.attn_norm.weight": HIDDEN, "blk.0.post_attention_norm.weight": HIDDEN,
             "blk.0.ffn_norm.weight": HIDDEN, "blk.0.post_ffw_norm.weight": HIDDEN,
             "blk.0.attn_q_norm.weight": HEAD_DIM, "blk.0.attn_k_norm.weight": HEAD_DIM}
    written = {}
    for name, shape in shapes.items():
        written[name] = rng.standard_normal(shape).astype(np.float32)
    for name, size in norms.items():
        written[name] = (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)
    for name, t in written.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def sentencepiece_reference(path):
    """A sentencepiece BPE model over the same vocabulary (byte fallback, no dummy prefix)."""
    import sentencepiece as spm
    import google.protobuf  # noqa: F401 - sentencepiece reads its model with it
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = vocabulary()
    proto = pb.ModelProto()
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        # sentencepiece matches user-defined pieces in the escaped text (spaces as U+2581)
        piece.piece = t.replace(" ", "\u2581") if ty == 4 else t
        piece.score = s
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if t == "<unk>" else ty
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 3, 2, 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    path.write_bytes(proto.SerializeToString())
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from sglang_sawint4.eval.gguf_model import convert

    d = tmp_path_factory.mktemp("gemma")
    written = write_tiny_gemma_gguf(d / "m.gguf")
    cfg = convert(str(d / "m.gguf"), str(d / "out"))
    return d, written, cfg


def test_gemma3_weights_and_config(converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d, written, cfg = converted
    assert cfg["model_type"] == "gemma3_text" and cfg["head_dim"] == HEAD_DIM  # key_length, not hidden / heads
    assert cfg["layer_types"] == ["sliding_attention"] and cfg["sliding_window"] == 8
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    weights = load_file(str(d / "out" / "model.safetensors"))
    for gguf_name, hf_name in (("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight"),
                               ("blk.0.ffn_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight"),
                               ("blk.0.post_ffw_norm.weight", "model.layers.0.post_feedforward_layernorm.weight"),
                               ("output_norm.weight", "model.norm.weight")):
        # HF's Gemma3RMSNorm multiplies by (1 + w): the stored +1 is removed
        assert torch.allclose(weights[hf_name].float(), torch.from_numpy(written[gguf_name] - 1.0), atol=2e-3)
    assert torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"].float(),
                          torch.from_numpy(written["blk.0.attn_q.weight"]), atol=3e-2)  # no Llama row permutation
    model = AutoModelForCausalLM.from_pretrained(str(d / "out"), dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model(torch.tensor([[2, 300, 301]])).logits.shape == (1, 3, len(vocabulary()[0]))


@pytest.mark.parametrize("text", [
    "the world", "THE world shall", "that  is\n\nthe   st", "é ∑ unknown chars", "wor ld th at", " leading space",
    "hello\nworld", "sha shall shallow",
])
def test_gemma3_tokenizer_matches_sentencepiece(converted, tmp_path, text):
    from transformers import AutoTokenizer

    d, _, _ = converted
    reference = sentencepiece_reference(tmp_path / "ref.model")
    tok = AutoTokenizer.from_pretrained(str(d / "out"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text)
    assert tok(text)["input_ids"] == [2] + ids  # BOS first, as the GGUF asks (add_bos_token)
    assert tok.decode(ids) == text


def test_gemma3_merges_follow_scores():
    from sglang_sawint4.eval.gguf_model import sentencepiece_merges

    tokens, scores, types = vocabulary()
    merges = sentencepiece_merges(tokens, scores, types)
    # a merge ranks after the merges that build its parts ("h"+"e" before "\u2581t"+"he")
    assert merges.index(("h", "e")) < merges.index(("\u2581t", "he"))
    assert ("T", "HE") not in merges and ("TH", "E") in merges  # only splits into two normal pieces
    assert all(a + b not in USER_DEFINED + CONTROL_TOKENS for a, b in merges)


def test_vocabulary_a_bpe_cannot_reproduce_is_refused():
    from sglang_sawint4.eval.gguf_model import sentencepiece_merges

    tokens, scores, types = vocabulary()
    e = tokens.index("E")  # "THE" stays a piece, "E" becomes a byte-only character
    types = types[:e] + [6] + types[e + 1:]
    with pytest.raises(ValueError, match=r"\['E'\] occur in pieces"):
        sentencepiece_merges(tokens, scores, types)
