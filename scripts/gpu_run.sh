#!/usr/bin/env bash
# One GPU-host session: install the offline bundle and this repo, then run the
# requested stages.  Everything it writes lands under $OUT (default ./.out).
#
#   bash scripts/gpu_run.sh install tests bench smoke int4
#
# Stages: warm (exit 3 unless a previous call on this machine installed the bundle),
# install (bundle + package, always first), tests (pytest on the GPU; $TESTS, default tests/),
# bench (kernel benchmark), prefill-probe (bench/logs/one_request_prefill_probe.py: one
# request's prefill over an 8k cached prefix, host and device time per config), served-probe
# (bench/logs/served_prefill_probe.py on the 8B-shaped model: served prefills over a cached
# prefix alone and under the serving benchmark's random and shared-prefix loads, profiled;
# $SERVED_PROBE_ARGS), smoke (BF16 server smoke), int4 (INT4 e2e),
# policy (the default int4-bdr server on $POLICY_ARCH, default qwen3, a generated model:
# its KV policy, every feature check, served attention vs reference with a BF16 layer),
# quickstart (the README's quick start, as written, on $QUICKSTART_MODEL, default qwen15),
# flashinfer (the FlashInfer prefill path on INT4 pages against the Triton one, its
# feature, attention-reference and poison checks), burst (a 64 x 32k shared-prefix burst on
# the 8B-shaped model: peak GPU memory per prefill path), model8b (generate that model),
# tp2 (INT4 with --tp 2; needs 2 GPUs), reliability (bad config + requests, soak of
# $SOAK_MIN minutes, default 8), serving (serving benchmark on an 8B-shaped model;
# resumable: CALL_LIMIT_S, SERVING_STATE, SERVING_ARGS; exit 75 = call again),
# gguf-part (keep this call's parts of GGUF files, .bundle/carry/<model>/part-*, the gguf
# wheel .bundle/gguf-*.whl and the eval texts .bundle/eval-texts.tar.xz),
# served (join, convert $SERVED_MODEL, default qwen15, then sglang_sawint4.eval.served serve:
# bf16 / the default int4-bdr (its KV policy) / the paper's int4-bdr, greedy continuations,
# and compare: the harness replays them on the GPU),
# long-acc (join, convert each of $LONG_ACC_MODELS, default Gemma 3, Qwen2.5-Coder 0.5B and 1.5B;
# resolve the launcher's KV policy for it on the GPU, then perplexity at 2,048 and at its
# maximum context with BF16, naive INT4, the paper's default, the served default and the
# uncalibrated fallback, $LONG_ACC_ARGS added), passkey (likewise: $PASSKEY_MODELS,
# $PASSKEY_KMEANS_MODELS, $PASSKEY_CONTEXT), gsm (GSM-style problems on $GSM_MODEL, default
# qwen15, with its served default), profile (ncu on the decode kernel, 32 x 8k), stalls (ncu
# stall reasons at $CASE, default 64x32768).  Needs the bundle at $BUNDLE (default
# .bundle/sglang-0.5.17-py312.tar.xz, built by python -m sglang_sawint4.tools.bundle build).
# The parts: split -b 59M -d GGUF .bundle/parts/<model>/part-, one part per call hard-linked
# into .bundle/carry/<model>/ (64 MiB travel per call, the work tree included), joined in name
# order; <model> is smollm2, qwen, qwen15 or gemma.
set -uo pipefail
OUT=${OUT:-$PWD/.out}
BUNDLE=${BUNDLE:-.bundle/sglang-0.5.17-py312.tar.xz}
SITE=${SITE:-/tmp/sglang-site}
PKG=${PKG:-/tmp/sawint4-site}
MODELS=${MODELS:-/tmp/models}
GGUF_PARTS=${GGUF_PARTS:-/tmp/gguf-parts}
GGUF_SITE=${GGUF_SITE:-/tmp/gguf-site}
EVAL_DATA=${EVAL_DATA:-/tmp/eval-texts}
# sha256 of each GGUF as packaged on PyPI (../shared/docs/models.md)
declare -A GGUF_SHA256=(
  [smollm2]=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  [qwen]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  [qwen15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
  [gemma]=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
)
# their names in the results rows
declare -A MODEL_LABEL=([smollm2]=SmolLM2-135M-Instruct [qwen]=Qwen2.5-Coder-0.5B-Instruct
                        [qwen15]=Qwen2.5-Coder-1.5B-Instruct [gemma]=Gemma-3-270M)
# and their maximum context (max_position_embeddings)
declare -A MODEL_CONTEXT=([smollm2]=8192 [qwen]=32768 [qwen15]=32768 [gemma]=32768)
# windows per text at 2,048 tokens (as the committed rows at that context)
declare -A WINDOWS_2K=([smollm2]=3 [qwen]=2 [qwen15]=2 [gemma]=2)
mkdir -p "$OUT" "$MODELS"
# the device tool returns at most 8 files from $OUT: everything leaves as one archive
pack_out() { (cd "$OUT" && [ -n "$(ls -A)" ] && tar czf /tmp/gpu_out.tgz --exclude=gpu_out.tgz . && \
  find . -mindepth 1 -delete && mv /tmp/gpu_out.tgz gpu_out.tgz) || true; }
trap pack_out EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}
status=0
stage() { echo; echo "=== $1 ($(date +%T))"; }

