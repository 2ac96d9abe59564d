#!/usr/bin/env bash
# A GPU session in one command: what to run when the device tool lends a GPU (one H100/H200, ~15 minutes
# of device time, one command of <= 10 minutes, no network, no ../shared, <= 8 files back).
#
#   bash bench/gpu_session.sh prep       # here, on the CPU machine: gpu_data/ (the shards the cells read)
#   run(command="bash bench/gpu_session.sh", carry=["gpu_data"], timeout_s=560)   # the GPU: everything
#   PYTHONPATH=. python bench/gpu_import.py PATH/gpu_session.tgz                   # here: file what came back
#   SMOKE=1 bash bench/gpu_session.sh prep && SMOKE=1 bash bench/gpu_session.sh   # the same flow on a CPU
#
# Stages, in order of value, inside one time budget (GPU_SECONDS, default 500; each stage is timed and
# logged to $WORK/<stage>.log, its exit code and seconds to $WORK/stages.jsonl):
#   probe    device, driver, versions, measured bf16 matmul TFLOP/s (the MFU denominator)   <= 30 s
#   kernels  the Triton kernel tests natively (no TRITON_INTERPRET), the varlen kernel's and --unpad's
#            (tests/test_kernels_varlen.py, tests/test_unpad.py)                            <= 110 s
#            a failure sends --kernels_ok false to the benchmark: no Triton path is chosen after it;
#            a failing unpad test sends --unpad_ok false: no unpadded path is chosen
#   bench    training throughput on real Wikipedia rows, HF BertForMaskedLM (the paper's stack) vs our paths,
#            padded and unpadded (--unpad), same process: bert6 batch 32, bert1 batch 32, bert6 batch 256
#            -> throughput.json (best path per model)                                         <= 170 s
#   members  stacked members (bench/members.py): K = 1, 2, 5 models trained as one stacked model vs one
#            after another (bert1, bert6, tiny), bert6's largest K in 80 GB, the 5-member bert1 committee's
#            batch-1 latency stacked vs one bert6 -> members.json, members.md                 <= 45 s
#   cells    paper-scale cells in order of value until the budget ends (bench/gpu_cells.py): each one
#            sized from throughput.json and started only if it will finish; cells already recorded in
#            results/cells/ (they travel with the work tree) are skipped, new records and the rebuilt
#            reports go to $WORK/results/
#   pack     whatever happened: $WORK -> $OUT/gpu_session.tgz (checkpoints and caches left out, <= 16 MiB)
# Everything after `prep` reads no raw data (TINYTLM_RAW is pointed at nothing, as on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE="${SMOKE:-0}"
base=gpu; [ "$SMOKE" = 1 ] && base=gpu_smoke  # never mix the miniature's data or outputs with the real ones
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TINYTLM_DATA="${TINYTLM_DATA:-${base}_data}"
WORK="${WORK:-${base}_out}"
GPU_SECONDS="${GPU_SECONDS:-500}"
SEEDS="${SEEDS:-3}"
scale=paper; [ "$SMOKE" = 1 ] && scale=mini
tables="table5,table9,table6,table3,table8"; [ "$SMOKE" = 1 ] && tables="table5,table9"

# provenance, computed once: the GPU machine gets the work tree without .git, so prep records the revision
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || rev="$rev+changes"
elif [ -f "$TINYTLM_DATA/REVISION" ]; then
  rev="$(cat "$TINYTLM_DATA/REVISION") (recorded at prep)"
else
  rev=unknown
fi

if [ "${1:-}" = prep ]; then  # CPU side: the data every cell of the scheduled tables reads
  python bench/gpu_cells.py --prep --scale "$scale" --tables "$tables" --data "$TINYTLM_DATA" || exit
  echo "$rev" > "$TINYTLM_DATA/REVISION"  # "+changes" included
  du -sh "$TINYTLM_DATA"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bash bench/gpu_session.sh [prep]" >&2; exit 2; }
[ -d "$TINYTLM_DATA" ] || { echo "error: $TINYTLM_DATA: not prepared; run 'bash bench/gpu_session.sh prep' and carry it" >&2; exit 2; }

rm -rf "$WORK"
mkdir -p "$WORK/bench" "$WORK/results/cells"
start=$SECONDS
left() { echo $((GPU_SECONDS - (SECONDS - start))); }
export TINYTLM_RAW=/nonexistent  # the GPU machine has no raw data: a file prep missed must fail here too

pack() {
  [ -n "${OUT:-}" ] || return 0
  local tgz="$OUT/gpu_session.tgz"
  tar czf "$tgz" --exclude='*.pt' --exclude=cache -C "$WORK" .
  if [ "$(stat -c %s "$tgz")" -gt $((16 * 1024 * 1024)) ]; then  # the device tool's limit: logs go first
    find "$WORK" -name '*.log' -size +1M -exec truncate -s 1M {} +
    tar czf "$tgz" --exclude='*.pt' --exclude=cache -C "$WORK" .
  fi
  echo "packed $tgz ($(stat -c %s "$tgz") bytes) after $((SECONDS - start)) s"
}
trap pack EXIT

