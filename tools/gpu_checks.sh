#!/usr/bin/env bash
# Every GPU check in one run (each command under its own timeout, 19 minutes at most), results under
# ${OUT:-gpu-results}: the GPT-2 124M shape in bf16, torch.compile'd, through bench.py (time, memory, MFU
# against the measured bf16 matmul peak), and train.py under torchrun (FSDP2, bf16 mixed precision, the
# LISA warm-up) for 100 steps with LISA on and off (tokens/s, torch.cuda.max_memory_allocated).
#     bash tools/gpu_checks.sh   (from the repository root)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__)"; } \
    > "$OUT/gpu.txt" 2>&1
timeout 240 $PY -m tools.bench --device=cuda --model=gpt2 --compile=True --block_size=512 --batch_per_source=8 \
    --val_batch=32 --repeats=10 --peak_rss=False > "$OUT/bench_gpt2.txt" 2>&1
echo "bench exit $?" >> "$OUT/gpu.txt"
# instruction-shaped rows: useful tokens/s with the crop, without it, and with the head at every position
# (lengths are multiples of 64 under --compile, so the warm-up steps compile most of the few shapes)
timeout 300 $PY -m tools.bench --device=cuda --model=gpt2 --compile=True --workload=instruction --block_size=512 \
    --micro_batch=1 --warmup=8 --repeats=10 --peak_rss=False > "$OUT/bench_gpt2_instruction.txt" 2>&1
echo "bench instruction exit $?" >> "$OUT/gpu.txt"
for layers in 2 0; do
    timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --model=gpt2 \
        --block_size=256 --batch_per_source=16 --val_batch=32 --max_steps=100 --eval_interval=100 \
        --eval_batches=2 --ckpt_interval=1000 --lisa_layers=$layers --out_dir=/tmp/gpu_train_lisa$layers --overwrite=True \
        > "$OUT/train_lisa$layers.log" 2>&1
    echo "train lisa_layers=$layers exit $?" >> "$OUT/gpu.txt"
    cp /tmp/gpu_train_lisa$layers/summary.json "$OUT/summary_lisa$layers.json" 2>/dev/null
done
# --cpu_offload: the same run with FSDP2's shards, gradients and optimizer state in host memory, float64 (no
# bf16), 20 steps with LISA: the weights must equal the run without it to 1e-10
for offload in False True; do
    timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --n_layer=4 --max_steps=20 \
        --lisa_layers=2 --lisa_interval=5 --dtype=float64 --amp=False --eval_interval=20 --cpu_offload=$offload \
        --out_dir=/tmp/gpu_offload_$offload --overwrite=True > "$OUT/offload_$offload.log" 2>&1
    echo "train cpu_offload=$offload exit $?" >> "$OUT/gpu.txt"
done
$PY -c "
import json
a, b = (json.load(open(f'/tmp/gpu_offload_{o}/summary.json')) for o in ('False', 'True'))
print('cpu_offload max weight difference', max(abs(x - y) for x, y in zip(a['weights'], b['weights'])),
      'val', a['val_loss'], b['val_loss'])" >> "$OUT/gpu.txt" 2>&1
