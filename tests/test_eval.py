"""The accuracy harness: GGUF conversion helpers and the KV methods inside HF attention."""

import numpy as np
import pytest
import torch
from helpers import tiny_gemma, tiny_llama

from sglang_sawint4.eval.gguf_model import hf_name, unpermute_qk
from sglang_sawint4.eval.kv_methods import KVMethod, final_hidden, install, logits_from_hidden, standard_methods


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
    model = tiny_llama(vocab_size=64, hidden_size=128, head_dim=64)
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


@pytest.mark.parametrize("query_chunk", [4096, 5])
def test_install_keeps_sliding_window_and_padding_masks(monkeypatch, query_chunk):
    """Without a mask function registered for our attention name transformers passes no
    mask at all: Gemma 3's sliding-window layers then saw every token, padded batches
    their padding.  With it, the unquantized method reproduces stock SDPA exactly, also
    when long prefills run a chunk of queries at a time (query_chunk 5)."""
    from sglang_sawint4.eval import kv_methods

    monkeypatch.setattr(kv_methods, "QUERY_CHUNK", query_chunk)
    gemma = tiny_gemma(32, ["sliding_attention", "full_attention"], sliding_window=4)
    llama = tiny_llama(vocab_size=64, hidden_size=128, head_dim=64)
    ids = torch.randint(1, 64, (1, 16))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)  # left padding, as batched generation does
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        ref = {"gemma": gemma(ids).logits, "llama": llama(ids).logits}
        for model in (gemma, llama):
            install(model, lambda: KVMethod("bf16"))
        assert torch.allclose(gemma(ids).logits, ref["gemma"], atol=1e-5)
        assert torch.allclose(llama(padded, attention_mask=mask).logits[:, 5:], ref["llama"], atol=1e-4)


def test_per_channel_keys_handle_outlier_channels(rng):
    """A channel offset that is constant over tokens costs per-token INT4 dearly, per-channel nothing."""
    from helpers import keys_with_outliers

    from sglang_sawint4.eval.kv_methods import per_channel_int4

    k = keys_with_outliers(200, 2, 64, rng).transpose(0, 1)[None]  # [1, heads, tokens, dim]
    per_channel = ((per_channel_int4(k, 128) - k).norm() / k.norm()).item()
    per_token = ((KVMethod("int4").apply(k, k)[0] - k).norm() / k.norm()).item()
    assert per_channel < 0.5 * per_token


def _write_tiny_gguf(path, n_head=2, n_kv=1, head_dim=64, hidden=128):
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["he", "hel", "hell", "hello"]
    merges = ["h e", "he l", "hel l", "hell o"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(96)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_k.weight": (n_kv * head_dim, hidden), "blk.0.attn_v.weight": (n_kv * head_dim, hidden),
              "blk.0.attn_output.weight": (hidden, n_head * head_dim), "blk.0.ffn_gate.weight": (96, hidden),
              "blk.0.ffn_up.weight": (96, hidden), "blk.0.ffn_down.weight": (hidden, 96)}
    w.add_tensor("blk.0.attn_q.weight", llama_cpp_permute(q, n_head))
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return q


def test_convert_tiny_gguf(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sglang_sawint4.eval.gguf_model import convert

    q = _write_tiny_gguf(tmp_path / "m.gguf")
    cfg = convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 64)
    assert cfg["tie_word_embeddings"] is True
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    # llama.cpp's q row permutation is undone (up to the bf16 rounding of storage)
    assert torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"].float(), torch.from_numpy(q), atol=2e-2)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    vocab = tok.get_vocab()
    ids = tok("hello 12", add_special_tokens=False)["input_ids"]
    # the merges make "hello" one token; digits are split one by one (SmolLM2's pre-tokenizer)
    assert ids == [vocab["hello"], vocab["Ġ"], vocab["1"], vocab["2"]]
    assert tok.decode(ids) == "hello 12"
    assert tok("<|im_start|>x", add_special_tokens=False)["input_ids"][0] == 1


def test_per_layer_policy_keeps_listed_layers_exact(rng):
    k = torch.randn(1, 2, 30, 64, generator=rng)
    m = KVMethod("int4-bdr", 64, "k", bf16_layers=(0, 3))
    assert m.apply(k, k, layer=3)[0] is k
    assert not torch.equal(m.apply(k, k, layer=1)[0], k)
    assert m.label == "int4-bdr-64-k[bf16:0,3]" and m.layer_policy == "[bf16:0,3]"


