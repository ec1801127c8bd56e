"""
How much memory one GPU needs for a ScaleBiO + LISA step, before anything is allocated: the bytes each rank
holds for both model copies, computed from the shapes of a model built on the meta device.

    python bench.py --plan=True --model=llama3-8b --lisa_layers=2 --world_size=1 --gpu_gb=141
    python bench.py --plan=True --model=yi-34b --lisa_layers=2 --world_size=8 --gpu_gb=48

What it counts exactly, as train.py allocates it (summary.json's per_rank_bytes is the check):
  parameters       both copies, this rank's FSDP2 shards
  gradients        both copies' gradients are alive at once (u's survive w's backward: bilevel.scalebio_step
                   checks every loss and gradient before either copy steps; --lower_first: one copy's), for the
                   trainable parameters only
  optimizer state  AdamW's two moments, in the parameters' dtype, for the trainable parameters only (LISA drops
                   the state of blocks that go inactive: lisa.py)
Trainable: everything with LISA off; with LISA, all but n_layer − lisa_layers blocks (every block of a model has
the same shape, so the draw does not matter). FSDP2 gives rank 0 the first ceil(rows / world_size) rows of every
tensor (torch.chunk on dim 0): the largest share, the one planned.
TODO: activations, logits and FSDP2's gathered blocks are not planned yet; train.py refuses a run only when the
counted state alone exceeds the GPU.
"""
import math

import torch

from model import make_model


def rank0_bytes(shape, world_size, element_size):
    """Bytes of rank 0's FSDP2 shard of a tensor of this shape (the whole tensor in one process)."""
    rows = -(-shape[0] // world_size) if world_size > 1 else shape[0]
    return min(rows, shape[0]) * math.prod(shape[1:]) * element_size


def state_plan(config, world_size=1, lisa_layers=0, element_size=4, copies=2, lower_first=False):
    """Bytes rank 0 holds for `copies` model copies of `config`: {'parameters', 'gradients', 'optimizer_state'}.
    lower_first (--lower_first): u steps and drops its gradient before w's backward, one copy's at a time."""
    with torch.device('meta'):
        model = make_model(config)
    every = sum(rank0_bytes(p.shape, world_size, element_size) for p in model.parameters())
    block = sum(rank0_bytes(p.shape, world_size, element_size) for p in model.blocks[0].parameters())
    frozen = config.n_layer - lisa_layers if 0 < lisa_layers < config.n_layer else 0
    trainable = every - frozen * block
    return {'parameters': copies * every, 'gradients': (1 if lower_first else copies) * trainable,
            'optimizer_state': copies * 2 * trainable}


def print_plan(plan, gpu_bytes):
    """The plan as a table, and whether the counted state fits `gpu_bytes`."""
    total = sum(plan.values())
    for name, value in [*plan.items(), ('total counted', total)]:
        print(f"{name:<20}{value / 2**30:>10.2f} GiB")
    print(f"{'fits' if total <= gpu_bytes else 'does NOT fit'} in {gpu_bytes / 2**30:.0f} GiB "
          f"(before activations, logits and FSDP buffers, which are not planned yet)")
    return total <= gpu_bytes


def check_plan(plan, gpu_bytes, where):
    """train.py on CUDA, before allocating: raises ValueError when the counted state alone exceeds the GPU."""
    total = sum(plan.values())
    if total > gpu_bytes:
        raise ValueError(f"{where}: both copies' parameters, gradients and optimizer state alone need "
                         f"{total / 2**30:.1f} GiB per GPU, more than its {gpu_bytes / 2**30:.1f} GiB: more processes, "
                         f"fewer --lisa_layers or a smaller model (--check_memory=False runs it anyway)")
    return total
