#!/usr/bin/env bash
# The GPU session, scripted: what to run when the device tool lends a GPU (30 minutes, 10 per call).
#
#   bash bench/gpu_session.sh prep                  # here, on the CPU machine: gpu_data/ to carry (26 s)
#   run(command="bash bench/gpu_session.sh kernels bench", carry=["gpu_data"])      # call 1 (GPU)
#   run(command="bash bench/gpu_session.sh engine", carry=["gpu_data"])             # call 2 (GPU)
#   run(command="bash bench/gpu_session.sh paper", carry=["gpu_data"])              # call 3 (GPU)
#   SMOKE=1 bash bench/gpu_session.sh prep kernels bench engine paper              # the flow on a CPU, tiny sizes
#
# Stages (logs and results go to $WORK, default gpu_out/; every log starts with the time, git revision,
# torch/triton versions and device; on exit $WORK is packed into $OUT/gpu_session.tgz when $OUT is set,
# because the device tool returns at most 8 files):
#   prep     prepare the data the GPU stages read (the GPU machine has no ../shared): Wikipedia's first
#            200,000 shuffled rows and the task shards of Tables 3, 5, 8 and 9 at the paper's sizes:
#            61.8 MB measured, which with the ~1.4 MB work tree just fits the 64 MiB a call carries.
#            Tables 1, 2, 4 and 7 need constructed sets built from all of Wikipedia: not carried.
#   kernels  the kernel and model tests on the GPU, natively (no TRITON_INTERPRET)
#   bench    bench/attention.py (T 128; T 512 with dropout), train_throughput.py, latency.py
#   engine   BERT-6 train_mlm.py --ws 40000 for one epoch (compiled, KERNELS=torch|triton), then
#            train_cls.py --task agnews (the paper's 50 epochs) from it
#   paper    paper-scale tables (PAPER_TABLES, default Table 9, Table 5, budget; SEEDS, default 1) until
#            PAPER_SECONDS (default 540) run out. Cells are cached in runs/paper, which survives only while
#            the machine stays warm: a cut-off pre-training resumes there, a cut-off fine-tuning restarts.
# Copy what comes back into bench/results/ and results/ with the device named; never edit the numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash bench/gpu_session.sh STAGE... (prep, kernels, bench, engine, paper)" >&2; exit 2; }
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TINYTLM_DATA="${TINYTLM_DATA:-gpu_data}"
WORK="${WORK:-gpu_out}"
SMOKE="${SMOKE:-0}"
PAPER_CACHE="${PAPER_CACHE:-runs/paper}"
if [ "$SMOKE" = 1 ]; then
  PAPER_CACHE="$WORK/cache"  # never mix miniature cells into the real cache
fi
mkdir -p "$WORK"
status=0

# provenance, computed once: the GPU machine gets the work tree without .git, so prep records the revision
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || rev="$rev+changes"
elif [ -f "$TINYTLM_DATA/REVISION" ]; then
  rev="$(cat "$TINYTLM_DATA/REVISION") (recorded at prep)"
else
  rev=unknown
fi
versions=$(python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1)

pack() {
  if [ -n "${OUT:-}" ] && [ "$OUT" != "$WORK" ]; then
    tar czf "$OUT/gpu_session.tgz" --exclude='*.pt' --exclude=cache -C "$WORK" .
  fi
}
trap pack EXIT

step() {  # $1 = log name, rest = command; keeps going after a failure and reports it at the end
  local log="$WORK/$1.log"; shift
  printf '# %s git %s\n# %s\n$ %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rev" "$versions" "$*" > "$log"
  echo "== $* (log: $log)"
  local t0=$SECONDS
  "$@" >> "$log" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - t0)) s" >> "$log"
  if [ $rc -eq 124 ]; then
    echo "   stopped at the time budget: run the stage again on the warm machine to go on"
  elif [ $rc -ne 0 ]; then
    echo "   FAILED (exit $rc): tail of $log"; tail -n 5 "$log"; status=1
  fi
}

noraw=()  # the GPU machine has no raw data: under SMOKE, hide it so that a file prep missed fails here too
[ "$SMOKE" = 1 ] && noraw=(env TINYTLM_RAW=/nonexistent)

for stage in "$@"; do
  case "$stage" in
    prep)
      rows=200000; [ "$SMOKE" = 1 ] && rows=2000
      step prep_wiki python data_prep/wikipedia.py --rows "$rows" --out "$TINYTLM_DATA"
      tasks=("--task agnews" "--task fewrel --labels 0,1,2,3,4,5,6,7,8,9"
             "--task fewrel --fewrel-source train_wiki --train-per-label 100 --test-per-label 30")
      [ "$SMOKE" = 1 ] && tasks=("--task agnews --train-per-label 8 --test-per-label 8")
      i=0
      for t in "${tasks[@]}"; do
        i=$((i + 1)); step "prep_task$i" python data_prep/tasks.py $t --out "$TINYTLM_DATA"
      done
      echo "$rev" > "$TINYTLM_DATA/REVISION"  # the revision computed above, "+changes" included
      du -sh "$TINYTLM_DATA"
      ;;
    kernels)
      interp=0; [ "$SMOKE" = 1 ] && interp=1
      step kernels env TRITON_INTERPRET=$interp python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_kernels_training.py tests/test_model.py
      ;;
    bench)
      mkdir -p "$WORK/bench/t128" "$WORK/bench/t512"
      if [ "$SMOKE" = 1 ]; then
        step bench_train python bench/train_throughput.py --smoke --out "$WORK/bench/train.md"
        step bench_latency python bench/latency.py --smoke --out "$WORK/bench/latency.md"
      else  # attention.py names its file by date and device only: one folder per shape
        step bench_attention python bench/attention.py --out "$WORK/bench/t128"
        step bench_attention_t512 python bench/attention.py --T 512 --dropout 0.1 --out "$WORK/bench/t512"
        step bench_train python bench/train_throughput.py --out "$WORK/bench/train.md"
        step bench_latency python bench/latency.py --out "$WORK/bench/latency.md"
      fi
      ;;
    engine)
      m=(--model bert6 --ws 40000 --epochs 1 --compile --kernels "${KERNELS:-torch}")
      c=(--task agnews)
      if [ "$SMOKE" = 1 ]; then
        m=(--model tiny --ws 256 --epochs 1)
        c=(--task agnews --train-per-label 8 --test-per-label 8 --epochs 1)
      fi
      rm -rf "$WORK/engine"
      step engine_mlm "${noraw[@]}" python train_mlm.py "${m[@]}" --out "$WORK/engine/mlm"
      step engine_cls "${noraw[@]}" python train_cls.py "${c[@]}" --init "$WORK/engine/mlm" \
        --out "$WORK/engine/cls"
      ;;
    paper)  # tables in order until PAPER_SECONDS run out; a finished table writes its report
      scale=paper; [ "$SMOKE" = 1 ] && scale=mini
      end=$((SECONDS + ${PAPER_SECONDS:-540}))
      for t in ${PAPER_TABLES:-table9 table5 budget}; do
        args=("$t" --scale "$scale" --seeds "${SEEDS:-1}" --cache "$PAPER_CACHE")
        step "paper_${t}_plan" python -m tinytlm.paper "${args[@]}" --plan
        left=$((end - SECONDS)); [ $left -gt 10 ] || break
        step "paper_$t" "${noraw[@]}" timeout -k 20 -s TERM "$left" \
          python -m tinytlm.paper "${args[@]}" --results "$WORK/results"
      done
      ;;
    *) echo "unknown stage '$stage' (prep, kernels, bench, engine, paper)" >&2; exit 2 ;;
  esac
done
exit $status
