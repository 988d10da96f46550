#!/usr/bin/env bash
# One GPU-host session: install the offline bundle and this repo, then run the
# requested stages.  Everything it writes lands under $OUT (default ./.out).
#
#   bash scripts/gpu_run.sh install tests bench smoke int4
#
# Stages: warm (exit 3 unless a previous call on this machine installed the bundle),
# install (bundle + package, always first), tests (pytest on the GPU),
# bench (scripts/bench_kernels.py), smoke (BF16 server smoke), int4 (INT4 e2e),
# tp2 (INT4 with --tp 2; needs 2 GPUs), reliability (bad config + requests, soak of
# $SOAK_MIN minutes, default 8), serving (scripts/bench_serving.py on an 8B-shaped model;
# resumable: CALL_LIMIT_S, SERVING_STATE, SERVING_ARGS; exit 75 = call again),
# gguf-part (keep this call's part of SmolLM2's GGUF), served (join, convert, then
# scripts/served_accuracy.py serve: bf16 / int4 / int4-bdr-64 greedy continuations),
# profile (ncu on the decode kernel, 32 x 8k).  Needs the bundle at $BUNDLE
# (default .bundle/sglang-0.5.17-py312.tar.xz, built by scripts/bundle.py build).
set -uo pipefail
OUT=${OUT:-$PWD/.out}
BUNDLE=${BUNDLE:-.bundle/sglang-0.5.17-py312.tar.xz}
SITE=${SITE:-/tmp/sglang-site}
PKG=${PKG:-/tmp/sawint4-site}
MODELS=${MODELS:-/tmp/models}
GGUF_PARTS=${GGUF_PARTS:-/tmp/gguf-parts}
GGUF_SITE=${GGUF_SITE:-/tmp/gguf-site}
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}
status=0
stage() { echo; echo "=== $1 ($(date +%T))"; }

