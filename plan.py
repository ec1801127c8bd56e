"""
How much memory one GPU needs for a ScaleBiO + LISA step, before anything is allocated: the bytes each rank
holds for both model copies, computed from the shapes of a one-block model built on the meta device, and what one
copy's forward and backward add on top.

    python -m tools.bench --plan=True --model=llama3-8b --lisa_layers=2 --world_size=1 --gpu_gib=141 --block_size=1024
    python -m tools.bench --plan=True --model=yi-34b --lisa_layers=2 --world_size=8 --gpu_gib=45 --block_size=1024

Counted exactly, as train.py allocates it (summary.json's per_rank_bytes is the check, tests/test_distributed.py):
  parameters       both copies, this rank's FSDP2 shards
  gradients        both copies' gradients are alive at once (u's survive w's backward: bilevel.scalebio_step
                   checks every loss and gradient before either copy steps; --lower_first: one copy's), for the
                   trainable parameters only
  optimizer state  AdamW's two moments, in the parameters' dtype, for the trainable parameters only (LISA drops
                   the state of blocks that go inactive: lisa.py)
Trainable: everything with LISA off; with LISA, all but n_layer − lisa_layers blocks (every block of a model has
the same shape, so the draw does not matter). FSDP2 gives rank 0 the first ceil(rows / world_size) rows of every
tensor (torch.chunk on dim 0): the largest share, the one planned.

Estimated, for one copy's forward and backward at a time (the copies run one after the other):
  activations      what autograd saves, per token and block (block_bytes_per_token: fitted to the saved tensors of
                   CPU runs in float32 and bfloat16, the compute dtype of FSDP2's bf16 mixed precision;
                   tests/test_plan.py holds them to 15%); with --checkpoint_blocks each block keeps its input and
                   the backward recomputes one block at a time
  logits           at each position with a target (--logits_at_targets; every position without it): the
                   float32 log-softmax the cross-entropy saves, and at the head's backward its gradient in
                   float32 and in the compute dtype
  buffers          FSDP2: a tied embedding and head stay gathered in the root from its forward to the end of the
                   backward, with their unsharded gradient; untied, they are units of their own (fsdp.units),
                   gathered one at a time; and two blocks are gathered at a time (one prefetched), with
                   the gradient of the larger of a block and those units; one process without FSDP2 on
                   CUDA: autocast's bf16 copy of every weight, kept for the backward
Reserved: RESERVE for the CUDA context and nccl's buffers, an allowance. Not planned: the allocator's
fragmentation; RHO-LOSS's reference model and its scoring of rho_candidates times the rows. TODO: run the check
of the estimates against torch.cuda.max_memory_allocated on a GPU (tools/gpu_checks.sh's first).
"""
import dataclasses
import itertools
import math
import sys

import torch

from config import micro_steps
from fsdp import units
from model import make_model