def test_kmeans_finds_separated_clusters():
    from sglang_sawint4.eval.kv_methods import fit_kmeans

    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in true])
    centers = fit_kmeans(x, 3)
    assert torch.cdist(true, centers).min(-1).values.max() < 0.1


def test_centroid_subtract_removes_constant_channels():
    """A per-channel constant (a k_proj bias) stretches every token's INT4 range; one
    calibrated centroid (C = 1, the mean) takes it out before quantization."""
    from sglang_sawint4.eval.kv_methods import Codebook, KVMethod, KVRecorder

    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 256, 64, generator=g)
    k[:, :, :, 5] += 200.0  # constant outlier channel, like Qwen2.5's biased keys
    rec = KVRecorder()
    rec.apply(k, k, layer=0)
    book = rec.codebook(1)
    assert isinstance(book, Codebook) and book.k[0].shape == (1, 128)
    err = lambda m: ((m.apply(k, k, 0)[0] - k).norm() / (k - k.mean(2, keepdim=True)).norm()).item()  # noqa: E731
    plain, kmeans = err(KVMethod("int4")), err(KVMethod("kmeans", clusters=1, codebook=book))
    assert kmeans < plain / 5, (plain, kmeans)
    assert KVMethod("kmeans", 64, "k", clusters=1, codebook=book).row_name == "kmeans-1"
    # methods with different cluster counts are different methods (results are grouped by method)
    assert KVMethod("kmeans", clusters=1, codebook=book) != KVMethod("kmeans", clusters=2,
                                                                      codebook=Codebook(2))
    with pytest.raises(ValueError, match="codebook"):
        KVMethod("kmeans", clusters=4, codebook=book)


