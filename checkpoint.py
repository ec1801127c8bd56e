"""
Checkpoints: a folder written by torch.distributed.checkpoint (each rank writes its own shards, nothing is
gathered into one rank's memory) plus meta.json; saved at one world size, loadable at any other. The same
format serves out_dir/ckpt (everything needed to resume) and out_dir/best (the best upper model).
torch.distributed.checkpoint also works without a process group, so one process writes the same format.
"""
import json
import os
import shutil
import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from fsdp import barrier, is_main_process
from model import GPTConfig, empty_model

# one process has no process group, and torch.distributed.checkpoint says so at every save; that is expected
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')



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


def load_best_model(run_dir):
    """The best model of a finished train.py run (out_dir/best, saved at any world size), unsharded on the
    CPU, and its meta.json (step, val_loss, model_config, tokenizer). Built on the meta device and allocated
    empty: its weights are read once, with no random initialisation to overwrite."""
    folder = os.path.join(run_dir, 'best')
    if not os.path.isfile(os.path.join(folder, 'meta.json')):
        raise FileNotFoundError(f"no {folder}/meta.json: train.py writes it at its first evaluation, "
                                f"unless --save_best=False")
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    model = empty_model(GPTConfig(**meta['model_config']))
    state = {'models': [model.state_dict()]}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state['models'][0])
    return model.eval(), meta
