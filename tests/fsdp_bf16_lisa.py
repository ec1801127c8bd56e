"""Run by tests/test_distributed.py under torchrun: LISA switches under FSDP2 with a bf16 MixedPrecisionPolicy.
Without fsdp.warm_up, a block frozen at the first forward and unfrozen later fails (gradient dtype mismatch)."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fsdp import shard, warm_up
from lisa import set_active_blocks
from model import GPT, GPTConfig

device = 'cuda' if torch.cuda.is_available() else 'cpu'  # gloo on CPU in tests/, nccl on a GPU
dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=4, n_head=2, n_embd=16)).to(device)
shard(model, bf16=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 64, (4, 8), device=device)
if sys.argv[1] == 'warm_up':
    grad_enabled = []
    hook = model.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    warm_up(model, x)
    hook.remove()
    if grad_enabled == [False] and all(p.grad is None for p in model.parameters()):
        print('the warm-up built no autograd graph')  # no saved activations, no gradient: step 0 peaks lower
    if all(isinstance(p, DTensor) for p in model.parameters()):
        print('the warm-up left every parameter sharded')  # the root too, which FSDP2 reshards after a backward
for active in ([0, 1], [0, 1], [2, 3], [1, 2]):
    set_active_blocks(model.transformer.h, optimizer, active)
    model(x, x)[1].mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print('all switches trained')
dist.barrier()  # both ranks done before teardown: without it gloo sometimes aborts at exit (seen 2 in 8)
dist.destroy_process_group()
