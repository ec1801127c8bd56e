"""
Tools around the lesson, none of which train.py imports: run each from the repository root as a module.

    python -m tools.sample --out_dir=out --prompt="12+34="   # complete prompts with a trained model
    python -m tools.plot out                                # out/weights.png: the weights and val loss of a run
    python -m tools.compare --what=defaults --seeds=3        # the studies of docs/: every method or setting, every task
    python -m tools.bench                                   # a ScaleBiO step's cost against fine-tuning and its floor
    bash tools/gpu_checks.sh                                # the CUDA checks (bf16, FSDP2 over GPUs, memory plans)
"""
