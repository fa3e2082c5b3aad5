#!/usr/bin/env bash
# Every GPU benchmark in one go, each under its own time limit, the output of each in a results folder.
#
#   bash benchmarks/gpu_all.sh [RESULTS_DIR]        # default: benchmarks/gpu_results/<UTC date-time>
#   SCALE=0.5 bash benchmarks/gpu_all.sh            # every time limit halved (a short check)
#   ONLY="kernels engine_vs_hf" bash benchmarks/gpu_all.sh   # a subset, by step name
#
# Runs from the repository root with $PYTHON (default .venv/bin/python, else python3). Needs a CUDA GPU; the
# Triton steps need triton. In order (name: what, limit in seconds before SCALE):
#   env            nvidia-smi, torch / triton / CUDA versions, the GPU torch sees              60
#   kernels        kernels_bench.py --quick: the Triton head and DoRA-norm kernels against
#                  the PyTorch paths (ms, extra memory; the MEASURED_FASTER rows it supports)  300
#   kernels_full   kernels_bench.py: every case                                                600
#   engine_vs_hf   engine_vs_hf.py --device cuda --real: loss/gradient equivalence and speed   600
#   train_bench    train_bench.py --device cuda --quick --methods lora --objectives sft,dpo:
#                  the engine against transformers + PEFT + TRL (needs the bench extra)       900
#   memory_est     memory_estimate.py: estimated against measured memory of one step            300
#   memory_grid    memory_grid.py --device cuda --dtype bfloat16 --size small --markdown       900
#   distributed    distributed_scaling.py on 1..N GPUs (only with 2 GPUs or more)              900
# Each step writes RESULTS_DIR/<name>.txt (stdout and stderr) and a line to RESULTS_DIR/summary.txt: its exit status
# (124: it ran past its limit), seconds, and the command. A failing step does not stop the others; the script exits 1
# when any step failed. Copy the figures into benchmarks/RESULTS.md with the machine, date and commit.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
SCALE=${SCALE:-1}
OUT=${1:-benchmarks/gpu_results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

limit() { "$PYTHON" -c "import sys; print(max(10, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"; }

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs rc t0
  secs=$(limit "$2")
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  echo "== $name (limit ${secs}s): $*"
  t0=$(date +%s)
  timeout --kill-after=20 "$secs" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  printf '%-13s rc %-3s %5ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
}

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
{
  date -u
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi 2>&1 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); [print(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]" 2>&1
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if [ "$gpus" = 0 ]; then
  echo "no CUDA GPU visible to torch: nothing to run (see $OUT/env.txt)" | tee -a "$OUT/summary.txt"
  exit 1
fi

step kernels 300 "$PYTHON" benchmarks/kernels_bench.py --quick
step kernels_full 600 "$PYTHON" benchmarks/kernels_bench.py
step engine_vs_hf 600 "$PYTHON" benchmarks/engine_vs_hf.py --device cuda --real
step train_bench 900 "$PYTHON" benchmarks/train_bench.py --device cuda --quick --methods lora --objectives sft,dpo \
  --save "$OUT/train_bench.json"
step memory_est 300 "$PYTHON" benchmarks/memory_estimate.py
step memory_grid 900 "$PYTHON" benchmarks/memory_grid.py --device cuda --dtype bfloat16 --size small --markdown
if [ "$gpus" -ge 2 ]; then
  cfg="$OUT/distributed_config.yaml"
  printf 'model: default\ndataset: resources/datasets/demo_sft.jsonl\nbatch_size: 8\nmax_steps: 30\n' > "$cfg"
  procs=$("$PYTHON" -c "import sys; n=int(sys.argv[1]); print(','.join(str(p) for p in (1, 2, 4, 8) if p <= n))" "$gpus")
  step distributed 900 "$PYTHON" -P benchmarks/distributed_scaling.py "$cfg" --procs "$procs"
else
  echo "distributed    skipped: one GPU" | tee -a "$OUT/summary.txt"
fi
echo "results in $OUT"
exit $failed
