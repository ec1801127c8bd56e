#!/usr/bin/env bash
# Every GPU check in one run (each command under its own timeout, 27 minutes at most; the first check alone, 8
# minutes at most, is the one a first GPU session needs), results under ${OUT:-gpu-results}: LLaMA-3-8B's width at
# 4 blocks, its peak memory against plan.py's plan (within 10%); the GPT-2 124M shape in bf16, torch.compile'd, through bench.py (time, memory, MFU
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
# LLaMA-3-8B's width (4,096 wide, GQA 32/8, 128k vocabulary) at 4 blocks, ScaleBiO + LISA: 20 steps, then one step
# with --cpu_offload; torch.cuda.max_memory_allocated against run_plan for each run's own config (the planned
# reserve left out: the allocator does not see the CUDA context nor nccl's buffers). No checkpoint is kept: the
# final one of each run (~40 GB) is deleted before the next run
for offload in False True; do
    steps=$([ $offload = True ] && echo 1 || echo 20)
    timeout 240 $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --model=llama3-8b --n_layer=4 \
        --lisa_layers=2 --lisa_interval=5 --block_size=256 --batch_per_source=4 --val_batch=8 --eval_batches=1 \
        --max_steps=$steps --eval_interval=$steps --save_best=False --cpu_offload=$offload \
        --out_dir=/tmp/gpu_8b_$offload --overwrite=True > "$OUT/train_8b_offload_$offload.log" 2>&1
    echo "train 8B width cpu_offload=$offload exit $?" >> "$OUT/gpu.txt"
    cp /tmp/gpu_8b_$offload/summary.json "$OUT/summary_8b_offload_$offload.json" 2>/dev/null
    rm -rf /tmp/gpu_8b_$offload/ckpt*
done
$PY - "$OUT"/summary_8b_offload_*.json >> "$OUT/gpu.txt" 2>&1 <<'EOF'
import json, sys
import torch
from config import TrainConfig
from model import GPTConfig
from plan import run_plan
for path in sys.argv[1:]:
    summary = json.load(open(path))
    cfg, model_config = TrainConfig(**summary['config']), GPTConfig(**summary['model_config'])
    plan = run_plan(cfg, model_config, len(summary['sources']), summary['world_size'], 2,
                    getattr(torch, cfg.dtype).itemsize, cfg.amp, True)
    planned, peak = sum(plan.values()) - plan['reserve'], summary['peak_memory_bytes']
    verdict = 'within 10%' if abs(peak / planned - 1) <= 0.1 else 'FAIL: not within 10%'
    print(f"{path}: peak allocated {peak / 2**30:.2f} GiB, planned {planned / 2**30:.2f} GiB, peak / plan "
          f"{peak / planned:.3f}, {verdict}", {name: round(size / 2**30, 2) for name, size in plan.items()})
EOF
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
