#!/usr/bin/env bash
# The planner-accuracy sweep (benchmarks/overlap_sweep.py) over hidden sizes on one 2-GPU machine,
# one torchrun per size (a size that runs out of time keeps the plans it measured). Usage:
#   bash benchmarks/run_sweep.sh OUT_DIR [nvlink|pcie] [SIZES] [SECONDS_PER_SIZE...]
# pcie = the same machine with NCCL_P2P_DISABLE=1. SWEEP_ARGS in the environment go to every run.
# Writes OUT_DIR/<interconnect>/{sweep_*_h<H>.json,profile_*_h<H>.json,spec_h<H>.json,log_h<H>.txt};
# then: python -m benchmarks.accuracy OUT_DIR
set -u
out=${1:?OUT_DIR}; ic=${2:-nvlink}; sizes=${3:-1024,2048,4096}; shift $(( $# < 3 ? $# : 3 ))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1
if [ "$ic" = pcie ]; then export NCCL_P2P_DISABLE=1; fi
limits=("$@")
d="$out/$ic"; mkdir -p "$d"
i=0
for h in ${sizes//,/ }; do
  lim=${limits[$i]:-600}; i=$((i + 1))
  echo "== $ic h=$h (limit ${lim}s) $(date -u +%T)"
  # shellcheck disable=SC2086
  timeout --signal=TERM "$lim" torchrun --nproc-per-node 2 -m benchmarks.overlap_sweep --hidden "$h" \
      --out "$d" ${SWEEP_ARGS:-} > "$d/log_h$h.txt" 2>&1
  echo "   rc=$? $(date -u +%T)"; grep -E "^  (k=|floor|plan=|runner|bf16)|^h=|FAILED" "$d/log_h$h.txt" | cut -c1-220
done
