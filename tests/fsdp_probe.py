"""Run by tests/test_distributed.py under torchrun: build a run as train.py does, evaluate both copies, take one
ScaleBiO step and export the upper copy, and write one JSON file per rank: FSDP2's units of each copy (the modules
fully_shard wrapped), the parameters left gathered (not a sharded DTensor) after evaluate, and the collectives of
the step and of the export (torch's CommDebugMode counts them by operation)."""
import json
import os
import sys

from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

import train
from fsdp import end_distributed, init_distributed
from hf import export_pretrained

cfg = train.parse_config(sys.argv[1:])
processes = init_distributed(cfg.device)
run = train.build_run(cfg, processes)
report = {'rank': processes.rank, 'units': [], 'gathered': [], 'parameters': len(list(run.models[1].parameters()))}
for model in run.models:
    train.evaluate(run, model, 'val')
    report['units'].append([name or 'root' for name, m in model.named_modules() if isinstance(m, FSDPModule)])
    report['gathered'].append([name for name, p in model.named_parameters() if not isinstance(p, DTensor)])
alpha, _ = train.set_schedules(run, 0)
with CommDebugMode() as step_collectives:
    train.take_step(run, 0, alpha)
with CommDebugMode() as export_collectives:
    export_pretrained(run.models[1], os.path.join(cfg.out_dir, 'hf'))
for name, counted in (('step', step_collectives), ('export', export_collectives)):
    report[name] = {str(op): count for op, count in counted.get_comm_counts().items()}
os.makedirs(cfg.out_dir, exist_ok=True)
with open(os.path.join(cfg.out_dir, f"units_{processes.rank}.json"), 'w') as f:
    json.dump(report, f)
end_distributed()