def rank0_bytes(shape, world_size, element_size):
    """Bytes of rank 0's FSDP2 shard of a tensor of this shape (the whole tensor in one process)."""
    rows = -(-shape[0] // world_size) if world_size > 1 else shape[0]
    return min(rows, shape[0]) * math.prod(shape[1:]) * element_size


def root_and_block(config, size=lambda shape: math.prod(shape)):
    """size(shape) summed over the parameters outside the blocks (embeddings, final norm, head) and over one
    block's. A model of one block on the meta device gives the shapes: every block has the same, so a model's
    total is root + n_layer · block, at any depth without building it."""
    with torch.device('meta'):
        model = make_model(dataclasses.replace(config, n_layer=1))
    block = sum(size(p.shape) for p in model.blocks[0].parameters())
    return sum(size(p.shape) for p in model.parameters()) - block, block


def state_plan(config, world_size=1, lisa_layers=0, element_size=4, copies=2, lower_first=False):
    """Bytes rank 0 holds for `copies` model copies of `config`: {'parameters', 'gradients', 'optimizer_state'}.
    lower_first (--lower_first): u steps and drops its gradient before w's backward, one copy's at a time."""
    root, block = root_and_block(config, lambda shape: rank0_bytes(shape, world_size, element_size))
    every = root + config.n_layer * block
    frozen = config.n_layer - lisa_layers if 0 < lisa_layers < config.n_layer else 0
    trainable = every - frozen * block
    return {'parameters': copies * every, 'gradients': (1 if lower_first else copies) * trainable,
            'optimizer_state': copies * 2 * trainable}


def block_bytes_per_token(config, element_size, trainable):
    """Bytes autograd saves per token in one block's forward, compute dtype of `element_size` bytes. Fitted to
    the saved tensors of CPU runs (flash attention, which keeps q, k, v, its output and a float32 logsumexp per
    head): a frozen block keeps less, as its weights need no gradient, but the embeddings below it train, so its
    backward still runs. Llama's RMSNorm keeps its input in float32 (model.py computes it in float32)."""
    d, heads = config.n_embd, config.n_head
    if config.family in ('gpt2', 'gpt_neox'):  # MLP 4·d wide; GPT-NeoX's rotation keeps q and k once more
        rotated = 2 * d * element_size if config.rotary_pct else 0
        return (16 if trainable else 10) * d * element_size + 4 * heads + 4 * element_size + rotated
    kv = 2 * (config.n_kv_head or heads) * (config.head_dim or d // heads)
    ffn = config.mlp_hidden
    compute = (6 * d + 4 * ffn + kv) if trainable else (2 * d + 3 * ffn + kv)
    return compute * element_size + 8 * d + 4 * heads + 8


def activation_plan(config, tokens, targets, trainable_blocks, element_size, checkpoint_blocks=False):
    """{'activations', 'logits'}: bytes one copy's forward and backward add, for `tokens` positions per forward,
    `targets` of them with a target (all of them with --logits_at_targets=False), `trainable_blocks` of n_layer
    trainable. With checkpointing every block keeps only its input, and one block is recomputed at a time."""
    d, frozen = config.n_embd, config.n_layer - trainable_blocks
    outside = 2 * d * element_size + (0 if config.family in ('gpt2', 'gpt_neox') else 4 * d)  # embeddings, final norm, head input
    if checkpoint_blocks:
        blocks = config.n_layer * d * element_size + block_bytes_per_token(config, element_size, trainable_blocks > 0)
    else:
        blocks = trainable_blocks * block_bytes_per_token(config, element_size, True) \
            + frozen * block_bytes_per_token(config, element_size, False)
    return {'activations': tokens * (blocks + outside),
            'logits': targets * config.vocab_size * (4 + 4 + element_size)}


def buffer_plan(config, element_size, sharded):
    """Bytes of the gathered parameters and unsharded gradients FSDP2 holds (sharded), or of autocast's bf16
    weight copies (one process with bf16 compute, no FSDP2), for one copy at a time; none in float32 alone."""
    root, block = root_and_block(config)
    if not sharded:
        return {'buffers': (root + config.n_layer * block) * element_size if element_size < 4 else 0}
    # outside the blocks, what the root keeps gathered through the step, and the larger of an untied model's
    # embedding and [final norm, head] units (fsdp.units), gathered one at a time
    with torch.device('meta'):
        model = make_model(dataclasses.replace(config, n_layer=1))
    outer = [u for u in units(model) if u is not model.blocks[0]]
    sizes = [sum(p.numel() for m in (u if isinstance(u, list) else [u]) for p in m.parameters()) for u in outer]
    held = root - sum(sizes) + max(sizes, default=0)
    # the unsharded gradient of the unit in its backward (the larger of those units and a block), computed in the
    # compute dtype and reduced in float32
    gradients = max(held, block) * (element_size + 4 if element_size < 4 else 4)
    return {'buffers': (held + 2 * block) * element_size + gradients}


def memory_plan(config, world_size=1, lisa_layers=0, element_size=4, copies=2, tokens=1024, targets=1024,
                compute_size=2, sharded=True, checkpoint_blocks=False, logits_at_targets=True, lower_first=False,
                cpu_offload=False):
    """Every term of the plan for one combination of the levers, bytes on one GPU of rank 0."""
    state = state_plan(config, world_size, lisa_layers, element_size, copies, lower_first)
    if cpu_offload:  # shards, gradients and moments in host memory
        state = {name: 0 for name in state}
    trainable = lisa_layers if 0 < lisa_layers < config.n_layer else config.n_layer
    return {**state, **activation_plan(config, tokens, targets if logits_at_targets else tokens, trainable,
                                       compute_size, checkpoint_blocks), **buffer_plan(config, compute_size, sharded)}


LEVERS = ('checkpoint_blocks', 'logits_at_targets', 'lower_first', 'cpu_offload')
# the CUDA context (0.5-1 GiB per process) and nccl's buffers: an allowance, not yet measured on a GPU here
RESERVE = 3 * 2**29  # 1.5 GiB


def print_plan(plan, gpu_bytes):
    """One plan as a table, and whether it fits `gpu_bytes`."""
    total = sum(plan.values())
    for name, value in [*plan.items(), ('total', total)]:
        print(f"{name:<20}{value / 2**30:>10.2f} GiB")
    print(f"{'fits' if total <= gpu_bytes else 'does NOT fit'} in {gpu_bytes / 2**30:.0f} GiB")
    return total <= gpu_bytes


def print_lever_table(config, gpu_bytes, **kw):
    """The plan for every combination of LEVERS (GiB per GPU), and the combinations that fit. Returns the rows."""
    rows = []
    print(' '.join(f'{name:>17}' for name in LEVERS) + ' | params  grads  optim   acts logits buffers reserve |'
          '  total fits')
    for levers in itertools.product((False, True), repeat=len(LEVERS)):
        plan = {**memory_plan(config, **kw, **dict(zip(LEVERS, levers))), 'reserve': RESERVE}
        total = sum(plan.values())
        rows.append({**dict(zip(LEVERS, levers)), **plan, 'total': total, 'fits': total <= gpu_bytes})
        print(' '.join(f'{str(on):>17}' for on in levers) + ' | ' + ' '.join(f'{v / 2**30:6.1f}' for v in plan.values())
              + f' | {total / 2**30:6.1f} {"yes" if total <= gpu_bytes else "no"}')
    return rows


def deepest_fitting(config, gpu_bytes, **kw):
    """The most blocks of this shape whose plan (memory_plan with **kw, and RESERVE) fits gpu_bytes, and its
    parameters per copy: the largest model of this width a GPU can train (999 blocks at most are tried; the plan
    grows with depth, so a bisection finds it). None if not even one block fits."""
    def fits(n_layer):
        return sum(memory_plan(dataclasses.replace(config, n_layer=n_layer), **kw).values()) + RESERVE <= gpu_bytes
    if not fits(1):
        return None
    low, high = 1, 999  # fits(low); the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    root, block = root_and_block(dataclasses.replace(config, n_layer=low))
    return low, root + low * block


STATE = ('parameters', 'gradients', 'optimizer_state')


def rows_per_forward(batch_per_source, val_batch, n_sources, world_size, micro_steps):
    """Rows in each copy's forward on one rank, as steps.model_objective runs it: every source's rows and the
    validation rows of the step, over micro_steps forwards."""
    return (batch_per_source * n_sources + val_batch) // world_size // micro_steps


def run_plan(cfg, model_config, n_sources, world_size, copies, element_size, bf16, sharded):
    """The plan of the step train.py runs with cfg, every position planned to have a target (an upper bound on the
    logits): its rows per forward, and RESERVE. An evaluation forward holds less: the validation rows alone, in
    as many pieces (train.evaluate), with no activations kept."""
    tokens = rows_per_forward(cfg.batch_per_source, cfg.val_batch, n_sources, world_size,
                              micro_steps(cfg, world_size)) * cfg.block_size
    compute_size = 2 if bf16 else element_size
    plan = memory_plan(model_config, world_size, cfg.lisa_layers, element_size, copies, tokens=tokens, targets=tokens,
                       compute_size=compute_size, sharded=sharded, **{lever: getattr(cfg, lever) for lever in LEVERS})
    return {**plan, 'reserve': RESERVE}


def largest_micro_batch(cfg, gpu_bytes, *args):
    """The largest --micro_batch whose run_plan(cfg, *args) fits gpu_bytes (one that divides each rank's rows),
    or None."""
    for micro_batch in range(cfg.batch_per_source, 0, -1):
        try:
            plan = run_plan(dataclasses.replace(cfg, micro_batch=micro_batch), *args)
        except ValueError:  # it does not divide the rows each process gets
            continue
        if sum(plan.values()) <= gpu_bytes:
            return micro_batch
    return None


def check_plan(plan, gpu_bytes, where, micro_batch=None):
    """train.py on CUDA, before allocating: raises ValueError when the counted state alone exceeds the GPU; the
    estimated terms only warn (they are estimates), with the largest --micro_batch that fits. Returns the state's
    bytes."""
    state = sum(plan[name] for name in STATE)
    if state > gpu_bytes:
        raise ValueError(f"{where}: both copies' parameters, gradients and optimizer state alone need "
                         f"{state / 2**30:.1f} GiB per GPU, more than its {gpu_bytes / 2**30:.1f} GiB: more processes, "
                         f"fewer --lisa_layers, --cpu_offload=True or a smaller model (--check_memory=False runs it anyway)")
    if sum(plan.values()) > gpu_bytes:
        fits = f"--micro_batch={micro_batch} fits" if micro_batch else "no --micro_batch fits"
        print(f"warning: {where}: the plan needs {sum(plan.values()) / 2**30:.1f} GiB per GPU with activations, logits, "
              f"buffers and the reserve, more than its {gpu_bytes / 2**30:.1f} GiB: {fits}; --checkpoint_blocks=True "
              f"and --lower_first=True save more", file=sys.stderr)
    return state


def check_run_memory(cfg, model_config, n_sources, world_size, copies, element_size, bf16, sharded, device, rank):
    """train.py on CUDA: the plan for the run's own rows and levers, printed by rank 0, then check_plan (unless
    --check_memory=False). Returns the --micro_batch to run: the config's, or, when it is 0 (every row in one
    forward) and that does not fit, the largest that does."""
    args = (model_config, n_sources, world_size, copies, element_size, bf16, sharded)
    plan, gpu_bytes = run_plan(cfg, *args), torch.cuda.get_device_properties(device).total_memory
    splits = cfg.method in ('scalebio', 'fixed')  # IR-DRO's and RHO-LOSS's steps take no --micro_batch
    fitting = largest_micro_batch(cfg, gpu_bytes, *args) if splits and sum(plan.values()) > gpu_bytes else None
    if rank == 0:
        print_plan(plan, gpu_bytes)
    if cfg.check_memory and not cfg.micro_batch and fitting:
        if rank == 0:
            print(f"--micro_batch=0 puts each rank's whole batch in one forward, more than the GPU holds: "
                  f"--micro_batch={fitting}, the largest that fits")
        return fitting
    if cfg.check_memory:
        check_plan(plan, gpu_bytes, f"--device={device}", fitting)
    return cfg.micro_batch
