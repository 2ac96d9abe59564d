#!/usr/bin/env bash
# A GPU session in one command: what to run when the device tool lends a GPU (one H100/H200, ~15 minutes of
# device time, one command of <= 10 minutes, no network, no ../shared, <= 8 files back).
#
#   bash bench/gpu_session.sh prep       # here, on the CPU machine: gpu_data/ (the shards the cells read)
#   AOT_PY="env PYTHONPATH=.:cache/rehearsal-py312 python3.12" bash bench/gpu_session.sh prep
#                                        # ... and a Triton cache built under the GPU's Python and triton (optional)
#   run(command="bash bench/gpu_session.sh", carry=["gpu_data"], timeout_s=560)   # the GPU: everything
#   PYTHONPATH=. python3 bench/gpu_import.py PATH/gpu_session.tgz                  # here: file what came back
#   SMOKE=1 bash bench/gpu_session.sh prep && SMOKE=1 bash bench/gpu_session.sh   # the same flow on a CPU
#
# One interpreter, PY (default python3: the GPU image's venv has no `python`), for every step. Stages, in order
# of value, inside one time budget (GPU_SECONDS, default 500), each under `timeout`, logged to $WORK/<stage>.log,
# its exit code and seconds to $WORK/stages.jsonl (bench/README.md has the table with expected seconds):
#   preflight  PY imports torch, triton, pytest, transformers; CUDA present (not under SMOKE); versions, device.
#              Anything missing ends the command at once with one line (exit 2): no GPU time is wasted
#   probe      device, driver, versions, measured bf16 matmul TFLOP/s (the MFU denominator)
#   kernels    bench/aot.py: every kernel launch of the project's shapes compiled for this GPU in parallel into
#              the session's Triton cache (a compile check under the image's versions); then bench/gpu_kernels.py:
#              the numbers of each path (attention, varlen/unpad, conv stem, CUDA graphs) against the torch
#              references, one verdict per path in kernels.json. A path is ruled out only by its own failure;
#              one that did not run is "not run" and is not used
#   bench      training throughput on real Wikipedia rows: one of each family at bert6 batch 32 (HF as the
#              paper runs it, eager, CUDA graphs, Triton, unpadded + Triton), then bert1, then batch 256, then
#              variants -> throughput.json (best path per model), compile time apart from the steady rate
#   members    stacked members vs one after another, the committee's batch-1 latency -> members.json, .md
#   cells      paper-scale cells in order of value until the budget ends (bench/gpu_cells.py); cells already
#              recorded in results/cells/ travel with the work tree and are skipped
#   pack       whatever happened: $WORK -> $OUT/gpu_session.tgz (checkpoints and caches left out, <= 16 MiB)
# Everything after `prep` reads no raw data and downloads nothing (TINYTLM_RAW is pointed at nothing and
# TINYTLM_NO_DOWNLOAD=1, as on the GPU machine, which has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
SMOKE="${SMOKE:-0}"
base=gpu; [ "$SMOKE" = 1 ] && base=gpu_smoke  # never mix the miniature's data or outputs with the real ones
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TINYTLM_DATA="${TINYTLM_DATA:-${base}_data}"
export TINYTLM_NO_DOWNLOAD=1
WORK="${WORK:-${base}_out}"
GPU_SECONDS="${GPU_SECONDS:-500}"
SEEDS="${SEEDS:-3}"
scale=paper; [ "$SMOKE" = 1 ] && scale=mini
tables="table5,table9,table6,table3,table8"; [ "$SMOKE" = 1 ] && tables="table5,table9"

command -v "$PY" > /dev/null || {
  echo "error: $PY not found on PATH (set PY=... to the Python with torch)" >&2; exit 2; }

# provenance, computed once: the GPU machine gets the work tree without .git, so prep records the revision
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || rev="$rev+changes"
elif [ -f "$TINYTLM_DATA/REVISION" ]; then
  rev="$(cat "$TINYTLM_DATA/REVISION") (recorded at prep)"
else
  rev=unknown
fi

if [ "${1:-}" = prep ]; then  # CPU side: the data every cell of the scheduled tables reads
  "$PY" bench/gpu_cells.py --prep --scale "$scale" --tables "$tables" --data "$TINYTLM_DATA" || exit
  echo "$rev" > "$TINYTLM_DATA/REVISION"  # "+changes" included
  if [ -n "${AOT_PY:-}" ]; then  # a Python (a command: words split) with the GPU image's Python and triton
    rm -rf "$TINYTLM_DATA/triton_cache"  # its Triton cache for sm_90 (cubins only, ~10 MiB), carried with the data
    # shellcheck disable=SC2086
    env -u TRITON_INTERPRET $AOT_PY bench/aot.py --arch 90 --matrix full --cache "$TINYTLM_DATA/triton_cache" \
      --strip --json "$TINYTLM_DATA/triton_cache.json" || exit
  fi
  du -sh "$TINYTLM_DATA"
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bash bench/gpu_session.sh [prep]" >&2; exit 2; }
[ -d "$TINYTLM_DATA" ] || {
  echo "error: $TINYTLM_DATA: not prepared; run 'bash bench/gpu_session.sh prep' and carry it" >&2; exit 2; }