def test_recorder_query_metric_is_the_group_second_moment():
    """GQA: query heads 0-2 belong to KV head 0, 3-5 to KV head 1; the metric's basis and
    scales rebuild each group's E[q q^T] + alpha * mean(eigenvalue) * I."""
    from sglang_sawint4.eval.kv_methods import KVRecorder

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 50, 8, generator=g) * torch.linspace(0.1, 3.0, 8)
    k = torch.randn(2, 2, 50, 8, generator=g)
    rec = KVRecorder()
    rec.apply(k, k, layer=4, query=q)
    metric = rec.query_metric(alpha=0.01)
    for head in range(2):
        qs = q[:, 3 * head: 3 * head + 3].reshape(-1, 8).double()
        moment = qs.T @ qs / len(qs)
        damped = moment + 0.01 * torch.linalg.eigvalsh(moment).mean() * torch.eye(8, dtype=torch.float64)
        u, s = metric.basis[4][head].double(), metric.scale[4][head].double()
        assert torch.allclose(u @ torch.diag(s ** 2) @ u.T, damped, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no queries"):
        KVRecorder().query_metric()


def test_hessian_method_cuts_the_score_error_where_queries_are_anisotropic():
    """Keys with an outlier channel the queries barely read, and queries concentrated on a
    few other channels: spending the INT4 range by query importance lowers the mean
    squared score error q.(k_hat - k) against plain BDR on the same keys."""
    from sglang_sawint4.eval.kv_methods import KVMethod, KVRecorder

    g = torch.Generator().manual_seed(3)
    d = 64
    k = torch.randn(1, 2, 512, d, generator=g)
    k[..., 7] *= 30.0  # outlier channel
    weights = torch.full((d,), 0.05)
    weights[:8] = torch.tensor([4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 1.0, 0.01])  # channel 7: never read
    q = torch.randn(1, 4, 512, d, generator=g) * weights
    rec = KVRecorder()
    rec.apply(k, k, layer=0, query=q)
    metric = rec.query_metric()

    def score_mse(m):
        k_hat = m.apply(k, k, 0)[0]
        qg = q.reshape(1, 2, 2, 512, d)
        return torch.einsum("bhgtd,bhsd->bhgts", qg, (k_hat - k)).pow(2).mean().item()

    bdr = score_mse(KVMethod("int4-bdr", 64, "k"))
    hessian = score_mse(KVMethod("hessian", 64, "k", metric=metric))
    assert hessian < bdr / 10, (bdr, hessian)  # measured: 27x lower
    # values are plain INT4 (K-only method), and a method without its metric is refused
    assert torch.equal(KVMethod("hessian", 64, "k", metric=metric).apply(k, k, 0)[1],
                       KVMethod("int4-bdr", 64, "k").apply(k, k, 0)[1])
    with pytest.raises(ValueError, match="QueryMetric"):
        KVMethod("hessian", 64, "k")


def test_method_rows_replace_only_the_same_method_and_context():
    from sglang_sawint4.eval.results import merge_method_rows

    def row(method, context, metric="ppl", value=1.0):
        return {"model": "m", "method": method, "block": None, "rotate": None, "context": context,
                "metric": metric, "value": value, "corpus": "all"}

    result = {"rows": [row("int4", 2048, value=2.0), row("bf16", 2048), row("int4", None, "task_acc"),
                       row("int4", 8192, value=3.0)], "runs": {}}
    merge_method_rows(result, [row("int4", 2048, value=5.0)])
    got = {(r["method"], r["context"], r["metric"]): r["value"] for r in result["rows"]}
    assert got == {("int4", 2048, "ppl"): 5.0, ("bf16", 2048, "ppl"): 1.0, ("int4", None, "task_acc"): 1.0,
                   ("int4", 8192, "ppl"): 3.0}


def test_rdata_text_reads_character_vectors(tmp_path):
    """R's lazy-load database: [length][zlib(XDR serialization)] entries (sglang_sawint4.eval.rdata_text)."""
    import struct
    import subprocess
    import sys
    import zlib

    def strsxp(lines, version=3):
        body = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
        if version == 3:
            body += struct.pack(">i", 5) + b"UTF-8"
        body += struct.pack(">ii", 16, len(lines))
        for s in lines:
            if s is None:
                body += struct.pack(">ii", 9, -1)
            else:
                b = s.encode()
                body += struct.pack(">ii", 9 | (1 << 15), len(b)) + b
        return body

    entries = [strsxp(["EMMA", "", "By Jane Austen"]), strsxp(["Persuasion", None], version=2),
               b"X\n" + struct.pack(">iiii", 2, 0, 0, 13)]  # an integer vector: skipped
    blob = b"".join(struct.pack(">i", len(e)) + zlib.compress(e) for e in entries)
    path = tmp_path / "Rdata.rdb"
    path.write_bytes(blob)
    out = subprocess.run([sys.executable, "-m", "sglang_sawint4.eval.rdata_text", str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert out == "EMMA\n\nBy Jane Austen\n\nPersuasion\n\n\n"


def test_task_rows_replace_only_the_same_task(tmp_path):
    from sglang_sawint4.eval.results import load_results, merge_task_rows, save_results

    def row(task, value, metric="task_acc"):
        return {"model": "m", "method": "int4", "block": None, "rotate": None, "context": None,
                "metric": metric, "value": value, "task": task, "corpus": None}

    path = str(tmp_path / "acc.json")
    save_results(path, {"rows": [row("date", 0.1), row("sports", 0.2), row(None, 9.0, "ppl")], "runs": {}})
    merge_task_rows(path, [row("date", 0.5)], "m", "task_run", {"command": "x"})
    result = load_results(path)
    got = sorted((r["metric"], r["task"], r["value"]) for r in result["rows"])
    assert got == [("ppl", None, 9.0), ("task_acc", "date", 0.5), ("task_acc", "sports", 0.2)]
    assert result["runs"] == {"m": {"task_run": {"command": "x"}}}


def test_merge_results_folds_another_machines_rows_and_runs():
    from sglang_sawint4.eval.results import merge_results

    def row(method, context, metric="ppl", value=1.0, task=None):
        return {"model": "m", "method": method, "block": None, "rotate": None, "context": context,
                "metric": metric, "value": value, "corpus": "all", "task": task}

    here = {"rows": [row("int4", 2048, value=2.0), row("int4", None, "task_acc", 0.1, "gsm"),
                     row("int4", None, "task_acc", 0.3, "date")],
            "runs": {"m": {"command": "cpu", "gsm_run": {"seconds": 1}}}}
    gpu = {"rows": [row("int4", 32768, value=4.0), row("int4", None, "task_acc", 0.2, "gsm")],
           "runs": {"m": {"context_32768_run": {"device": "cuda"}, "gsm_run": {"seconds": 2}}}}
    merged = merge_results(here, gpu)
    got = sorted((r["metric"], r["context"] or 0, r["task"] or "", r["value"]) for r in merged["rows"])
    assert got == [("ppl", 2048, "", 2.0), ("ppl", 32768, "", 4.0), ("task_acc", 0, "date", 0.3),
                   ("task_acc", 0, "gsm", 0.2)]
    assert merged["runs"]["m"] == {"command": "cpu", "gsm_run": {"seconds": 2}, "context_32768_run": {"device": "cuda"}}
    # served checks come along per model, the other model's stays
    here["served"] = {"other": {"gpu": "H100"}}
    merged = merge_results(here, {"rows": [], "runs": {}, "served": {"m": {"gpu": "H200"}}})
    assert merged["served"] == {"other": {"gpu": "H100"}, "m": {"gpu": "H200"}}


def test_chunked_scoring_equals_full_logits():
    """eval_accuracy scores long windows from the final hidden states a chunk of rows at a
    time; that must be the model's own logits (Gemma's final soft-cap included)."""
    from sglang_sawint4.eval.perplexity import ReferenceLogProbs, score

    model = tiny_gemma(32, ["full_attention"], final_logit_softcapping=3.0)
    ids = torch.randint(0, 64, (40,))
    with torch.no_grad():
        full = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
        hidden = final_hidden(model, ids)[:-1]
        other = hidden + 0.3 * torch.randn_like(hidden)  # another method's hidden states
        other_logp = torch.log_softmax(logits_from_hidden(model, other), -1)
        # the reference kept after its first use, and remade per use when over the budget
        for keep_bytes in (1 << 30, 0):
            ref = ReferenceLogProbs(model, hidden, rows_per_chunk=7, keep_bytes=keep_bytes)
            for _ in range(2):  # a second method against the same reference
                rec = score(model, other, ref, ids[1:])
                assert rec["n"] == 39
                assert rec["nll_sum"] == pytest.approx(-other_logp.gather(-1, ids[1:, None]).sum().item(), rel=1e-5)
                assert rec["top1"] == (other_logp.argmax(-1) == full.argmax(-1)).sum().item()
                assert rec["kl"] == pytest.approx((full.exp() * (full - other_logp)).sum().item(), rel=1e-4)
            assert len(ref.kept) == (6 if keep_bytes else 0)  # ceil(39 / 7) chunks
            # the unquantized pass itself (scored from the reference's own log-probs)
            rec = score(model, hidden, ref, ids[1:])
            assert rec["nll_sum"] == pytest.approx(-full.gather(-1, ids[1:, None]).sum().item(), rel=1e-5)
            assert rec["top1"] == 39 and rec["kl"] == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(torch.log_softmax(logits_from_hidden(model, hidden), -1), full, atol=1e-5)


class _CharTokenizer:
    """One id per character, and an optional BOS added only with add_special_tokens."""

    def __init__(self, bos=None):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos] if add_special_tokens and self.bos is not None else []) + ids}


