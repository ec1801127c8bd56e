"""Run by tests/test_distributed.py under torchrun: the host memory one rank takes to build and fill both model
copies (train.build_models), as the growth of its peak resident set (VmHWM, which only grows) over the peak
before, once the process group and the data exist; and the bytes it read meanwhile (rchar: every read() call,
from the page cache or the disk). Writes out_dir/memory_<rank>.json."""
import json
import os
import sys

import torch

import train
from data import load_data
from tokenizer import load_tokenizer
from fsdp import init_distributed


def bytes_read():
    with open('/proc/self/io') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('rchar'))


def peak_rss_bytes():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))


cfg = train.parse_config(sys.argv[1:])
rank, world_size, device, sharded = init_distributed(cfg.device)
data = load_data(cfg.data, cfg.block_size, cfg.seed, load_tokenizer(cfg.tokenizer))
torch.nn.init.normal_(torch.empty(1, device='meta'))  # torch imports its meta kernels (~30 MB) at the first use
before, read_before = peak_rss_bytes(), bytes_read()
models, _ = train.build_models(cfg, data, device, torch.float32, sharded, False, rank, world_size)
report = {'rank': rank, 'growth': peak_rss_bytes() - before, 'read': bytes_read() - read_before,
          'largest_tensor': max(p.numel() * p.element_size() for p in models[0].parameters())}
os.makedirs(cfg.out_dir, exist_ok=True)  # a file per rank: torchrun can run the ranks' stdout lines together
with open(os.path.join(cfg.out_dir, f'memory_{rank}.json'), 'w') as f:
    json.dump(report, f)