for s in "$@"; do
  case $s in
  warm)
    # a call that only fits on a machine left warm by the previous one (bundle unpacked,
    # Triton and FlashInfer JIT caches filled): stop at once on a fresh machine
    if [ ! -f "$SITE/sawint4_bundle_manifest.json" ]; then
      echo "fresh machine: the previous call's caches are gone; not running"; exit 3
    fi
    echo "warm machine: bundle at $SITE"
    ;;
  install)
    stage install
    if [ ! -f "$SITE/sawint4_bundle_manifest.json" ]; then
      python3 scripts/bundle.py install --bundle "$BUNDLE" --target "$SITE" 2>&1 | tee "$OUT/bundle_install.log" || status=1
    else
      echo "bundle already unpacked at $SITE"
    fi
    python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target "$PKG" . \
      2>&1 | grep -v WARNING | tail -3
    python3 -c "import sglang_sawint4.kernels, importlib.metadata as m; print('plugin:', [e.value for e in m.entry_points(group='sglang.srt.plugins')])"
    ;;
  tests)
    stage tests
    python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" || status=1
    ;;
  bench)
    stage bench
    python3 scripts/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tail -60 || status=1
    ;;
  smoke)
    stage smoke
    [ -d "$MODELS/small" ] || python3 scripts/make_model.py --preset small --out "$MODELS/small" | tail -1
    MIB=$(python3 -c "import os; print(round(os.path.getsize('$BUNDLE') / 2**20, 1))")
    python3 scripts/serve_check.py smoke --model "$MODELS/small" --out "$OUT/smoke.json" --log-dir "$OUT" \
      --bundle-mib "$MIB" 2>&1 | tail -40 || status=1
    ;;
  int4)
    stage int4
    [ -d "$MODELS/small" ] || python3 scripts/make_model.py --preset small --out "$MODELS/small" | tail -1
    python3 scripts/serve_check.py int4 --model "$MODELS/small" --out "$OUT/int4_e2e.json" --log-dir "$OUT" \
      2>&1 | tail -60 || status=1
    ;;
  tp2)
    stage tp2
    [ -d "$MODELS/small" ] || python3 scripts/make_model.py --preset small --out "$MODELS/small" | tail -1
    python3 scripts/serve_check.py tp2 --model "$MODELS/small" --out "$OUT/int4_tp2.json" --log-dir "$OUT" \
      2>&1 | tail -30 || status=1
    ;;
  reliability)
    stage reliability
    [ -d "$MODELS/small" ] || python3 scripts/make_model.py --preset small --out "$MODELS/small" | tail -1
    # decode CUDA graphs stay on; SGLang's prefill-graph capture (80 s) is skipped to fit the soak in one call
    python3 scripts/reliability.py --model "$MODELS/small" --out "$OUT/reliability.json" --log-dir "$OUT" \
      --soak-minutes "${SOAK_MIN:-8}" -- --disable-prefill-cuda-graph 2>&1 | grep -v "^bad config ok" | tail -40 \
      || status=1
    ;;
  serving)
    stage serving
    # resumable over several calls on one machine: the state file lists the finished units;
    # each call stops (exit 75) before a unit that would not end within CALL_LIMIT_S of its start
    [ -d "$MODELS/8b" ] || python3 scripts/make_model.py --preset 8b --out "$MODELS/8b" | tail -1
    # a server left by a call killed at its time limit would hold the port and the GPU memory
    if pkill -f "sglang_sawint4.launch_server|sglang::"; then sleep 5; pkill -9 -f "sglang_sawint4.launch_server|sglang::"; fi
    STATE=${SERVING_STATE:-/tmp/serving_state.jsonl}
    BUDGET=0
    [ "${CALL_LIMIT_S:-0}" -gt 0 ] && BUDGET=$((CALL_LIMIT_S - SECONDS - 20))
    python3 scripts/bench_serving.py --model "$MODELS/8b" --out "$OUT/serving.json" --log-dir "$OUT" \
      --state "$STATE" --call-budget-s "$BUDGET" ${SERVING_ARGS:-} 2>&1 | tr "\r" "\n" | grep -v "it/s\]$" | tail -60
    rc=${PIPESTATUS[0]}
    cp "$STATE" "$OUT/serving_state.jsonl" 2>/dev/null
    [ "$rc" -ne 0 ] && status=$rc
    ;;
  gguf-part)
    # SmolLM2's GGUF (98 MB) reaches the host in parts, one per call (64 MiB per call):
    # keep this call's part (.bundle/smollm2/part-*) and the gguf wheel outside the work tree
    mkdir -p "$GGUF_PARTS"
    cp -v .bundle/smollm2/part-* "$GGUF_PARTS"/ 2>/dev/null || echo "no GGUF part in this call"
    if ls .bundle/gguf-*.whl >/dev/null 2>&1 && [ ! -d "$GGUF_SITE/gguf" ]; then
      python3 -m pip install -q --no-deps --no-index --target "$GGUF_SITE" .bundle/gguf-*.whl
    fi
    PYTHONPATH=$GGUF_SITE:$PYTHONPATH python3 -c "import gguf; print('gguf', gguf.__file__)" || status=1
    ls -l "$GGUF_PARTS"
    ;;
  served)
    stage served
    # the parts joined and checked, SmolLM2 converted to BF16 by our converter (as on the CPU
    # side), then one server per KV config gives greedy continuations (scripts/served_accuracy.py)
    if [ ! -d "$MODELS/smollm2" ]; then
      cat "$GGUF_PARTS"/part-* > /tmp/smollm2.gguf
      if ! echo "$SMOLLM2_SHA256  /tmp/smollm2.gguf" | sha256sum -c -; then
        echo "SmolLM2 GGUF incomplete: send every part first (stage gguf-part)"; exit 1
      fi
      if ! PYTHONPATH=$GGUF_SITE:$PYTHONPATH python3 -m sglang_sawint4.eval.gguf_model /tmp/smollm2.gguf \
        "$MODELS/smollm2"; then
        echo "SmolLM2 conversion failed"; rm -rf "$MODELS/smollm2"; exit 1
      fi
    fi
    python3 scripts/served_accuracy.py serve --model "$MODELS/smollm2" --prompts bench/logs/served_prompts.json \
      --out "$OUT/served_generations.json" --log-dir "$OUT" 2>&1 | tail -20
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    ;;
  profile)
    stage profile
    # Firecracker hosts: ncu reads the counters with the clocks left alone (--clock-control none)
    ncu --clock-control none --kernel-name regex:_decode_stage1 --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
      python3 scripts/bench_kernels.py --profile-case 32x8192 > "$OUT/ncu_decode.txt" 2>&1 || status=1
    tail -80 "$OUT/ncu_decode.txt"
    ;;
  *) echo "unknown stage $s"; status=2 ;;
  esac
done
exit $status