stage() {  # $1 = name, $2 = time cap (s), rest = command; a failure is logged and the run goes on
  local name=$1 cap=$2; shift 2
  local log="$WORK/$name.log" t0=$SECONDS rc
  local budget; budget=$(left)
  [ "$cap" -gt $((budget - 15)) ] && cap=$((budget - 15))  # keep 15 s to pack
  if [ "$cap" -lt 5 ]; then
    printf '{"stage": "%s", "rc": null, "seconds": 0, "status": "not run: time budget spent"}\n' "$name" >> "$WORK/stages.jsonl"
    echo "== $name: not run, the time budget is spent"; return 1
  fi
  printf '# %s git %s\n$ %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rev" "$*" > "$log"
  echo "== $name (<= $cap s; log $log)"
  timeout -k 15 -s TERM "$cap" "$@" >> "$log" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="stopped at its time cap"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed"
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "status": "%s"}\n' "$name" $rc $((SECONDS - t0)) "$status" \
    >> "$WORK/stages.jsonl"
  echo "   $status (exit $rc) after $((SECONDS - t0)) s"; [ $rc -eq 0 ] || tail -n 5 "$log"
  return $rc
}

python - "$WORK/session.json" "$rev" "$GPU_SECONDS" "$SMOKE" "$scale" <<'EOF'
import json, sys, time, torch
path, rev, budget, smoke, scale = sys.argv[1:]
json.dump({"git": rev, "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC",
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpu_seconds": int(budget), "smoke": smoke == "1", "scale": scale,
           "command": "bash bench/gpu_session.sh"}, open(path, "w"), indent=2)
EOF

# 1. probe
probe=(python bench/probe.py --out "$WORK/bench"); [ "$SMOKE" = 1 ] && probe+=(--smoke)
stage probe 30 "${probe[@]}"

# 2. kernels, natively (the interpreter under SMOKE); a test that fails rules the Triton path out
interp=0; kt=(tests/test_kernels.py tests/test_kernels_conv.py tests/test_kernels_training.py tests/test_kernels_varlen.py
              tests/test_unpad.py)
[ "$SMOKE" = 1 ] && { interp=1; kt=(tests/test_kernels.py tests/test_kernels_conv.py tests/test_kernels_varlen.py
                                   tests/test_unpad.py -k "2x2x7x32 or dropout_seeds or fold_bn or varlen_dropout or pack_plan"); }
stage kernels 110 env TRITON_INTERPRET=$interp python -m pytest -o addopts= -m "not slow" -v -p no:cacheprovider "${kt[@]}"
krc=$?
passed=$(grep -c ' PASSED' "$WORK/kernels.log"); failed=$(grep -cE ' (FAILED|ERROR)' "$WORK/kernels.log")
kernels_ok=true
if [ "$failed" -gt 0 ] || [ "$passed" -eq 0 ] || { [ $krc -ne 0 ] && [ $krc -ne 124 ]; }; then kernels_ok=false; fi
unpad_ok=true  # the unpadded paths: their tests ran and none failed
if ! grep -q 'test_unpad.py::.* PASSED' "$WORK/kernels.log" || grep -qE 'test_(unpad|kernels_varlen).py::.* (FAILED|ERROR)' "$WORK/kernels.log"; then unpad_ok=false; fi
printf '{"passed": %d, "failed": %d, "rc": %d, "kernels_ok": %s, "unpad_ok": %s}\n' "$passed" "$failed" $krc $kernels_ok \
  $unpad_ok > "$WORK/kernels.json"
echo "   kernels: $passed passed, $failed failed -> Triton path $([ $kernels_ok = true ] && echo allowed || echo ruled out)," \
  "unpadded paths $([ $unpad_ok = true ] && echo allowed || echo ruled out)"

# 3. throughput on real Wikipedia rows: HF vs our paths, padded and unpadded, in one process; the fastest path
#    that passed its tests is chosen per model
tp=(python bench/train_throughput.py --gpu_session --unpad --kernels_ok "$kernels_ok" --unpad_ok "$unpad_ok"
    --probe "$WORK/bench/probe.json" --json "$WORK/bench/throughput.json" --out "$WORK/bench/train.md" --time_limit 110)
[ "$SMOKE" = 1 ] && tp+=(--smoke --time_limit 25)  # a CPU compile takes a minute: HF and eager only
stage bench 170 "${tp[@]}"

# 4. stacked members vs one after another, and the committee's batch-1 latency stacked (no case starts after 30 s)
mb=(python bench/members.py --json "$WORK/bench/members.json" --out "$WORK/bench/members.md")
if [ "$SMOKE" = 1 ]; then mb+=(--smoke --models tiny --members 1,2 --time_limit 5)  # shrunk models: proves it runs
else mb+=(--models bert1,bert6,tiny --time_limit 30); fi  # the goals' models first
stage members 45 "${mb[@]}"

# 5. paper-scale cells until the budget ends (records already committed travel along and are skipped)
if [ -d "results/cells/$scale" ]; then mkdir -p "$WORK/results/cells" && cp -r "results/cells/$scale" "$WORK/results/cells/"; fi
cells_budget=$(( $(left) - 25 ))
stage cells $((cells_budget + 10)) python bench/gpu_cells.py --throughput "$WORK/bench/throughput.json" \
  --budget "$cells_budget" --scale "$scale" --seeds "$SEEDS" --tables "$tables" --results "$WORK/results" \
  --cache "$WORK/cache"
echo "== done in $((SECONDS - start)) s of $GPU_SECONDS"
exit 0
