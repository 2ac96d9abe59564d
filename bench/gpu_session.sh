#!/usr/bin/env bash
# The GPU session, scripted: what to run when the device tool lends a GPU (30 minutes, 10 per call).
#
#   bash bench/gpu_session.sh prep                  # here, on the CPU machine: gpu_data/ (~60 MB) to carry
#   run(command="bash bench/gpu_session.sh kernels bench", carry=["gpu_data"])      # call 1 (GPU)
#   run(command="bash bench/gpu_session.sh engine", carry=["gpu_data"])             # call 2 (GPU)
#   run(command="bash bench/gpu_session.sh paper", carry=["gpu_data"])              # call 3 (GPU)
#   SMOKE=1 bash bench/gpu_session.sh kernels bench engine paper                   # the flow on a CPU, tiny sizes
#
# Stages (each writes under $OUT, default ./gpu_out; every log starts with the command, git revision, device):
#   prep     prepare the data the GPU stages read (the GPU machine has no ../shared): Wikipedia's first
#            200,000 shuffled rows and the task shards of Tables 5, 8 and 9 at the paper's sizes
#   kernels  the kernel and model tests on the GPU, natively (no TRITON_INTERPRET)
#   bench    bench/attention.py, bench/train_throughput.py, bench/latency.py -> $OUT/bench/*.md
#   engine   BERT-6 train_mlm.py --ws 40000 for one epoch (compiled, KERNELS=torch|triton), then
#            train_cls.py --task agnews (the paper's 50 epochs) from it
#   paper    paper-scale tables (PAPER_TABLES, default Table 9, Table 5, budget; SEEDS, default 1) until
#            PAPER_SECONDS (default 540) run out
# Copy what comes back into bench/results/ and results/ with the device named; never edit the numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. TINYTLM_DATA="${TINYTLM_DATA:-gpu_data}"
OUT="${OUT:-gpu_out}"
SMOKE="${SMOKE:-0}"
mkdir -p "$OUT"
status=0

header() {  # $1 = log file: the provenance every log starts with
  {
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1
  } > "$1"
}

step() {  # $1 = log name, rest = command; keeps going after a failure and reports it at the end
  local log="$OUT/$1.log"; shift
  header "$log"
  echo "\$ $*" >> "$log"
  echo "== $* (log: $log)"
  local t0=$SECONDS
  "$@" >> "$log" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - t0)) s" >> "$log"
  [ $rc -eq 0 ] || { echo "   FAILED (exit $rc): tail of $log"; tail -n 5 "$log"; status=1; }
}

for stage in "$@"; do
  case "$stage" in
    prep)
      rows=200000; [ "$SMOKE" = 1 ] && rows=2000
      step prep_wiki python data_prep/wikipedia.py --rows "$rows" --out "$TINYTLM_DATA"
      i=0
      for t in "--task agnews" "--task fewrel --labels 0,1,2,3,4,5,6,7,8,9" \
               "--task fewrel --fewrel-source train_wiki --train-per-label 100 --test-per-label 30"; do
        i=$((i + 1)); step "prep_task$i" python data_prep/tasks.py $t --out "$TINYTLM_DATA"
      done
      du -sh "$TINYTLM_DATA"
      ;;
    kernels)
      if [ "$SMOKE" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
      step kernels python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_training.py \
        tests/test_model.py
      ;;
    bench)
      s=(); [ "$SMOKE" = 1 ] && s=(--smoke)
      mkdir -p "$OUT/bench"
      if [ "$SMOKE" = 1 ]; then
        step bench_train python bench/train_throughput.py --smoke --out "$OUT/bench/train.md"
        step bench_latency python bench/latency.py --smoke --out "$OUT/bench/latency.md"
      else
        step bench_attention python bench/attention.py --out "$OUT/bench"
        step bench_attention_t512 python bench/attention.py --T 512 --dropout 0.1 --out "$OUT/bench"
        step bench_train python bench/train_throughput.py --out "$OUT/bench/train.md"
        step bench_latency python bench/latency.py --out "$OUT/bench/latency.md"
      fi
      ;;
    engine)
      m=(--model bert6 --ws 40000 --epochs 1 --compile --kernels "${KERNELS:-torch}")
      c=(--task agnews)
      [ "$SMOKE" = 1 ] && m=(--model tiny --ws 256 --epochs 1) && c=(--task agnews --train-per-label 8
                                                                      --test-per-label 8 --epochs 1)
      rm -rf "$OUT/engine"
      step engine_mlm python train_mlm.py "${m[@]}" --out "$OUT/engine/mlm"
      step engine_cls python train_cls.py "${c[@]}" --init "$OUT/engine/mlm" --out "$OUT/engine/cls"
      rm -f "$OUT"/engine/*/ckpt.pt  # the metrics and logs come back, the weights (hundreds of MB) do not
      ;;
    paper)  # tables in order until PAPER_SECONDS run out; a finished table writes its report, the cache
            # (runs/paper, kept while the machine stays warm) lets the next call go on where this one stopped
      scale=paper; [ "$SMOKE" = 1 ] && scale=mini
      end=$((SECONDS + ${PAPER_SECONDS:-540}))
      for t in ${PAPER_TABLES:-table9 table5 budget}; do
        left=$((end - SECONDS)); [ $left -gt 10 ] || break
        step "paper_${t}_plan" python -m tinytlm.paper "$t" --scale "$scale" --seeds "${SEEDS:-1}" --plan --cache "${PAPER_CACHE:-runs/paper}"
        step "paper_$t" timeout -s TERM "$left" python -m tinytlm.paper "$t" --scale "$scale" \
          --seeds "${SEEDS:-1}" --results "$OUT/results" --cache "${PAPER_CACHE:-runs/paper}"
      done
      ;;
    *) echo "unknown stage '$stage' (prep, kernels, bench, engine, paper)" >&2; exit 2 ;;
  esac
done
exit $status
