"""The FlashInfer prefill path: prefix pieces and their staging of distinct slots, the piecewise
prefix attention with its merge run with torch attention in place of FlashInfer, and (on a
GPU) the backend's plan and run steps on real FlashInfer wrappers; bench/e2e.py flashinfer
checks it inside a server."""

import math
import random

import pytest
import torch

from helpers import keys_with_outliers, require_sglang
from sglang_sawint4 import format as fmt
from sglang_sawint4.attention_check import int4_attention_reference
from sglang_sawint4.kernels.dequant import dequantize_pages
from sglang_sawint4.prefix_pieces import combine_with_new_rows, plan_prefix_pieces


def _plan(prefixes, extend, max_rows):
    """plan_prefix_pieces of requests given by their prefix slot ids."""
    kv_indices = torch.tensor([slot for p in prefixes for slot in p], dtype=torch.int32)
    return plan_prefix_pieces(kv_indices, [len(p) for p in prefixes], extend, max_rows)


def _slots_read(plan, batch):
    """The slots each request reads, over all pieces (staging row -> slot)."""
    got = [[] for _ in range(batch)]
    for p in plan.pieces:
        pages = plan.pages[p.pages[0]: p.pages[1]].tolist()
        staged = plan.stage_slots[p.stage[0]: p.stage[1]].tolist()
        for i, b in enumerate(range(*p.reqs)):
            got[b] += [staged[r] for r in pages[p.kv_indptr[i]: p.kv_indptr[i + 1]]]
    return got


def test_pieces_of_a_small_batch():
    # prefixes of 5, 0, 9 distinct slots, new tokens 2, 3, 1; 6 staging rows
    plan = _plan([[40, 41, 42, 43, 44], [], list(range(9))], [2, 3, 1], 6)
    pieces = plan.pieces
    assert [p.stage for p in pieces] == [(0, 6), (6, 12), (12, 14)]
    assert [p.reqs for p in pieces] == [(0, 3), (2, 3), (2, 3)]
    assert pieces[0].kv_indptr == (0, 5, 5, 6) and pieces[0].qo_indptr == (0, 2, 5, 6)
    assert pieces[1].q_rows == (5, 6) and pieces[1].kv_indptr == (0, 6)
    assert pieces[2].num_rows == 2 and pieces[2].pages == (12, 14)
    assert plan.stage_slots.tolist() == [40, 41, 42, 43, 44, *range(9)]
    assert plan.pages.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    assert _plan([[], []], [4, 4], 8).pieces == []


def test_a_shared_prefix_is_staged_once():
    # requests 1 and 2 share request 0's first slots (radix-cache hits)
    prefixes = [[10, 11, 12, 13], [10, 11, 12, 13, 20, 21], [10, 11, 30]]
    # all 13 rows fit: staged as they come (no wait for the device to count distinct slots)
    plan = _plan(prefixes, [1, 2, 3], 13)
    assert len(plan.pieces) == 1 and plan.stage_slots.tolist() == [s for p in prefixes for s in p]
    assert plan.pages.tolist() == list(range(13)) and plan.pieces[0].kv_indptr == (0, 4, 10, 13)
    # 10 rows: the 7 distinct slots, once each
    plan = _plan(prefixes, [1, 2, 3], 10)
    assert len(plan.pieces) == 1 and plan.stage_slots.tolist() == [10, 11, 12, 13, 20, 21, 30]
    assert plan.pages.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 6]
    assert plan.pieces[0].kv_indptr == (0, 4, 10, 13) and plan.pieces[0].num_rows == 7
    # 3 rows: slots 10-12 (read by all), 13 20 21 (requests 0 and 1), 30 (request 2)
    plan = _plan(prefixes, [1, 2, 3], 3)
    assert [p.reqs for p in plan.pieces] == [(0, 3), (0, 2), (2, 3)]
    assert [p.kv_indptr for p in plan.pieces] == [(0, 3, 6, 8), (0, 1, 4), (0, 1)]
    assert plan.pages.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 2, 0]
    assert _slots_read(plan, 3) == [[10, 11, 12, 13], [10, 11, 12, 13, 20, 21], [10, 11, 30]]