# model_8b: the 8B-shaped generated model at $MODELS/8b (generated once per machine)
model_8b() {
  [ -d "$MODELS/8b" ] || python3 -m sglang_sawint4.tools.make_model --preset 8b --out "$MODELS/8b" | tail -1
}

# stop_servers: a server a timed-out call left running holds the port and GPU memory
stop_servers() {
  if pkill -f "sglang_sawint4.launch_server|sglang::"; then sleep 5; pkill -9 -f "sglang_sawint4.launch_server|sglang::"; fi
}

# join_convert NAME: the parts of GGUF NAME joined, sha256-checked and converted to
# $MODELS/NAME by our converter (as on the CPU side); exits if a part is missing
join_convert() {
  local name=$1
  [ -d "$MODELS/$name" ] && return 0
  cat "$GGUF_PARTS/$name"/part-* > "/tmp/$name.gguf"
  if ! echo "${GGUF_SHA256[$name]}  /tmp/$name.gguf" | sha256sum -c -; then
    echo "$name GGUF incomplete: send every part first (stage gguf-part)"; exit 1
  fi
  if ! PYTHONPATH=$GGUF_SITE:$PYTHONPATH python3 -m sglang_sawint4.eval.gguf_model "/tmp/$name.gguf" \
    "$MODELS/$name" > /dev/null; then
    echo "$name conversion failed"; rm -rf "${MODELS:?}/$name"; exit 1
  fi
  rm -f "/tmp/$name.gguf"
}

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
      python3 -m sglang_sawint4.tools.bundle install --bundle "$BUNDLE" --target "$SITE" 2>&1 | tee "$OUT/bundle_install.log" || status=1
    else
      echo "bundle already unpacked at $SITE"
    fi
    python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target "$PKG" . \
      2>&1 | grep -v WARNING | tail -3
    python3 -c "import sglang_sawint4.kernels, importlib.metadata as m; print('plugin:', [e.value for e in m.entry_points(group='sglang.srt.plugins')])"
    ;;
  tests)
    stage tests
    python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests} 2>&1 | tail -40 | tee "$OUT/gpu_tests.log" || status=1
    ;;
  bench)
    stage bench
    python3 -m sglang_sawint4.bench.kernels --out "$OUT/kernels.json" 2>&1 | tail -60 || status=1
    ;;
  smoke)
    stage smoke
    [ -d "$MODELS/small" ] || python3 -m sglang_sawint4.tools.make_model --preset small --out "$MODELS/small" | tail -1
    MIB=$(python3 -c "import os; print(round(os.path.getsize('$BUNDLE') / 2**20, 1))")
    python3 -m sglang_sawint4.bench.e2e smoke --model "$MODELS/small" --out "$OUT/smoke.json" --log-dir "$OUT" \
      --bundle-mib "$MIB" 2>&1 | tail -40 || status=1
    ;;
  int4)
    stage int4
    [ -d "$MODELS/small" ] || python3 -m sglang_sawint4.tools.make_model --preset small --out "$MODELS/small" | tail -1
    python3 -m sglang_sawint4.bench.e2e int4 --model "$MODELS/small" --out "$OUT/int4_e2e.json" --log-dir "$OUT" \
      2>&1 | tail -60 || status=1
    ;;
  flashinfer)
    stage flashinfer
    [ -d "$MODELS/small" ] || python3 -m sglang_sawint4.tools.make_model --preset small --out "$MODELS/small" | tail -1
    python3 -m sglang_sawint4.bench.e2e flashinfer --model "$MODELS/small" --out "$OUT/flashinfer_e2e.json" \
      --log-dir "$OUT" 2>&1 | tail -60 || status=1
    ;;
  model8b)
    stage model8b
    model_8b
    ;;
  burst)
    stage burst
    model_8b
    stop_servers
    # both prefill paths, the serving benchmark's server flags (BURST_ARGS replaces them)
    python3 -m sglang_sawint4.bench.prefix_burst --model "$MODELS/8b" --out "$OUT/prefix_burst.json" --log-dir "$OUT" \
      ${BURST_ARGS:---configs int4-bdr-flashinfer,int4-bdr-triton -- --disable-prefill-cuda-graph \
      --mem-fraction-static 0.3 --cuda-graph-max-bs 64 --chunked-prefill-size 8192} 2>&1 | tail -20 || status=1
    ;;
  tp2)
    stage tp2
    [ -d "$MODELS/small" ] || python3 -m sglang_sawint4.tools.make_model --preset small --out "$MODELS/small" | tail -1
    python3 -m sglang_sawint4.bench.e2e tp2 --model "$MODELS/small" --out "$OUT/int4_tp2.json" --log-dir "$OUT" \
      2>&1 | tail -30 || status=1
    ;;
  reliability)
    stage reliability
    [ -d "$MODELS/small" ] || python3 -m sglang_sawint4.tools.make_model --preset small --out "$MODELS/small" | tail -1
    # decode CUDA graphs stay on; SGLang's prefill-graph capture (80 s) is skipped to fit the soak in one call
    python3 -m sglang_sawint4.bench.reliability --model "$MODELS/small" --out "$OUT/reliability.json" --log-dir "$OUT" \
      --soak-minutes "${SOAK_MIN:-8}" -- --disable-prefill-cuda-graph 2>&1 | grep -v "^bad config ok" | tail -40 \
      || status=1
    ;;
  serving)
    stage serving
    # resumable over several calls on one machine: the state file lists the finished units;
    # each call stops (exit 75) before a unit that would not end within CALL_LIMIT_S of its start
    model_8b
    # a server left by a call killed at its time limit would hold the port and the GPU memory
    stop_servers
    STATE=${SERVING_STATE:-/tmp/serving_state.jsonl}
    BUDGET=0
    [ "${CALL_LIMIT_S:-0}" -gt 0 ] && BUDGET=$((CALL_LIMIT_S - SECONDS - 20))
    set -f  # SERVING_ARGS word-split, not globbed: a level C*W is not a file pattern
    python3 -m sglang_sawint4.bench.serving --model "$MODELS/8b" --out "$OUT/serving.json" --log-dir "$OUT" \
      --state "$STATE" --call-budget-s "$BUDGET" ${SERVING_ARGS:--- --disable-prefill-cuda-graph \
      --mem-fraction-static 0.3 --cuda-graph-max-bs 64 --chunked-prefill-size 8192} 2>&1 | tr "\r" "\n" | grep -v "it/s\]$" | tail -60
    rc=${PIPESTATUS[0]}
    set +f
    cp "$STATE" "$OUT/serving_state.jsonl" 2>/dev/null
    [ "$rc" -ne 0 ] && status=$rc
    ;;
  gguf-part)
    # GGUF files reach the host in parts, one per call (64 MiB per call): keep this call's
    # parts, the gguf wheel and the eval texts outside the work tree
    for d in .bundle/carry/*/ .bundle/parts/*/; do
      [ -d "$d" ] || continue
      mkdir -p "$GGUF_PARTS/$(basename "$d")" && cp -vn "$d"part-* "$GGUF_PARTS/$(basename "$d")"/
    done
    if ls .bundle/gguf-*.whl >/dev/null 2>&1 && [ ! -d "$GGUF_SITE/gguf" ]; then
      python3 -m pip install -q --no-deps --no-index --target "$GGUF_SITE" .bundle/gguf-*.whl
    fi
    if [ -f .bundle/eval-texts.tar.xz ]; then
      mkdir -p "$EVAL_DATA" && tar xJf .bundle/eval-texts.tar.xz -C "$EVAL_DATA" && ls -l "$EVAL_DATA"
    fi
    PYTHONPATH=$GGUF_SITE:$PYTHONPATH python3 -c "import gguf; print('gguf', gguf.__file__)" || status=1
    ls -lR "$GGUF_PARTS"
    ;;
  served)
    stage served
    # one server per KV config side by side (bf16, the launcher's default int4-bdr with its KV
    # policy, the paper's int4-bdr), greedy continuations of the committed prompts; then the
    # harness replays every continuation on the GPU (sglang_sawint4.eval.served)
    name=${SERVED_MODEL:-qwen15}
    join_convert "$name"
    paper=$(python3 -c "import json; from sglang_sawint4 import format as f; print(f.default_block_size(json.load(open('$MODELS/$name/config.json'))['head_dim']))")
    python3 -m sglang_sawint4.eval.served serve --model "$MODELS/$name" --prompts "${SERVED_PROMPTS:-bench/logs/served_prompts_$name.json}" \
      --configs "bf16,int4-bdr,int4-bdr-$paper" --out "$OUT/served_generations_$name.json" --log-dir "$OUT" 2>&1 | tail -20
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    python3 -m sglang_sawint4.eval.served compare --device cuda --model "$MODELS/$name" --model-name "${MODEL_LABEL[$name]}" \
      --served "$OUT/served_generations_$name.json" --prompts "${SERVED_PROMPTS:-bench/logs/served_prompts_$name.json}" \
      --out "$OUT/accuracy_gpu.json" 2>&1 | tail -8
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    ;;
  long-acc)
    stage long-acc
    # per model: the KV policy the launcher would serve, resolved on this GPU by the same code
    # (python -m sglang_sawint4.policy resolve), then BF16, naive INT4, the paper's default, the
    # served default and the uncalibrated fallback at 2,048 tokens and at the maximum context;
    # rows go to $OUT/accuracy_gpu.json, merged on the CPU side by sglang_sawint4.eval.merge
    TEXTS=(--text "kjv=$EVAL_DATA/kjv.txt" --text "austen=$EVAL_DATA/austen.txt" --text "brown=$EVAL_DATA/brown.txt")
    for name in ${LONG_ACC_MODELS:-qwen15 qwen gemma}; do
      join_convert "$name"
      python3 -m sglang_sawint4.policy resolve --model-path "$MODELS/$name" --out "$OUT/policy_$name.json" 2>&1 | tail -2
      for ctx in 2048 "${MODEL_CONTEXT[$name]}"; do
        win=$([ "$ctx" = 2048 ] && echo "${WINDOWS_2K[$name]}" || echo 1)
        python3 -m sglang_sawint4.eval.perplexity --device cuda --no-plot --model "$MODELS/$name" \
          --model-name "${MODEL_LABEL[$name]}" "${TEXTS[@]}" --context "$ctx" --windows "$win" --methods default \
          --policy "$OUT/policy_$name.json" --fallback-policy ${LONG_ACC_ARGS:-} --out "$OUT/accuracy_gpu.json" 2>&1 \
          | grep -v "it/s\]" | grep " ppl " | tail -6
        [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
      done
    done
    ;;
  passkey)
    stage passkey
    # passkey retrieval, 8 depths, at $PASSKEY_CONTEXT or each model's maximum context: BF16,
    # naive INT4 and the default BDR for $PASSKEY_MODELS (set it empty to skip them), then the
    # calibrated k-means centroid (16 clusters + the default BDR block, calibrated on KJV) for
    # $PASSKEY_KMEANS_MODELS
    for name in ${PASSKEY_MODELS-gemma qwen}; do
      join_convert "$name"
      python3 -m sglang_sawint4.eval.passkey --device cuda --model "$MODELS/$name" --model-name "${MODEL_LABEL[$name]}" \
        --context "${PASSKEY_CONTEXT:-${MODEL_CONTEXT[$name]}}" --samples 8 --out "$OUT/accuracy_gpu.json" 2>&1 \
        | grep "passkey at\|Error" | tail -8
      [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    done
    for name in ${PASSKEY_KMEANS_MODELS-qwen}; do
      join_convert "$name"
      python3 -m sglang_sawint4.eval.passkey --device cuda --model "$MODELS/$name" --model-name "${MODEL_LABEL[$name]}" \
        --context "${PASSKEY_CONTEXT:-${MODEL_CONTEXT[$name]}}" --samples 8 --kmeans 16 \
        --calib-text "$EVAL_DATA/kjv.txt" --only-extra --out "$OUT/accuracy_gpu.json" 2>&1 \
        | grep "passkey at\|Error" | tail -4
      [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    done
    ;;
  gsm)
    stage gsm
    name=${GSM_MODEL:-qwen15}
    join_convert "$name"
    [ -f "$OUT/policy_$name.json" ] || python3 -m sglang_sawint4.policy resolve --model-path "$MODELS/$name" \
      --out "$OUT/policy_$name.json" | tail -1
    python3 -m sglang_sawint4.eval.gsm --device cuda --model "$MODELS/$name" --model-name "${MODEL_LABEL[$name]}" \
      --problems-file bench/logs/gsm_problems.json --batch 40 --max-new-tokens 384 --policy "$OUT/policy_$name.json" \
      --out "$OUT/accuracy_gpu.json" --samples-out "$OUT/gsm_samples_$name.jsonl" 2>&1 | tail -8
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    ;;
  policy)
    stage policy
    arch=${POLICY_ARCH:-qwen3}
    [ -d "$MODELS/small-$arch" ] || python3 -m sglang_sawint4.tools.make_model --preset small --arch "$arch" \
      --out "$MODELS/small-$arch" | tail -1
    python3 -m sglang_sawint4.bench.e2e policy --model "$MODELS/small-$arch" --model-name "small-$arch" \
      --out "$OUT/policy_e2e_$arch.json" --log-dir "$OUT" 2>&1 | tail -40 || status=1
    ;;
  quickstart)
    stage quickstart
    # the README's quick start, as written (its model path replaced by this host's)
    name=${QUICKSTART_MODEL:-qwen15}
    join_convert "$name"
    MODEL="$MODELS/$name" bash scripts/quickstart.sh 2>&1 | tee "$OUT/quickstart.log" | tail -30
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    ;;
  prefill-probe)
    stage prefill-probe
    python3 bench/logs/one_request_prefill_probe.py 2>&1 | tee "$OUT/one_request_prefill_probe.txt" | tail -40
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
    ;;
  served-probe)
    stage served-probe
    model_8b
    stop_servers
    python3 bench/logs/served_prefill_probe.py --model "$MODELS/8b" --out-dir "$OUT" ${SERVED_PROBE_ARGS:-} 2>&1 \
      | tail -80 || status=1
    ;;
  profile)
    stage profile
    # Firecracker hosts: ncu reads the counters with the clocks left alone (--clock-control none)
    ncu --clock-control none --kernel-name regex:_decode_stage1 --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
      python3 -m sglang_sawint4.bench.kernels --profile-case 32x8192 > "$OUT/ncu_decode.txt" 2>&1 || status=1
    tail -80 "$OUT/ncu_decode.txt"
    ;;
  stalls)
    stage stalls
    # stall reasons per issued instruction, issue and pipe use, shared-memory wavefronts of
    # decode stage 1 at ${CASE:-64x32768} (bench/logs/ncu_stalls_v7_h200.txt came from this command,
    # ncu_stalls_v8tt_h200.txt from it with that candidate copied over kernels/decode.py)
    ncu --clock-control none --kernel-name regex:_decode_stage1 --launch-skip 3 --launch-count 1 \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio',smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__warps_eligible.avg.per_cycle_active,sm__throughput.avg.pct_of_peak_sustained_active,l1tex__throughput.avg.pct_of_peak_sustained_active \
      python3 -m sglang_sawint4.bench.kernels --profile-case "${CASE:-64x32768}" > "$OUT/ncu_stalls.txt" 2>&1 || status=1
    grep -E "profile case|stalled|inst_executed|issue_active|hmma|wavefronts|dram__|duration" "$OUT/ncu_stalls.txt"
    ;;
  *) echo "unknown stage $s"; status=2 ;;
  esac
done
exit $status