@pytest.mark.parametrize("bos", [None, 2])
def test_text_window_starts_like_the_evaluated_windows(tmp_path, bos):
    """Calibration windows begin with the model's start tokens (Gemma's BOS), as the
    evaluated windows and passkey prompts do; models without one get the text alone."""
    from sglang_sawint4.eval.kv_methods import text_window

    path = tmp_path / "t.txt"
    path.write_text("abcdefghij")
    window = text_window(_CharTokenizer(bos), str(path), tokens=5).tolist()
    assert window == ([bos] if bos is not None else []) + [ord(c) for c in "abcdefghij"][: 5 - (bos is not None)]


def test_policy_plot_takes_the_paper_default_block_and_the_served_rows(tmp_path):
    from sglang_sawint4.eval.perplexity import plot_policy, policy_rows

    def row(method, block, context, value, rotate="k"):
        return {"model": "m", "method": method, "block": block, "rotate": rotate if block else None,
                "context": context, "metric": "ppl", "value": value, "corpus": "all"}

    rows = [row("bf16", None, 2048, 10.0), row("int4", None, 2048, 40.0), row("int4-bdr", 32, 2048, 30.0),
            row("int4-bdr", 128, 2048, 20.0), row("int4-bdr", 128, 2048, 21.0, "kv"),
            row("served-default", 64, 2048, 11.0), row("policy-fallback", 128, 2048, 12.0),
            row("served-default", 64, 32768, 13.0)]
    result = {"rows": rows, "runs": {"m": {"policies": {"served-default": {"head_dim": 128, "capacity_vs_bf16": 3.1}}},
                                     "other": {}}}
    got = {k: r["value"] for k, r in policy_rows(result, "m").items()}
    assert got == {("bf16", 2048): 10.0, ("int4", 2048): 40.0, ("int4-bdr", 2048): 20.0,
                   ("served-default", 2048): 11.0, ("policy-fallback", 2048): 12.0, ("served-default", 32768): 13.0}
    plot_policy(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10000
