#!/usr/bin/env bash
# Re-measure the performance issue's headline keys on one GPU, in two device calls of under 10 minutes
# each, with the services' defaults; then gather them with summary.py.
#
#   benchmarks/headline.sh engine   OUT   # decode bs1 (128/128), 128/128 at c=256 (engine + HF continuous
#                                         # batching), encoder bs64 (CUDA-graph replay)  139-165 s on an H200
#   benchmarks/headline.sh services OUT   # the random LLaVA-1.5-7B checkpoint, image TTFT at c=1 through
#                                         # both services (scenarios 3 and 5), gRPC overhead at c=64 147-176 s
#   python benchmarks/summary.py --results OUT   # after both parts' files are in OUT
#
# Every file lands directly in OUT (no subfolders; at most 8 per part), as summary.py expects.
set -euo pipefail
part=${1:?usage: headline.sh engine|services OUT}
out=${2:?usage: headline.sh engine|services OUT}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
step() { echo "== $(date +%T) $*"; }

case "$part" in
  engine)
    step "decode, batch 1, 128/128"
    python3 "$here/bench_decode.py" --out "$out" --inputs 128 --outputs 128 --systems engine_graphs
    step "throughput, 128/128 at 256 concurrent (engine, HF continuous batching)"
    python3 "$here/bench_throughput.py" --out "$out" --scenarios 128/128 --concurrency 256 --systems engine,hf_cb \
      --step-timeline
    step "encoder, batch 64, CUDA-graph replay"
    python3 "$here/bench_encoder.py" --out "$out" --batch-sizes 64 --variants compiled_cudagraph@64 --time-budget-s 150
    ;;
  services)
    model=${HEADLINE_MODEL:-/tmp/llava15-7b}
    if [ ! -f "$model/config.json" ]; then
      step "checkpoint $model"
      python3 "$here/make_llava15_checkpoint.py" --out "$model"
    fi
    step "image TTFT at concurrency 1 (scenarios 3 and 5), both services with their CUDA defaults"
    python3 "$here/bench_multimodal.py" --model "$model" --out "$out" --concurrency 1 --outputs 16 --min-requests 24 \
      --encoder-args "--device cuda --dtype bfloat16 --max-batch-size 64 --compile-buckets 1"
    step "gRPC streaming overhead at concurrency 64 (in-process engine vs the service, both modes)"
    python3 "$here/bench_grpc_overhead.py" --out "$out" --engine-process
    ;;
  *)
    echo "unknown part $part (engine | services)" >&2
    exit 2
    ;;
esac
step "done"