@pytest.mark.parametrize("seed", range(20))
def test_pieces_stage_each_slot_once_and_give_every_request_its_prefix(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 9)
    fresh = iter(rng.sample(range(10_000), 1000))
    prefixes = []
    for _ in range(batch):  # some requests extend an earlier one's prefix (a radix-cache hit)
        base = rng.choice(prefixes)[: rng.randint(0, 40)] if prefixes and rng.random() < 0.5 else []
        prefixes.append(base + [next(fresh) for _ in range(rng.choice([0, rng.randint(1, 40)]))])
    extend = [rng.randint(1, 7) for _ in range(batch)]
    max_rows = rng.randint(1, 50)
    plan = _plan(prefixes, extend, max_rows)
    rows = [s for p in prefixes for s in p]
    staged = sorted(set(rows)) if len(rows) > max_rows else sorted(rows)  # rows that fit: staged as they come
    assert sorted(plan.stage_slots.tolist()) == staged
    assert sum(p.num_rows for p in plan.pieces) == len(staged)
    assert len(plan.pieces) == -(-len(staged) // max_rows)
    for p in plan.pieces:
        assert 0 < p.num_rows <= max_rows
        assert p.kv_indptr[-1] == p.pages[1] - p.pages[0]
        assert len(p.kv_indptr) == len(p.qo_indptr) == p.reqs[1] - p.reqs[0] + 1
        assert p.q_rows == (sum(extend[: p.reqs[0]]), sum(extend[: p.reqs[1]]))
        assert p.qo_indptr[-1] == p.q_rows[1] - p.q_rows[0]
        assert all(0 <= r < p.num_rows for r in plan.pages[p.pages[0]: p.pages[1]].tolist())
    assert [sorted(g) for g in _slots_read(plan, batch)] == [sorted(p) for p in prefixes]


@pytest.mark.parametrize("seed", range(20))
def test_combined_pages_are_each_requests_prefix_then_its_new_rows(seed):
    """A one-piece batch whose new tokens fit after its staged prefix: request b reads its
    prefix's staging rows in position order, then its own new tokens' rows."""
    rng = random.Random(seed)
    batch = rng.randint(1, 9)
    fresh = iter(rng.sample(range(10_000), 1000))
    prefixes = []
    for _ in range(batch):
        base = rng.choice(prefixes)[: rng.randint(0, 30)] if prefixes and rng.random() < 0.5 else []
        prefixes.append(base + [next(fresh) for _ in range(rng.choice([0, rng.randint(1, 30)]))])
    extend = [rng.randint(0, 7) for _ in range(batch)]
    max_rows = rng.randint(1, 150)
    plan = _plan(prefixes, extend, max_rows)
    combined = combine_with_new_rows(plan, [len(p) for p in prefixes], extend, max_rows)
    fits = len(plan.pieces) == 1 and plan.pieces[0].num_rows + sum(extend) <= max_rows
    assert (combined is not None) == fits
    if combined is None:
        return
    staged, pages = plan.stage_slots.tolist(), combined.pages.tolist()
    assert combined.pages.dtype == torch.int32 and combined.new_row_base == len(staged)
    assert combined.qo_indptr == (0, *torch.tensor(extend).cumsum(0).tolist())
    for b in range(batch):
        own = pages[combined.kv_indptr[b]: combined.kv_indptr[b + 1]]
        q0, q1 = combined.qo_indptr[b], combined.qo_indptr[b + 1]
        assert [staged[r] for r in own[: len(prefixes[b])]] == prefixes[b]
        assert own[len(prefixes[b]):] == [len(staged) + j for j in range(q0, q1)]


def test_combined_pages_need_one_piece_and_room_for_the_new_rows():
    prefixes, extend = [[10, 11, 12, 13], [10, 11, 20]], [3, 2]
    # 7 prefix rows fit 12 rows as they come, and the 5 new rows after them
    assert combine_with_new_rows(_plan(prefixes, extend, 12), [4, 3], extend, 12).pages.tolist() == [
        0, 1, 2, 3, 7, 8, 9, 4, 5, 6, 10, 11]
    for max_rows in (11, 7, 3):  # one piece without room, one piece of all, pieces
        assert combine_with_new_rows(_plan(prefixes, extend, max_rows), [4, 3], extend, max_rows) is None
    # 9 prefix rows over 8 rows: their 5 distinct slots, once each, and the 2 new rows
    prefixes, extend = [[10, 11, 12, 13], [10, 11, 12, 13, 20]], [1, 1]
    assert combine_with_new_rows(_plan(prefixes, extend, 8), [4, 5], extend, 8).pages.tolist() == [
        0, 1, 2, 3, 5, 0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="prefix pages"):
        combine_with_new_rows(_plan(prefixes, extend, 12), [4, 4], extend, 12)


def test_bad_piece_arguments():
    with pytest.raises(ValueError, match="positive"):
        _plan([[1]], [1], 0)
    with pytest.raises(ValueError, match="extend lengths"):
        _plan([[1], [2, 3]], [1], 4)
    with pytest.raises(ValueError, match="non-negative"):
        plan_prefix_pieces(torch.zeros(1, dtype=torch.int32), [-1], [1], 4)
    with pytest.raises(ValueError, match="slot ids"):
        plan_prefix_pieces(torch.zeros(1, dtype=torch.int32), [2], [1], 4)


def _attention_lse(q, k, v, scale, causal_offset=None):
    """[n, hq, d] x [m, hk, d] -> (o [n, hq, d], natural-log lse [n, hq]); with causal_offset,
    query i sees keys 0 .. causal_offset + i."""
    hq, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = torch.einsum("qhd,nhd->hqn", q, k) * scale
    if causal_offset is not None:
        rows = torch.arange(q.shape[0], device=q.device)
        allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= causal_offset + rows[:, None]
        s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [hq, n]
    o = torch.einsum("hqn,nhd->qhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)
    return o, lse.transpose(0, 1).contiguous()


def _ragged(q, k, v, qo_indptr, kv_indptr, scale, causal):
    outs, lses = [], []
    for b in range(len(qo_indptr) - 1):
        qs = slice(qo_indptr[b], qo_indptr[b + 1])
        ks = slice(kv_indptr[b], kv_indptr[b + 1])
        # causal: the queries are the last keys (a request's new tokens after its prefix)
        offset = (ks.stop - ks.start) - (qs.stop - qs.start) if causal else None
        o, lse = _attention_lse(q[qs], k[ks], v[ks], scale, causal_offset=offset)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _torch_merge(o_a, lse_a, o_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = (lse_a - lse).exp().nan_to_num(0.0), (lse_b - lse).exp().nan_to_num(0.0)
    return o_a * w_a[..., None] + o_b * w_b[..., None], lse


@pytest.mark.parametrize("layout,centered", [(fmt.Int4Format(64), False), (fmt.Int4Format(128, 32), True)],
                         ids=["int4-d64", "bdr32-d128-centered"])
@pytest.mark.parametrize("max_rows", [1000, 23, 5])
def test_piecewise_prefix_attention_equals_the_reference(layout, centered, max_rows, rng, device):
    from sglang_sawint4.flashinfer_prefill import attend_prefix_pieces

    heads, group, d, slots = 2, 2, layout.head_dim, 200
    k = keys_with_outliers(slots, heads, d, rng, dtype=torch.float32)
    center = k.mean(0).contiguous() if centered else None
    kd, km = fmt.encode(k if center is None else k - center, layout, is_value=False)
    vd, vm = fmt.encode(torch.randn(slots, heads, d, generator=rng), layout, is_value=True)
    data = tuple(t.to(device) for t in (kd, km, vd, vm))
    prefix, new = [30, 0, 57, 9], [3, 5, 1, 4]
    kv_indptr = [0, *torch.tensor(prefix).cumsum(0).tolist()]
    qo_indptr = [0, *torch.tensor(new).cumsum(0).tolist()]
    # request 2 shares request 0's first 20 slots, request 3 request 2's first 9 (radix hits)
    perm = torch.randperm(slots, generator=rng)[:67].to(torch.int32)
    r0, r2 = perm[:30], torch.cat([perm[:20], perm[30:67]])
    kv_indices = torch.cat([r0, r2, r2[:9]])
    n, scale = sum(new), d ** -0.5
    q = torch.randn(n, heads * group, d, generator=rng)
    k_new = torch.randn(n, heads, d, generator=rng)
    v_new = torch.randn(n, heads, d, generator=rng)
    k_stage = torch.empty(max_rows, heads, d, device=device)
    v_stage = torch.empty(max_rows, heads, d, device=device)

    def stage(rows):
        dequantize_pages(*data, rows.to(device), k_stage, v_stage, layout,
                         k_center=None if center is None else center.to(device))
        return k_stage.cpu(), v_stage.cpu()

    plan = plan_prefix_pieces(kv_indices, prefix, new, max_rows)
    assert len(plan.pieces) == -(-67 // max_rows)

    def attend(i, piece, q_rows, ks, vs):
        pages = plan.pages[piece.pages[0]: piece.pages[1]].long()
        return _ragged(q_rows, ks[pages], vs[pages], piece.qo_indptr, piece.kv_indptr, scale, causal=False)

    o, lse = _ragged(q, k_new, v_new, qo_indptr, qo_indptr, scale, causal=True)
    out = attend_prefix_pieces(q, o, lse, plan, stage, attend, _torch_merge)
    ref = int4_attention_reference(q.double(), torch.tensor(qo_indptr), torch.tensor(kv_indptr), kv_indices, (kd, km, vd, vm),
                                   layout, scale, k_new=k_new, v_new=v_new, k_center=center)
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_merge_reference_is_attention_over_both_key_sets(rng):
    from sglang_sawint4.flashinfer_prefill import merge_partial_attention_reference

    q = torch.randn(3, 2, 16, generator=rng, dtype=torch.float64)
    k = torch.randn(2, 10, 2, 16, generator=rng, dtype=torch.float64)
    v = torch.randn(2, 10, 2, 16, generator=rng, dtype=torch.float64)
    o_a, ln_a = _attention_lse(q, k[0], v[0], 0.3)
    o_b, ln_b = _attention_lse(q, k[1], v[1], 0.3)
    log2e = 1.4426950408889634
    o, lse = merge_partial_attention_reference(o_a, ln_a * log2e, o_b, ln_b * log2e)
    o_all, ln_all = _attention_lse(q, torch.cat([k[0], k[1]]), torch.cat([v[0], v[1]]), 0.3)
    assert torch.allclose(o, o_all, atol=1e-12) and torch.allclose(lse, ln_all * log2e, atol=1e-12)
    # a side without keys (lse -inf) leaves the other unchanged
    o, lse = merge_partial_attention_reference(o_a, ln_a * log2e, o_b, torch.full_like(ln_b, float("-inf")))
    assert torch.allclose(o, o_a) and torch.allclose(lse, ln_a * log2e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer's merge kernel needs a GPU")
def test_merge_on_the_gpu_equals_the_reference(rng):
    from sglang_sawint4.flashinfer_prefill import merge_partial_attention, merge_partial_attention_reference

    o_a, o_b = torch.randn(2, 5, 32, 128, generator=rng).to("cuda", torch.bfloat16)
    lse_a, lse_b = (torch.randn(2, 5, 32, generator=rng) * 4).cuda()
    o, lse = merge_partial_attention(o_a, lse_a, o_b, lse_b)
    o_ref, lse_ref = merge_partial_attention_reference(o_a, lse_a, o_b, lse_b)
    assert (o.float() - o_ref.float()).abs().max() < 2e-2 and torch.allclose(lse, lse_ref, atol=1e-4)


class _Log(list):
    """The order of plan / run / event calls the prefill backend makes."""


class _FakeWrapper:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def begin_forward(self, qo_indptr, kv_indptr, *args, **kwargs):
        self.log.append(("plan", self.name, tuple(kv_indptr.tolist())))

    def forward_return_lse(self, q, kv, **kwargs):
        self.log.append(("run", self.name))
        return q, q[..., 0]


class _FakeEvent:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record(self):
        self.log.append(("record", self.name))

    def synchronize(self):
        self.log.append(("sync", self.name))


def test_overflow_wrappers_are_replanned_only_after_their_last_run_finished():
    """Past PLANNED_PIECES, pieces are re-planned in every layer on overflow wrappers in turn;
    FlashInfer copies a plan to the GPU asynchronously from a pinned host buffer, so a wrapper
    may be re-planned only after an event recorded behind its previous run has completed."""
    require_sglang()
    from sglang_sawint4 import flashinfer_prefill as fp

    log = _Log()
    backend = fp.Int4FlashInferPrefillBackend.__new__(fp.Int4FlashInferPrefillBackend)
    backend._heads = (4, 2, 64)
    backend._k_stage = torch.empty(8, 2, 64, dtype=torch.bfloat16)
    backend._plan = plan_prefix_pieces(torch.arange(30), [30], [2], 4)  # 8 pieces: 4 planned, 4 overflow
    backend._pieces = backend._plan.pieces
    backend._piece_wrappers = [_FakeWrapper(f"p{i}", log) for i in range(fp.PLANNED_PIECES)]
    backend._overflow = [(_FakeWrapper(f"o{i}", log), _FakeEvent(f"o{i}", log)) for i in range(fp.OVERFLOW_WRAPPERS)]
    backend._overflow_next = 0
    backend._planned_copied, backend._planned_pending = _FakeEvent("planned", log), True
    q = torch.zeros(2, 4, 64)
    for _layer in range(2):
        for i, piece in enumerate(backend._pieces):
            backend._attend_piece(i, piece, q, None, None, 0.1)
    runs = [e for e in log if e[0] == "run"]
    assert len(runs) == 16 and [e[1] for e in runs[:8]] == ["p0", "p1", "p2", "p3", "o0", "o1", "o0", "o1"]
    # every overflow plan follows a sync of that wrapper's event, which (after the first use)
    # follows the record behind its previous run
    for k, entry in enumerate(log):
        if entry[0] == "plan":
            assert log[k - 1] == ("sync", entry[1])
            earlier = [e for e in log[:k] if e[1] == entry[1] and e[0] in ("run", "record")]
            assert not earlier or earlier[-1] == ("record", entry[1])
    # the planned wrappers' event is recorded once, after their last run in the batch
    assert log.count(("record", "planned")) == 1 and log.index(("record", "planned")) == log.index(("run", "p3")) + 1
    assert not backend._planned_pending


@pytest.mark.parametrize("case", ["combined", "no-prefix", "bf16-layers", "no-host-lengths", "capturing"])
def test_prefill_plan_waits_for_the_device_only_where_sglang_must_plan(case, monkeypatch):
    """Without BF16 layers the backend plans the batch from SGLang's host lengths alone:
    SGLang's own plan (which copies device offsets to the host, a wait for the GPU every
    prefill batch) runs only where its wrappers are read (BF16 layers), where the host
    lengths are missing, or inside a graph capture.  The ragged wrapper is planned only where
    the batch is not one combined call; every plan first waits for the previous batch's
    plan copies (an event behind its first run)."""
    require_sglang()
    from types import SimpleNamespace

    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_sawint4 import flashinfer_prefill as fp

    log = _Log()
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata",
                        lambda self, fb: log.append(("sglang-plan",)) or setattr(self, "forward_metadata", "sglang"))
    monkeypatch.setattr(fp, "_capturing", lambda: case == "capturing")
    backend = fp.Int4FlashInferPrefillBackend.__new__(fp.Int4FlashInferPrefillBackend)
    backend._heads, backend._k_stage, backend.prefill_wrappers_paged = (4, 2, 64), torch.empty(1, 2, 64), ["paged"]
    backend.int4_pool = SimpleNamespace(bf16_layers=frozenset({1}) if case == "bf16-layers" else frozenset())
    backend.prefill_wrapper_ragged = _FakeWrapper("ragged", log)
    backend._planned_copied, backend._planned_pending = _FakeEvent("planned", log), False
    prefix = [0, 0] if case == "no-prefix" else [5, 0]

    def plan_prefix(prefix_cpu, extend_cpu, *device_args):
        log.append(("our-plan", list(prefix_cpu), list(extend_cpu)))
        backend._combined = "combined" if any(prefix_cpu) else None

    backend._plan_prefix = plan_prefix
    host = case != "no-host-lengths"
    mode = SimpleNamespace(is_decode_or_idle=lambda: False, is_target_verify=lambda: False)
    batch = SimpleNamespace(forward_mode=mode, batch_size=2, req_pool_indices=torch.arange(2),
                            extend_prefix_lens_cpu=prefix if host else None, extend_seq_lens_cpu=[3, 4] if host else None,
                            extend_prefix_lens=torch.tensor(prefix), extend_seq_lens=torch.tensor([3, 4]))
    backend.init_forward_metadata(batch)
    assert log[0] == ("sync", "planned") and ("our-plan", prefix, [3, 4]) in log
    sglang_plans = case in ("bf16-layers", "no-host-lengths", "capturing")
    assert (("sglang-plan",) in log) == sglang_plans
    if sglang_plans:
        assert backend.forward_metadata == "sglang"
        return
    md = backend.forward_metadata
    assert md.use_ragged and md.prefill_wrappers == ["paged"] and md.extend_no_prefix == (case == "no-prefix")
    ragged_plans = [e for e in log if e[0] == "plan"]
    if case == "combined":
        assert not ragged_plans
    else:
        assert ragged_plans == [("plan", "ragged", (0, 3, 7))] and backend._planned_pending
        backend._mark_planned_run()
        assert log[-1] == ("record", "planned") and not backend._planned_pending


class _TorchRagged:
    """The ragged wrapper's two calls in torch (lse base 2, as FlashInfer returns it)."""

    def __init__(self, qo_indptr):
        self.qo_indptr = qo_indptr

    def forward_return_lse(self, q, k, v, causal, sm_scale, logits_soft_cap):
        o, lse = _ragged(q, k, v, self.qo_indptr, self.qo_indptr, sm_scale, causal)
        return o.to(q.dtype), lse / math.log(2)

    def forward(self, q, k, v, **kwargs):
        return self.forward_return_lse(q, k, v, **kwargs)[0]


_EXTEND_LAYOUTS = [fmt.Int4Format(64), fmt.Int4Format(64, 64), fmt.Int4Format(64, 16, rotate_v=True)]


@pytest.mark.parametrize("centered", [False, True], ids=["plain-keys", "centered"])
@pytest.mark.parametrize("layout", _EXTEND_LAYOUTS, ids=["int4", "bdr64-k", "bdr16-kv"])
@pytest.mark.parametrize("staging_rows", [200, 100, 16], ids=["combined", "one-piece", "pieces"])
def test_int4_extend_stages_the_prefix_as_stored(layout, centered, staging_rows, rng, device):
    """The backend's run step with torch standing in for FlashInfer's kernels: a rotating
    layout's prefix is staged as stored (no inverse rotation per row) and the new tokens move
    into that space; a plain layout's staging adds the key center back.  Either way the
    output is attention in the original space over the pages and the new tokens: in one
    causal call over the staging rows where the new tokens fit after the prefix (200 rows),
    else merged with the new tokens' own attention (97 prefix rows staged as one piece in
    100 rows, 77 distinct slots in pieces of 16)."""
    require_sglang()
    from types import SimpleNamespace

    from helpers import rel_err
    from sglang_sawint4 import flashinfer_prefill as fp
    from sglang_sawint4.kernels.dequant import dequantize_pages_reference

    hq, hk, d, slots, dtype = 4, 2, layout.head_dim, 120, torch.float16
    k = keys_with_outliers(slots, hk, d, rng, dtype=torch.float32)
    center = k.mean(0).contiguous() if centered else None
    kd, km = fmt.encode(k if center is None else k - center, layout, is_value=False)
    vd, vm = fmt.encode(torch.randn(slots, hk, d, generator=rng), layout, is_value=True)
    data = tuple(t.to(device) for t in (kd, km, vd, vm))
    prefix, new = [40, 0, 57], [5, 3, 9]
    perm = torch.randperm(slots, generator=rng)[:77].to(torch.int32)
    kv_indices = torch.cat([perm[:40], perm[:20], perm[40:77]])  # request 2 shares request 0's first 20
    qo_indptr = [0, *torch.tensor(new).cumsum(0).tolist()]
    kv_indptr = [0, *torch.tensor(prefix).cumsum(0).tolist()]

    backend = fp.Int4FlashInferPrefillBackend.__new__(fp.Int4FlashInferPrefillBackend)
    backend.int4_format, backend.staging_rows = layout, staging_rows

    def key_center(layer_id, stored=False):
        return None if center is None else (fmt.stored_center(center, layout) if stored else center).to(device)

    backend.int4_pool = SimpleNamespace(get_int4_layer=lambda i: data, key_center=key_center)
    backend._k_stage = torch.empty(staging_rows, hk, d, dtype=dtype, device=device)
    backend._v_stage = torch.empty_like(backend._k_stage)
    backend._set_plan(plan_prefix_pieces(kv_indices.to(device), prefix, new, staging_rows), prefix, new)
    backend.prefill_wrapper_ragged = _TorchRagged(qo_indptr)
    staged = []

    def attend_combined(q_all, k_stage, v_stage, scale):
        c = backend._combined
        staged.append(backend._plan.stage_slots.clone())
        staged.append(k_stage[: staged[-1].numel()].clone())
        pages = c.pages.long()
        return _ragged(q_all, k_stage[pages], v_stage[pages], c.qo_indptr, c.kv_indptr, scale, causal=True)[0].to(
            q_all.dtype)

    def attend_piece(i, piece, q_rows, k_stage, v_stage, scale):
        pages = backend._plan.pages[piece.pages[0]: piece.pages[1]].long().to(k_stage.device)
        staged.append(backend._plan.stage_slots[piece.stage[0]: piece.stage[1]].clone())
        staged.append(k_stage[: staged[-1].numel()].clone())
        o, lse = _ragged(q_rows, k_stage[pages], v_stage[pages], piece.qo_indptr, piece.kv_indptr, scale, causal=False)
        return o.to(q_rows.dtype), lse / math.log(2)

    backend._attend_piece, backend._attend_combined = attend_piece, attend_combined
    n, scale = sum(new), d ** -0.5
    q, k_new, v_new = (torch.randn(n, h, d, generator=rng).to(dtype).to(device) for h in (hq, hk, hk))
    out = backend._int4_extend(q, k_new, v_new, SimpleNamespace(layer_id=0, scaling=scale))
    assert out.shape == q.shape and out.dtype == dtype
    assert (backend._combined is not None) == (staging_rows == 200)
    assert len(staged) == 2 * max(len(backend._pieces), 1) and (len(backend._pieces) > 1) == (staging_rows < 77)
    for slots_read, rows in zip(staged[0::2], staged[1::2]):  # the staging rows: stored or original space
        rk, _ = dequantize_pages_reference(*data, slots_read, layout, unrotate=layout.block_size is None,
                                           k_center=center if layout.block_size is None else None)
        assert rel_err(rows, rk) < 2e-3
    ref = int4_attention_reference(q.cpu().double(), torch.tensor(qo_indptr), torch.tensor(kv_indptr), kv_indices,
                                   (kd, km, vd, vm), layout, scale, k_new=k_new.cpu(), v_new=v_new.cpu(),
                                   k_center=center)
    assert rel_err(out, ref) < 1e-2
    if backend._combined is None:
        return
    # the served combined batch: the KV store writes the new tokens' pages, their staging rows
    # and q in one launch; the output is the same, and so are the pages set_kv_buffer writes
    from sglang_sawint4.kernels.store import rotate_quantize_store, rotate_quantize_store_and_stage

    new_pages, ref_pages = (tuple(t.to(device) for t in (*fmt.allocate_layer(n, hk, d), *fmt.allocate_layer(n, hk, d)))
                            for _ in range(2))
    loc = torch.randperm(n, generator=rng).to(device)

    def store_and_stage(layer_id, slots, *args, center_rows):
        return rotate_quantize_store_and_stage(*args[:3], slots, *new_pages, layout, key_center(layer_id, stored=True),
                                               *args[3:], center_rows)

    def set_kv_buffer(*args):
        raise AssertionError("a combined batch stores through store_and_stage")

    backend.int4_pool.store_and_stage, backend.int4_pool.set_kv_buffer = store_and_stage, set_kv_buffer
    backend.int4_pool.is_bf16_layer = lambda layer_id: False
    backend.forward_metadata, backend._checker = SimpleNamespace(use_ragged=True), None
    layer = SimpleNamespace(layer_id=0, scaling=scale, tp_q_head_num=hq, tp_k_head_num=hk, qk_head_dim=d, v_head_dim=d,
                            logit_cap=0.0, is_cross_attention=False, sliding_window_size=-1)
    stored_out = backend.forward_extend(q.view(n, -1), k_new.view(n, -1), v_new.view(n, -1), layer,
                                        SimpleNamespace(out_cache_loc=loc))
    rotate_quantize_store(k_new, v_new, loc, *ref_pages, layout, k_center=key_center(0, stored=True))
    assert torch.equal(stored_out.view(n, hq, d), out)
    assert all(torch.equal(a, b) for a, b in zip(new_pages, ref_pages))


def _real_backend(prefix, new, staging_rows, shared, rng, layers):
    """An Int4FlashInferPrefillBackend on real FlashInfer wrappers (fa2) over INT4 pages of
    ``layers`` layers holding the batch's prefixes (one run of slots for all requests, a
    radix-cache hit, when ``shared``).  Returns (backend, pages per layer, key centers per
    layer, the prefixes' slot ids per request)."""
    require_sglang()
    from types import SimpleNamespace

    from flashinfer import BatchPrefillWithRaggedKVCacheWrapper

    from sglang_sawint4 import flashinfer_prefill as fp

    hq, hk, d, dev, bf16 = 32, 8, 128, "cuda", torch.bfloat16
    layout = fmt.Int4Format(d, 128)
    bs = len(prefix)
    slots = max(prefix) if shared else sum(prefix)
    perm = torch.randperm(slots, generator=rng).to(torch.int32)
    starts = [0] * bs if shared else [0, *torch.tensor(prefix).cumsum(0).tolist()[:-1]]
    req_to_token = torch.zeros(bs, max(prefix) + max(new), dtype=torch.int32)
    for b in range(bs):
        req_to_token[b, : prefix[b]] = perm[starts[b]: starts[b] + prefix[b]]
    data, centers = [], []
    for _ in range(layers):
        k = keys_with_outliers(slots, hk, d, rng, dtype=torch.float32)
        center = k.mean(0).contiguous()
        kd, km = fmt.encode(k - center, layout, is_value=False)
        vd, vm = fmt.encode(torch.randn(slots, hk, d, generator=rng), layout, is_value=True)
        data.append(tuple(t.to(dev) for t in (kd, km, vd, vm)))
        centers.append(center.to(dev))

    backend = fp.Int4FlashInferPrefillBackend.__new__(fp.Int4FlashInferPrefillBackend)
    backend.workspace_buffer = torch.empty(384 << 20, dtype=torch.uint8, device=dev)
    backend.prefill_backend = "fa2"
    backend._heads, backend.staging_rows, backend.int4_format = (hq, hk, d), staging_rows, layout
    backend._k_stage = torch.empty(staging_rows, hk, d, dtype=bf16, device=dev)
    backend._v_stage = torch.empty_like(backend._k_stage)
    backend._piece_wrappers, backend._overflow, backend._overflow_next = [], [], 0
    backend._planned_copied, backend._planned_pending, backend._checker = torch.cuda.Event(), False, None
    backend.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token.to(dev))
    stored_centers = [fmt.stored_center(c.cpu(), layout).to(dev) for c in centers]
    backend.int4_pool = SimpleNamespace(get_int4_layer=lambda i: data[i],
                                        key_center=lambda i, stored=False: (stored_centers if stored else centers)[i])
    backend.prefill_wrapper_ragged = BatchPrefillWithRaggedKVCacheWrapper(backend.workspace_buffer, "NHD")
    return backend, data, centers, [req_to_token[b, : prefix[b]] for b in range(bs)]


def _plan_batch(backend, prefix, new, device_lens):
    """The backend's plan of a batch, as init_forward_metadata makes it without BF16 layers."""
    backend._plan_prefix(prefix, new, *device_lens)
    if backend._combined is None:
        backend._plan_ragged(new)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer's prefill kernels need a GPU")
@pytest.mark.parametrize("prefix,new,staging_rows,shared", [
    # the serving benchmark's shared-prefix batch: 32 requests over one cached 8k prefix,
    # staged once (one piece), or in 8 pieces that all 32 requests read (4 on overflow wrappers)
    ([8192] * 32, [256] * 32, 32768, True),
    ([8192] * 32, [256] * 32, 1024, True),
    # prefixes that fit the staging rows as they are (no distinct-slot count), with the new
    # tokens after them (one causal call) or without room for those (merged with them)
    ([300, 0, 50], [64, 8, 1], 1024, False),
    ([300, 0, 50], [64, 8, 1], 400, False),
    # ragged lengths: pieces inside one request and across several, a request without prefix
    ([700, 0, 1500, 33, 4000], [17, 5, 1, 64, 200], 1024, False),
], ids=["shared-8k-x32", "shared-8k-x32-8-pieces", "rows-fit", "rows-fit-no-room", "ragged"])
def test_flashinfer_pieces_equal_the_reference(prefix, new, staging_rows, shared, rng):
    """The backend's own plan and run steps on real FlashInfer wrappers (one combined causal
    call, planned and overflow pieces; three layers, so overflow wrappers are re-planned layer
    after layer) against the float64 reference over the same INT4 pages."""
    from types import SimpleNamespace

    from helpers import rel_err

    layers, dev, bf16 = 3, "cuda", torch.bfloat16
    backend, data, centers, prefix_slots = _real_backend(prefix, new, staging_rows, shared, rng, layers)
    (hq, hk, d), layout, bs = backend._heads, backend.int4_format, len(prefix)
    n = sum(new)
    qo_indptr = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    _plan_batch(backend, prefix, new, (torch.arange(bs, device=dev), torch.tensor(prefix, device=dev, dtype=torch.int32),
                                       torch.tensor(new, device=dev, dtype=torch.int32)))
    slots = max(prefix) if shared else sum(prefix)
    staged = sum(prefix) if sum(prefix) <= staging_rows else slots
    combined = staged <= staging_rows and staged + sum(new) <= staging_rows
    assert (backend._combined is not None) == combined
    assert len(backend._pieces) == (0 if combined else -(-staged // staging_rows))

    kv_indptr = torch.tensor([0, *torch.tensor(prefix).cumsum(0).tolist()])
    kv_indices = torch.cat(prefix_slots).to(dev)
    scale = d ** -0.5
    for layer in range(layers):
        q, k_new, v_new = (torch.randn(n, h, d, generator=rng).to(dev, bf16) for h in (hq, hk, hk))
        out = backend._int4_extend(q, k_new, v_new, SimpleNamespace(layer_id=layer, scaling=scale))
        ref = int4_attention_reference(q.double(), qo_indptr, kv_indptr, kv_indices, data[layer], layout, scale,
                                       k_new=k_new, v_new=v_new, round_prefix_to=bf16, k_center=centers[layer])
        errs = [rel_err(out[a:b].double(), ref[a:b]) for a, b in zip(qo_indptr[:-1].tolist(), qo_indptr[1:].tolist())]
        assert max(errs) < 2e-2, f"layer {layer}: rel err per request {[round(e, 4) for e in errs]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer's prefill kernels need a GPU")
@pytest.mark.parametrize("prefix,new,staging_rows,waits", [
    # the serving benchmark's shared-prefix batches: a request or two over one cached 8k
    # prefix, rows staged as they come, one combined call
    ([8192] * 2, [256] * 2, 32768, False),
    ([300, 0, 50], [64, 8, 1], 400, False),  # ragged call and one piece
    # 32 x 8k prefix rows exceed the staging rows: the distinct-slot count waits
    ([8192] * 32, [256] * 32, 32768, True),
], ids=["combined", "ragged-and-piece", "distinct-slot-count"])
def test_plan_does_not_wait_for_the_device(prefix, new, staging_rows, waits, rng):
    """Planning a batch whose prefix rows fit the staging rows leaves the GPU running what was
    queued before it (the previous batch, under SGLang's overlap scheduler): no blocking copy,
    no copy from pageable memory.  The GPU is kept busy for about a second; the stream is
    still busy when the plan returns unless the plan waited for it (the documented wait of a
    batch past the staging rows, checked so that the probe is known to see a wait)."""
    dev = "cuda"
    backend, *_ = _real_backend(prefix, new, staging_rows, True, rng, layers=1)
    device_lens = (torch.arange(len(prefix), device=dev), torch.tensor(prefix, device=dev, dtype=torch.int32),
                   torch.tensor(new, device=dev, dtype=torch.int32))
    _plan_batch(backend, prefix, new, device_lens)  # first plans allocate FlashInfer's and PyTorch's buffers
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles
    _plan_batch(backend, prefix, new, device_lens)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    if waits:
        assert not still_busy, "the plan did not wait for the distinct-slot count: the probe sees no wait"
    else:
        assert still_busy, "the plan waited for the device"