# 0. preflight (<= 30 s): one line and exit 2 when anything is missing, before any GPU time is spent
if ! line=$(timeout -k 5 30 "$PY" bench/preflight.py $([ "$SMOKE" = 1 ] || echo --cuda) 2>&1); then
  echo "error: preflight: $(echo "$line" | tail -n 1)" >&2; exit 2
fi
echo "$line"

rm -rf "$WORK"
mkdir -p "$WORK/bench" "$WORK/results/cells"
start=$SECONDS
left() { echo $((GPU_SECONDS - (SECONDS - start))); }
export TINYTLM_RAW=/nonexistent  # the GPU machine has no raw data: a file prep missed must fail here too
# the Triton cache bench/aot.py fills and every later stage reads: the one prep built under the GPU's versions
# (AOT_PY; a relative path, as at prep) when carried, else a new one (not packed)
export TRITON_CACHE_DIR="$WORK/cache/triton"
[ -d "$TINYTLM_DATA/triton_cache" ] && TRITON_CACHE_DIR="$TINYTLM_DATA/triton_cache"

pack() {
  [ -n "${OUT:-}" ] || return 0
  local tgz="$OUT/gpu_session.tgz"
  timeout 60 tar czf "$tgz" --exclude='*.pt' --exclude=cache -C "$WORK" .
  if [ "$(stat -c %s "$tgz")" -gt $((16 * 1024 * 1024)) ]; then  # the device tool's limit: logs go first
    find "$WORK" -name '*.log' -size +1M -exec truncate -s 1M {} +
    timeout 60 tar czf "$tgz" --exclude='*.pt' --exclude=cache -C "$WORK" .
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
    printf '{"stage": "%s", "rc": null, "seconds": 0, "status": "not run: time budget spent"}\n' "$name" \
      >> "$WORK/stages.jsonl"
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

timeout -k 5 30 "$PY" - "$WORK/session.json" "$rev" "$GPU_SECONDS" "$SMOKE" "$scale" <<'EOF'
import json, sys, time, torch
path, rev, budget, smoke, scale = sys.argv[1:]
json.dump({"git": rev, "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC",
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpu_seconds": int(budget), "smoke": smoke == "1", "scale": scale,
           "command": "bash bench/gpu_session.sh"}, open(path, "w"), indent=2)
EOF

# 1. probe
probe=("$PY" bench/probe.py --out "$WORK/bench"); [ "$SMOKE" = 1 ] && probe+=(--smoke)
stage probe 30 "${probe[@]}"

# 2. kernels: every launch compiled in parallel into the cache the later stages read (bench/aot.py, <= 70 s), then
#    the numbers of each path; one verdict per path in kernels.json decides what the later stages may use
gk=("$PY" bench/gpu_kernels.py --json "$WORK/kernels.json" --aot full --aot_jobs 12 --aot_timeout 70 --time_limit 130)
[ "$SMOKE" = 1 ] && gk=(env TRITON_INTERPRET=1 "$PY" bench/gpu_kernels.py --json "$WORK/kernels.json" --smoke
                        --aot smoke --aot_jobs 1 --aot_timeout 60 --time_limit 100)
stage kernels 150 "${gk[@]}"
read -r kernels_ok unpad_ok graphs_ok conv_ok < <(timeout 30 "$PY" bench/gpu_kernels.py --flags "$WORK/kernels.json")
echo "   kernel paths passed: attention ${kernels_ok:-false}, varlen/unpad ${unpad_ok:-false}," \
  "CUDA graphs ${graphs_ok:-false}, conv stem ${conv_ok:-false}"

# 3. throughput on real Wikipedia rows: one of each family first; the fastest path that passed is chosen per model
tp=("$PY" bench/train_throughput.py --gpu_session --kernels_ok "${kernels_ok:-false}" --unpad_ok "${unpad_ok:-false}"
    --graphs_ok "${graphs_ok:-false}" --conv_ok "${conv_ok:-false}" --probe "$WORK/bench/probe.json"
    --json "$WORK/bench/throughput.json" --out "$WORK/bench/train.md" --time_limit 200)
[ "$SMOKE" = 1 ] && tp+=(--smoke --time_limit 25)  # a CPU compile takes a minute: HF and eager only
stage bench 240 "${tp[@]}"

# 4. stacked members vs one after another, and the committee's batch-1 latency stacked (no case starts after 30 s)
mb=("$PY" bench/members.py --json "$WORK/bench/members.json" --out "$WORK/bench/members.md")
if [ "$SMOKE" = 1 ]; then mb+=(--smoke --models tiny --members 1,2 --time_limit 5)  # shrunk models: proves it runs
else mb+=(--models bert1,bert6,tiny --time_limit 30); fi  # the goals' models first
stage members 45 "${mb[@]}"

# 5. paper-scale cells until the budget ends (records already committed travel along and are skipped)
if [ -d "results/cells/$scale" ]; then
  mkdir -p "$WORK/results/cells" && cp -r "results/cells/$scale" "$WORK/results/cells/"
fi
cells_budget=$(( $(left) - 25 ))
stage cells $((cells_budget + 10)) "$PY" bench/gpu_cells.py --throughput "$WORK/bench/throughput.json" \
  --budget "$cells_budget" --scale "$scale" --seeds "$SEEDS" --tables "$tables" --results "$WORK/results" \
  --cache "$WORK/cache/runs" --conv_ok "${conv_ok:-false}"
echo "== done in $((SECONDS - start)) s of $GPU_SECONDS"
exit 0
