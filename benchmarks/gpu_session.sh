#!/usr/bin/env bash
# Everything a GPU session checks, in one call (the GPU machine is lent for minutes at a time):
#   1. tests_mgpu: the compiled Mosaic GPU kernel's test file (every shared case, slow included,
#      one-warpgroup and warp-specialised);
#   2. gpu_decode: benchmarks/gpu_decode.py, our kernels (Triton "ours", Mosaic GPU "ours_mgpu"
#      with a sweep of its knobs, warp-specialised variants included, Triton on int8 / fp8 pools
#      with a sweep of its knobs on int8) vs JAX's Pallas kernel, cuDNN,
#      torch SDPA and the copy ceiling;
#   3. tests: the compiled Triton kernel against the float64 oracle (its test file, slow and
#      quantised cases included) and the decoding tests on the GPU;
#   4. decode_step (paged vs contiguous, and with attention fusion) and serving benchmarks on
#      the GPU (saved as *_gpu).
#   With GPU_SESSION_ALL=1 also gpu_kernel_ab (the Triton kernel's variants, round-robin) and
#   sharding (decode step per layout on the GPUs there are). With GPU_SESSION_SPECULATIVE=1
#   the speculative benchmark (speculative decoding vs greedy decode_loop where a decode step
#   is memory-bound; saved as speculative_gpu), meant as a call of its own:
#     GPU_SESSION_SPECULATIVE=1 GPU_SESSION_SKIP="tests_mgpu gpu_decode tests decode_step serving"
# Each part has its own time limit (together under 8 minutes) and a failure does not stop the
# next one. Logs and a tarball of benchmarks/results, plots and RESULTS.md go to $OUT (default
# benchmarks/out/gpu_session).
#
#   PYTHONPATH=. bash benchmarks/gpu_session.sh            # on the GPU machine, from the checkout
#   GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh     # CPU rehearsal: interpret mode, tiny
#   GPU_SESSION_SKIP="serving decode_step" ...            # leave parts out (a short lease)
set -u
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes (pytest -n) share one GPU
OUT=${OUT:-benchmarks/out/gpu_session}
mkdir -p "$OUT"
SMOKE=${GPU_SESSION_SMOKE:-0}
T0=$(date +%s)
LAST_RC=0
log() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
part() {  # part NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, show its tail
  local name=$1 limit=$2
  shift 2
  case " ${GPU_SESSION_SKIP:-} " in
    *" $name "*) LAST_RC=0; log "$name skipped (GPU_SESSION_SKIP)"; return;;
  esac
  log "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  LAST_RC=$rc
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  log "$name rc=$rc"
}

log "machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total \
  --format=csv 2>&1 || echo "no nvidia-smi"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

if [ "$SMOKE" = 1 ]; then
  part tests 600 python -m pytest tests/test_attention_pallas_gpu.py -q -x -k "decode and bs16"
  part tests_mgpu 600 python -m pytest tests/test_attention_pallas_mgpu.py -q -x -k "decode"
  part gpu_decode 300 python benchmarks/gpu_decode.py --interpret --tiny --sweep-quant int8
  part gpu_kernel_ab 300 python benchmarks/gpu_kernel_ab.py --interpret --tiny
  part decode_step 300 python -m benchmarks.decode_step --batch 2 --context 64 --repeats 2 --fused
  part serving 300 python -m benchmarks.serving --quick --requests 6
  part sharding 300 python -m benchmarks.sharding --quick --devices 1 2 --context 64
  part speculative 300 python -m benchmarks.speculative --quick
else
  # Order: the least-proven first (the Mosaic GPU kernel's compiled tests, then every kernel's
  # timings), the Triton tests (verified on an H100 before) after.
  TAIL=30 part tests_mgpu 75 env JAX_PAGED_KV_GPU_COMPILED=1 python -m pytest -m "" -q -n 6 \
    --maxfail=20 -p no:cacheprovider -v tests/test_attention_pallas_mgpu.py
  # A kernel that hangs would eat the timing part's whole limit: time the others without it.
  if [ "$LAST_RC" = 124 ]; then export GPU_DECODE_NO_MGPU="its compiled tests timed out"; fi
  TAIL=45 part gpu_decode 225 python benchmarks/gpu_decode.py --time-budget 185 --repeats 9 \
    --sweep-mgpu --sweep-quant int8 --sweep-block-size 0 ${GPU_DECODE_ARGS:-} --out benchmarks/out/gpu_decode_raw.json
  TAIL=15 part tests 70 env JAX_PAGED_KV_GPU_COMPILED=1 JAX_DEFAULT_MATMUL_PRECISION=highest \
    python -m pytest -m "" -q -n 8 \
    --maxfail=10 -p no:cacheprovider tests/test_attention_pallas_gpu.py tests/test_decoding.py
  # The paged / contiguous decode-step gap (reserve skips the allocator in steps where no row
  # opens a block); the full grid with GPU_SESSION_DECODE_STEP=1.
  if [ "${GPU_SESSION_DECODE_STEP:-0}" = 1 ]; then
    part decode_step 90 python -m benchmarks.decode_step --batch 1 8 32 --context 512 2048 --fused \
      --repeats 9
  else
    TAIL=12 part decode_step 65 python -m benchmarks.decode_step --batch 8 32 --context 2048 --fused \
      --repeats 7
  fi
  TAIL=12 part serving 45 python -m benchmarks.serving --quick
  # The device tool brings back at most 8 files from $OUT: these two only on request.
  if [ "${GPU_SESSION_ALL:-0}" = 1 ]; then
    TAIL=15 part gpu_kernel_ab 40 python benchmarks/gpu_kernel_ab.py
    TAIL=12 part sharding 40 python -m benchmarks.sharding --quick
  fi
  # Its own device call (the default parts fill one): GPU_SESSION_SPECULATIVE=1 with
  # GPU_SESSION_SKIP="tests_mgpu gpu_decode tests decode_step serving".
  if [ "${GPU_SESSION_SPECULATIVE:-0}" = 1 ]; then
    TAIL=40 part speculative 240 python -m benchmarks.speculative
  fi
fi
tar czf "$OUT/results.tgz" benchmarks/results benchmarks/plots benchmarks/RESULTS.md \
  $(ls benchmarks/out/gpu_decode_raw.json 2>/dev/null)
log "done"
