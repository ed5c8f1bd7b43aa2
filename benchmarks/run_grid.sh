#!/usr/bin/env bash
# The harness over the Oases grid on one 2-GPU machine, one torchrun per hidden size (a size that
# runs out of time does not lose the others). Usage:
#   bash benchmarks/run_grid.sh OUT_DIR [nvlink|pcie] [SIZES] [SYSTEMS] [SECONDS_PER_SIZE...]
# pcie = the same machine with NCCL_P2P_DISABLE=1 (all-reduce through host memory).
# TRACE=sys1,sys2 in the environment profiles those systems (see harness --trace).
# Writes OUT_DIR/<interconnect>/h<H>/{results.json,RESULTS-fragment.md,log.txt}.
set -u
out=${1:?OUT_DIR}; ic=${2:-nvlink}; sizes=${3:-1024,2048,4096,8192}; systems=${4:-all}; shift $(( $# < 4 ? $# : 4 ))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1
if [ "$ic" = pcie ]; then export NCCL_P2P_DISABLE=1; fi
limits=("$@")
i=0
for h in ${sizes//,/ }; do
  d="$out/$ic/h$h"; mkdir -p "$d"
  lim=${limits[$i]:-600}; i=$((i + 1))
  echo "== $ic h=$h (limit ${lim}s) $(date -u +%T)"
  timeout --signal=TERM "$lim" torchrun --nproc-per-node 2 -m benchmarks.harness --hidden "$h" \
      --systems "$systems" --steps 20 --warmup 3 --rounds 1 --out "$d" ${TRACE:+--trace "$TRACE"} \
      > "$d/log.txt" 2>&1
  echo "   rc=$? $(date -u +%T)"; grep -E "^\[bench\] .*(OK|failed|unavailable|not checked|trace:)|plan [0-9a-f]{16}" "$d/log.txt" | cut -c1-200
done
