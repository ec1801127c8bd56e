"""Run by tests/test_distributed.py under torchrun: build a run as train.py does, evaluate both copies, and
print one JSON line per rank: FSDP2's units of each copy (the modules fully_shard wrapped) and the parameters
left gathered (not a sharded DTensor) after evaluate."""
import json
import os
import sys

from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from fsdp import end_distributed, init_distributed

cfg = train.parse_config(sys.argv[1:])
processes = init_distributed(cfg.device)
run = train.build_run(cfg, processes)
report = {'rank': processes.rank, 'units': [], 'gathered': []}
for model in run.models:
    train.evaluate(run, model, 'val')
    report['units'].append([name or 'root' for name, m in model.named_modules() if isinstance(m, FSDPModule)])
    report['gathered'].append([name for name, p in model.named_parameters() if not isinstance(p, DTensor)])
os.makedirs(cfg.out_dir, exist_ok=True)
with open(os.path.join(cfg.out_dir, f"units_{processes.rank}.json"), 'w') as f:
    json.dump(report, f)
end_distributed()
