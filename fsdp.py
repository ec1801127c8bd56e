"""
What knows there may be several processes: torchrun's process group, FSDP2 sharding of a model copy,
gathering over ranks, and the bytes one rank holds (checkpoint.py writes the shards; the step's mean over ranks
is steps.mean_over_ranks).
bilevel.py stays free of it: the step never learns how its models are sharded.

With plain `python train.py` there is no process group and each function does the one-process thing.
"""
import datetime
import gc
import math
import os
import traceback
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor


class Processes(NamedTuple):
    """This process's place in the run: its rank of world_size, its device, and whether models are sharded."""
    rank: int
    world_size: int
    device: str
    sharded: bool


def init_distributed(device, timeout_minutes=10.0):
    """Processes(rank, world_size, device, sharded). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this
    is one process and nothing is sharded. nccl on CUDA (with gloo for host tensors), gloo on CPU. A collective
    that waits longer than timeout_minutes for its peers raises (gloo) or ends the process (nccl's watchdog),
    instead of hanging."""
    use_cuda = torch.cuda.is_available() and (device == 'auto' or device.startswith('cuda'))
    if 'RANK' not in os.environ:
        return Processes(0, 1, device if device != 'auto' else ('cuda' if use_cuda else 'cpu'), False)
    try:
        return _init_process_group(use_cuda, datetime.timedelta(minutes=timeout_minutes))
    except RuntimeError as e:  # a peer that never arrived, a rendezvous store that timed out
        raise ConnectionError(f"the process group did not form ({str(e).splitlines()[0]}): every process must "
                              f"start within --dist_timeout={timeout_minutes} minutes") from None


def _init_process_group(use_cuda, timeout):
    if not use_cuda:
        dist.init_process_group('gloo', timeout=timeout)
        return Processes(dist.get_rank(), dist.get_world_size(), 'cpu', True)
    # under torchrun, one GPU per rank, set before the group exists: with device_id, nccl binds this rank's
    # communicator to its GPU at once instead of guessing it at the first collective
    if int(os.environ['LOCAL_RANK']) >= torch.cuda.device_count():
        raise ValueError(f"process {os.environ['LOCAL_RANK']} of this node has no GPU: the node has "
                         f"{torch.cuda.device_count()}; start at most that many (--nproc_per_node)")
    device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    torch.cuda.set_device(device)
    # gloo beside nccl for the collectives that meet host tensors: with --cpu_offload the shards and gradients live
    # in host memory (clip_gradient's norm, --export's gathers), and nccl has no CPU backend (torchtitan does the same)
    dist.init_process_group('cuda:nccl,cpu:gloo', device_id=device, timeout=timeout)
    return Processes(dist.get_rank(), dist.get_world_size(), str(device), True)


