"""
Everything in this project that knows there may be several processes: torchrun's process group, FSDP2
sharding of a model copy, averaging over ranks, sharded checkpoints and the bytes one rank holds.
bilevel.py stays free of it: the step never learns how its models are sharded.

With plain `python train.py` there is no process group and each function does the one-process thing
(torch.distributed.checkpoint also works without a process group, so there is one checkpoint format).
"""
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from data import rank_rows
from model import GPT, GPTConfig, target_counts

# one process has no process group, and torch.distributed.checkpoint says so at every save; that is expected
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')


def init_distributed(device):
    """(rank, world_size, device, sharded). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this
    is one process and nothing is sharded. nccl on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() and (device == 'auto' or device.startswith('cuda'))
    if 'RANK' not in os.environ:
        return 0, 1, device if device != 'auto' else ('cuda' if use_cuda else 'cpu'), False
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'  # under torchrun, one GPU per rank
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


def shard(model, bf16):
    """FSDP2 (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html): each block is a unit
    whose parameters are all-gathered only for its own forward and backward, then the root holds the rest
    (embeddings, final norm, tied head). Under bf16 the compute is bf16 and gradients reduce in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def warm_up(model, x, y):
    """One forward and backward with every block trainable, before LISA first freezes any: no optimizer
    step, the gradients are dropped, so nothing trains and sharded runs stay equal to one-process runs.

    Why: under a bf16 MixedPrecisionPolicy, a block frozen at FSDP2's first forward and unfrozen later fails
    with "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float" (seen on
    CPU/gloo with torch 2.13, and on an H100 with nccl and torch 2.11; tests/fsdp_bf16_lisa.py shows both).
    """
    model(x, y)[1].mean().backward()
    model.zero_grad(set_to_none=True)


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(tensor):
    """The mean of a tensor over ranks, in place (gloo has no AVG reduction, hence SUM then divide)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def gather_over_ranks(tensor):
    """Every rank's tensor, stacked in rank order: shape (world_size, *tensor.shape)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor[None]
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.stack(pieces)


def full(tensor):
    """A plain tensor with the full value of a (possibly sharded) DTensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_bytes(tensors):
    """Bytes this rank holds for these tensors: the local shard of a DTensor, all of a plain tensor."""
    return sum(t.numel() * t.element_size() for t in
               (x.to_local() if isinstance(x, DTensor) else x for x in tensors))


def optimizer_state_bytes(optimizer):
    """Bytes of Adam's moments held by this rank (the scalar step counters excluded)."""
    return local_bytes(t for state in optimizer.state.values() for name, t in state.items() if name != 'step')


def rank_bytes(models, optimizers, grad_bytes):
    """What this rank holds for the models (local shards): parameters, gradients at their peak (recorded by
    the caller just before each optimizer step), Adam moments."""
    return {'parameters': sum(local_bytes(m.parameters()) for m in models), 'gradients': sum(grad_bytes.values()),
            'optimizer_state': sum(optimizer_state_bytes(o) for o in optimizers)}


# ----------------------------------------------------------------------------------------------
# checkpoints: a folder written by torch.distributed.checkpoint (each rank writes its own shards, nothing
# is gathered into one rank's memory) plus meta.json; saved at one world size, loadable at any other.

def full_state_dict(model):
    """The whole model's state dict on CPU, gathered from the shards: for export only (checkpoints stay sharded)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, models, optimizers, tensors, meta):
    """Written into path.tmp, then renamed: a kill during a save leaves the previous checkpoint intact
    (between the two renames it is path.old, which load_checkpoint also accepts)."""
    tmp = path + '.tmp'
    if is_main_process() and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    state = {'models': [get_model_state_dict(m) for m in models],
             'optimizers': [get_optimizer_state_dict(m, o) for m, o in zip(models, optimizers)],
             'tensors': tensors}
    dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if is_main_process():
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f)
        shutil.rmtree(path + '.old', ignore_errors=True)  # left by a process killed between the renames
        if os.path.exists(path):
            os.rename(path, path + '.old')
        os.rename(tmp, path)
        shutil.rmtree(path + '.old', ignore_errors=True)
    barrier()


def checkpoint_folder(path):
    for candidate in (path, path + '.old'):
        if os.path.isfile(os.path.join(candidate, 'meta.json')):
            return candidate
    raise FileNotFoundError(f"--resume=True but there is no checkpoint {path}")


def read_meta(path):
    with open(os.path.join(checkpoint_folder(path), 'meta.json')) as f:
        return json.load(f)


def load_checkpoint(path, models, optimizers, tensors):
    """Loads in place. The optimizers' state entries must exist for the parameters that had state when
    the checkpoint was saved (get_optimizer_state_dict creates them for every parameter that requires
    grad, with a zero-lr step), so the caller sets requires_grad as it was at the save (LISA)."""
    state = {'models': [get_model_state_dict(m) for m in models],
             'optimizers': [get_optimizer_state_dict(m, o) for m, o in zip(models, optimizers)],
             'tensors': tensors}
    dcp.load(state, checkpoint_id=checkpoint_folder(path), no_dist=not dist.is_initialized())
    for model, opt, model_state, opt_state in zip(models, optimizers, state['models'], state['optimizers']):
        set_model_state_dict(model, model_state)
        set_optimizer_state_dict(model, opt, opt_state)


@torch.no_grad()
def evaluate(model, batches, autocast, rank, world_size, per_example=False):
    """Token-mean loss over the batches (per_example: the mean of row means, a source's loss). Each rank takes
    its rows and the sums are all-reduced, so every rank's decisions on it (the best checkpoint) agree."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device)  # loss over tokens, tokens
    for x, y in batches:
        x, y = rank_rows(x, 1, rank, world_size), rank_rows(y, 1, rank, world_size)
        with autocast:
            _, row_loss = model(x, y)
        counts = target_counts(y, torch.float64) if not per_example else torch.ones_like(row_loss).double()
        sums += torch.stack([(row_loss.double() * counts).sum(), counts.sum()])
    model.train()
    sums = mean_over_ranks(sums)
    return (sums[0] / sums[1]).item()


def load_best_model(run_dir):
    """The best model of a finished train.py run (out_dir/best, saved at any world size), unsharded on the
    CPU, and its meta.json (step, val_loss, model_config, tokenizer)."""
    folder = os.path.join(run_dir, 'best')
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        raise FileNotFoundError(f"no {folder}/meta.json: train.py writes it at its first evaluation")
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    model = GPT(GPTConfig(**meta['model_config']))
    state = {'models': [model.state_dict()]}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state['models'][0])
    return model.eval(), meta
