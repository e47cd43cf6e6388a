#!/usr/bin/env bash
# Both benchmarks on the Qwen2-VL-2B architecture (random weights) on one GPU, in one go (~8 minutes),
# then evaluate.py end to end on that device if a trained mini-world model is at $TWN_MODEL.
#
#   bash bench/gpu.sh            # on a GPU machine: JSON + logs in $OUT (if set) and in bench/results/
#   bash bench/gpu.sh --smoke    # the same steps with the tiny config on the CPU: checks the script end to end
#   TWN_MODEL=runs/sft bash bench/gpu.sh   # + evaluate.py --task all in three modes with that model
#   TWN_MODEL=runs/sft TWN_DATA=DIR bash bench/gpu.sh   # ... on that world (default data/world, made if missing)
#
# Training first: its time is predictable; the inference benchmark compiles the decode (CUDA graphs),
# which takes the longest to warm up. Each script saves its JSON as it goes, so a cut-short run keeps
# what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--smoke" ]; then DEV=cpu; CFG=tiny; else DEV=cuda; CFG=qwen2-vl-2b; fi
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR" bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python3 -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed"
# the CUDA-graph decoders against the reference loop, token for token (fp32, tiny model; skipped on a CPU)
timeout 60 python3 -m pytest -q -x tests/test_decode.py -k cuda 2>&1 | tail -3
timeout 180 python3 bench/train.py --device $DEV --config $CFG --out-dir "$OUT_DIR" --profile 2>&1 | grep -v "Model config" | tee "$OUT_DIR/train-$CFG.log"
timeout 300 python3 bench/infer.py --device $DEV --config $CFG --iters 2 --out-dir "$OUT_DIR" --profile 2>&1 | grep -v "Model config" | tee "$OUT_DIR/infer-$CFG.log"
# the real pipeline on this device (bf16 autocast and the CUDA-graph decoder on a GPU): scores to compare with
# the same model's CPU run, and queries/s per task (the gate's thinking rows pooled across batches)
if [ -n "${TWN_MODEL:-}" ] && [ -d "$TWN_MODEL" ]; then
    DATA=${TWN_DATA:-data/world}
    [ -f "$DATA/world.json" ] || python3 -m data.world --out "$DATA" > /dev/null
    timeout 100 python3 evaluate.py --model "$TWN_MODEL" --data "$DATA" --task all --modes nothink,think,adaptive --device $DEV \
        --out /tmp/twn-eval-$DEV --json "$OUT_DIR/eval-$DEV.json" --overwrite 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT_DIR/eval-$DEV.log"
fi
[ "$OUT_DIR" != bench/results ] && cp "$OUT_DIR"/*.json "$OUT_DIR"/*.txt bench/results/ 2>/dev/null
true