def end_distributed():
    """Frees the models and destroys the process group while the interpreter is whole. FSDP2 models sit in
    reference cycles that outlive main() (gc.collect() frees them). Left to
    interpreter teardown, their collection can race gloo's threads and abort a finished rank ("terminate
    called without an active exception"). The abort is rare; freeing the models first removes its likely cause.
    TODO: confirm the cause with a reproduction."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def peer_error(error, timeout):
    """gloo's error when another process stopped answering ("Timed out waiting 600000ms for recv operation") or
    ended ("Connection closed by peer"), as an error that names the collective; a failed allocation as a
    MemoryError that says what to lower; any other error as it is."""
    names = [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)
             if frame.f_code.co_filename.endswith('distributed_c10d.py')]
    during = f"the collective {names[-1]}" if names else "a collective"
    if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
        return MemoryError(f"out of memory ({str(error).splitlines()[0]}): lower --batch_per_source, --val_batch, "
                           f"--block_size or the model's size, or set --micro_batch")
    if not dist.is_initialized():
        return error
    if 'Timed out' in str(error):
        return TimeoutError(f"{during} waited more than --dist_timeout={timeout} minutes for another process: "
                            f"one is hung, or far slower than this one")
    if any(sign in str(error) for sign in ('Connection closed by peer', 'Connection reset by peer', 'Read error',
                                           'Broken pipe')):
        return ConnectionError(f"another process ended during {during}")
    return error


def shard(model, bf16, cpu_offload=False):
    """FSDP2 (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) in torchtitan's units
    (torchtitan/models/llama3/infra/parallelize.py): the embedding, each block, the final norm with the head,
    then the root. A unit's parameters are all-gathered only for its own forward and backward, so at 8B-34B
    the two vocabulary matrices (~2 GiB each at 128k x 4096) are not held gathered through the whole step. A
    tied head is the embedding's own matrix: it stays in the root with it (GPT-2, Llama 3.2 1B and 3B).
    Under bf16 the compute is bf16 and gradients reduce in fp32. cpu_offload: the shards, their gradients and
    the optimizer's state live in host memory and the optimizer steps on the CPU; a unit is copied to the GPU
    for its forward and backward (the authors' setting)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for unit in units(model) + [model]:
        # [final norm, head] stays gathered from its forward to its backward, which comes straight after (as in
        # torchtitan: resharding it would only gather it again at once); reshard() lets it go after evaluation
        fully_shard(unit, mp_policy=policy, offload_policy=offload, reshard_after_forward=not isinstance(unit, list))


def units(model):
    """The units inside the root, in order: [embedding,] each block[, [final norm, head]] (plan.py sizes them)."""
    if model.config.tie_embeddings:
        return list(model.blocks)
    if hasattr(model, 'transformer'):  # GPT-2's layout (GPT-NeoX's), or Llama's
        embedding, norm = model.transformer.wte, model.transformer.ln_f
    else:
        embedding, norm = model.model.embed_tokens, model.model.norm
    return [embedding] + list(model.blocks) + [[norm, model.lm_head]]


def reshard(model):
    """After a forward without backward (warm-up, evaluation): FSDP2 reshards a unit after its forward but the
    root and [final norm, head], which it keeps gathered for the backward it expects. A no-op unsharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def fill(model, named_tensors):
    """Copies each (name, tensor) into the model's parameter of that name; of a sharded parameter, only this
    rank's rows (FSDP2 shards dim 0 as torch.chunk does). A name may come twice: the later value wins. A tensor
    is a full one (model.initial_weights: one at a time, so a rank never holds more than one full tensor beyond
    its shards) or an hf.Rows, of which only this rank's rows are read, each checked: a NaN weight is named here,
    not met as a NaN loss later, and a float32 tensor labelled int32 (the same bytes) is caught by its dtype."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in named_tensors:
        param, read, n = params[name], getattr(source, 'read', lambda start, stop: source[start:stop]), source.shape[0]
        if isinstance(param, DTensor):
            rows = -(-n // param.device_mesh.size())  # torch.chunk's rows per rank
            start = min(param.device_mesh.get_local_rank() * rows, n)
            tensor, param = read(start, min(start + rows, n)), param.to_local()
        else:
            tensor = read(0, n)
        if not tensor.is_floating_point() or tensor.numel() and not all(map(math.isfinite, torch.aminmax(tensor))):
            raise ValueError(f"{getattr(source, 'where', name)}: a weight must hold finite floating-point numbers, "
                             f"this one is {tensor.dtype}{' with NaN or infinite values' * tensor.is_floating_point()}")
        if tensor.shape != param.shape:  # copy_ would broadcast a smaller tensor without a word
            raise RuntimeError(f"{name}: shape {tuple(tensor.shape)} to fill this rank's {tuple(param.shape)} "
                               f"(under FSDP2, its rows as torch.chunk cuts them)")
        param.copy_(tensor)


@torch.no_grad()
def copy_shards(target, source):
    """Copies every parameter of `source` into `target`, a model of the same shape and sharding, shard by shard."""
    for t, s in zip(target.parameters(), source.parameters()):
        local(t).copy_(local(s))


def local(tensor):
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def warm_up(model, x):
    """A forward of one row with every block trainable, before LISA first freezes any: FSDP2 sets its
    parameters up at its first forward, and a forward alone is enough. No backward, so no gradient is ever
    allocated and the step-0 peak stays below a training step's; nothing trains, so sharded runs stay equal
    to one-process runs.

    Why: under a bf16 MixedPrecisionPolicy, a block frozen at FSDP2's first forward and unfrozen later fails
    with "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float" (seen on
    CPU/gloo with torch 2.13, and on an H100 with nccl and torch 2.11; tests/fsdp_bf16_lisa.py shows both).
    """
    model(x[:1])
    reshard(model)


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank0_decides(decide):
    """Runs decide() on rank 0 alone and hands its result, or its error, to every rank: a check of the file
    system (out_dir, the data's checksums) is made once, and every rank stops with the same one-line error."""
    outcome = [None]
    if is_main_process():
        try:
            outcome = [('result', decide())]
        except (ValueError, OSError) as e:
            outcome = [('error', str(e))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == 'error':
        raise ValueError(value)
    return value


def merge_over_ranks(pieces):
    """The union of every rank's dict."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(pieces)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    return {k: v for piece in gathered for k, v in piece.items()}


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
    return sum(local(t).numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer):
    """Bytes of Adam's moments held by this rank (the scalar step counters excluded)."""
    return local_bytes(t for state in optimizer.state.values() for name, t in state.items() if name != 'step')


def record_gradient_peak(run):
    """Keeps run.grad_bytes at the most gradient bytes this rank holds at once, all copies together: read just before
    each model optimizer's step, when the gradients of a step are complete (both copies', or one with --lower_first)."""
    def before_step(optimizer, args, kwargs):
        alive = local_bytes(p.grad for m in run.models for p in m.parameters() if p.grad is not None)
        run.grad_bytes = max(run.grad_bytes, alive)
    for optimizer in run.optimizers:
        optimizer.register_step_pre_hook(before_step)


def gradient_bytes(optimizers, one_at_a_time=False):
    """The gradient bytes a step's backwards leave on this rank at once: every trainable parameter's local shard, of
    every copy (of one with --lower_first, which steps u before w's backward). Counted on the optimizers'
    parameters, FSDP2's shards: after a forward a model may hold its root's parameters unsharded. tools/bench.py
    measures the same peak inside the step (record_gradient_peak)."""
    per_copy = [local_bytes(p for group in opt.param_groups for p in group['params'] if p.requires_grad)
                for opt in optimizers]
    return max(per_copy) if one_at_a_time else sum(per_copy)


def rank_bytes(models, optimizers, grad_bytes):
    """What this rank holds for the models (local shards): parameters, gradients at their peak, Adam moments."""
    return {'parameters': sum(local_bytes(m.parameters()) for m in models), 'gradients': grad_bytes,
            'optimizer_state': sum(optimizer_state_bytes(o) for o in optimizers)}
