"""
Checkpoints, and how they prove themselves (the out_dir they live in, its lock and its log: outdir.py).

- Checkpoints: a folder written by torch.distributed.checkpoint (each rank writes its own shards, nothing is
  gathered into one rank's memory) plus meta.json; saved at one world size, loadable at any other. The same
  format serves out_dir/ckpt (everything needed to resume) and out_dir/best (the best upper model).
  torch.distributed.checkpoint also works without a process group, so one process writes the same format.
- meta.json records the SHA-256 of every file of the checkpoint and of every data file the run trained on;
  a load checks both, so a damaged shard or changed data is one clear error, not a different result.
- A checkpoint is written aside and renamed into place: a kill during a save leaves the previous one whole.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from bilevel import SOURCE_LOGITS_UPDATES
from config import RESUMABLE_CHANGES
from fsdp import barrier, is_main_process, merge_over_ranks
from model import GPTConfig, empty_model
from outdir import sync_folder, write_whole

# one process has no process group, and torch.distributed.checkpoint says so at every save; that is expected
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')



# ----------------------------------------------------------------------------------------------
# checksums

def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


# (path, size, mtime, inode) -> SHA-256 of a data file: a large corpus is read once per process (tools/compare.py runs
# many). Not for checkpoint files, which are rewritten at the same path and size, perhaps within an mtime tick
_DATA_DIGESTS = {}


def data_fingerprint(files, read=None):
    """{name: [bytes, SHA-256]} of the files a run reads its data, tokenizer and reference model from; `read`:
    {path: [bytes, SHA-256]} of files already hashed as they were read (data.read_bytes)."""
    fingerprint = {}
    for name, path in files.items():
        if path in (read or {}):
            fingerprint[name] = read[path]
            continue
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in _DATA_DIGESTS:
            _DATA_DIGESTS[key] = sha256(path)
        fingerprint[name] = [stat.st_size, _DATA_DIGESTS[key]]
    return fingerprint


def check_data_unchanged(recorded, now):
    """Raises ValueError naming the first data file whose fingerprint differs from the checkpoint's."""
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            what = 'is new' if name not in recorded else 'is gone' if name not in now else 'has changed'
            raise ValueError(f"--resume=True, but the data file {name} {what} since the checkpoint was written: "
                             f"resume on the data it trained on, or start afresh (--overwrite=True)")


def _checksums(folder):
    """SHA-256 of every file in folder but meta.json; each rank hashes a share of them."""
    names = sorted(n for n in os.listdir(folder) if n != 'meta.json')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return merge_over_ranks({n: sha256(os.path.join(folder, n)) for n in names[rank::world]})


def _verify(folder, checksums):
    """The first file of folder that is missing or does not match its checksum, or None."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = {}
    for name in sorted(checksums)[rank::world]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems[name] = f"{path} is missing"
        elif sha256(path) != checksums[name]:
            problems[name] = f"{path} does not match its checksum"
    problems = merge_over_ranks(problems)
    return problems[min(problems)] if problems else None


# ----------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, models, optimizers, tensors, meta, keep_previous=False):
    """Written into path.tmp, then renamed: a kill during a save leaves the previous checkpoint intact. With
    keep_previous it stays, as path.old, so a checkpoint damaged later still leaves one to resume from."""
    tmp = path + '.tmp'
    if is_main_process() and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    state = {'models': [get_model_state_dict(m) for m in models],
             'optimizers': [get_optimizer_state_dict(m, o) for m, o in zip(models, optimizers)],
             'tensors': tensors}
    try:
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        barrier()
        meta = {**meta, 'files': _checksums(tmp)}
        meta['meta_sha256'] = _meta_digest(meta)  # meta.json's own checksum: an edited step or loss is refused
        if is_main_process():  # the shards are flushed to the disk by torch.distributed.checkpoint (sync_files)
            write_whole(os.path.join(tmp, 'meta.json'), lambda f: json.dump(meta, f))
    except (OSError, CheckpointException) as e:  # a full disk, for one
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        if is_main_process():  # the part written would hold the disk's space until the next save
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(cause, KeyboardInterrupt):  # a second Ctrl-C while writing: train.cli's line for it
            raise KeyboardInterrupt from None
        raise OSError(f"could not write the checkpoint {tmp} ({getattr(cause, 'strerror', None) or cause}), "
                      f"removed; {path}, if there is one, is intact") from None
    if is_main_process():
        shutil.rmtree(path + '.old', ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, path + '.old')
        os.rename(tmp, path)  # between the renames only path.old exists, which checkpoint_folder accepts
        sync_folder(os.path.dirname(path))  # the renames, on the disk before training goes on
        if not keep_previous:
            shutil.rmtree(path + '.old', ignore_errors=True)
    barrier()


def checkpoint_folder(path):
    """path, or path.old where path is missing: a kill between the two renames of save_checkpoint."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} should be a checkpoint folder, and it is a file")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'meta.json')):
            raise ValueError(f"the checkpoint {path} is incomplete: it has no meta.json{_previous(path)}")
        return path
    if os.path.isfile(os.path.join(path + '.old', 'meta.json')):
        return path + '.old'
    raise FileNotFoundError(f"--resume=True but there is no checkpoint {path}")


def read_meta(path):
    """meta.json of the checkpoint at path (checkpoint_folder), with 'folder' added; an unreadable one, or one
    without the step and the checksums of its files, is an error naming it."""
    folder = checkpoint_folder(path)
    problem = _meta_problem(folder)
    if problem:
        raise ValueError(f"{folder}/meta.json is unreadable ({problem}){_previous(folder)}")
    with open(os.path.join(folder, 'meta.json')) as f:
        return {**json.load(f), 'folder': folder}


def _meta_digest(meta):
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != 'meta_sha256'}, sort_keys=True)
                          .encode()).hexdigest()


# meta.json's fields and their types (a checkpoint's; a best model's has step, val_loss, tokenizer, model_config, data)
META_TYPES = {'step': int, 'files': dict, 'config': dict, 'best_val_loss': (int, float), 'lower_val_rises': int,
              'cuda_rng': bool, 'data_files': dict, 'model_config': dict, 'val_loss': (int, float),
              'tokenizer': str, 'data': str, 'seed': int}


def _meta_problem(folder):
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return str(e)
    if not isinstance(meta, dict) or not isinstance(meta.get('step'), int) or meta['step'] < 0:
        return "no step"
    if not isinstance(meta.get('files'), dict) or '.metadata' not in meta['files']:
        return "no checksums of its files"
    if 'meta_sha256' in meta and meta['meta_sha256'] != _meta_digest(meta):  # without: an older version's
        return "its contents do not match their checksum: it was edited or damaged"
    wrong = [k for k, kind in META_TYPES.items() if k in meta and (not isinstance(meta[k], kind)
                                                                   or kind is int and isinstance(meta[k], bool))]
    if wrong:
        return f"the fields {wrong} are of the wrong type"
    if any(meta.get(k) != meta.get(k) or meta.get(k) == -math.inf for k in ('best_val_loss', 'val_loss')):
        return "a loss in it is NaN or -inf"  # no later loss would ever count as better
    return None


def _previous(folder):
    """Where to turn when folder is damaged: the previous checkpoint, if it is there and its files are intact."""
    old = folder + '.old'
    if folder.endswith('.old') or not os.path.isdir(old) or _meta_problem(old):
        return ''
    with open(os.path.join(old, 'meta.json')) as f:
        meta = json.load(f)
    if _verify(old, meta['files']):
        return ''
    return f"; the previous checkpoint {old} (step {meta['step']}) is intact: move it to {folder} to resume from it"


def replicated_state(run, with_cuda_rng):
    """p, its optimizer's state (Adam's moments; SGD keeps none), the baselines' received shares and the RNG
    state: the same on every rank, so the checkpoint keeps one copy."""
    state = run.source_logits_optimizer.state[run.source_logits]
    adam = SOURCE_LOGITS_UPDATES[run.cfg.source_logits_update]['optimizer'] == 'adam'
    if not state and adam:  # before p's first step
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(run.source_logits),
                     exp_avg_sq=torch.zeros_like(run.source_logits))
    rng = {'cpu': torch.get_rng_state()}  # every rank is seeded alike, so one copy serves all
    if with_cuda_rng:
        rng['cuda'] = torch.cuda.get_rng_state()
    return {'source_logits': run.source_logits.data, 'source_logits_optimizer_state': state,
            'received_sum': run.received_sum, 'rng_state': rng}


def check_resumable(meta, cfg, end_step, model_config):
    """Raises ValueError unless the checkpoint of `meta` can resume this run: written by this version of
    train.py, not past end_step, with the run's config but for RESUMABLE_CHANGES, and with its model's config
    (`model_config`, a dict; --init_from's config.json may have changed since)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    missing = {'config', 'model_config', 'best_val_loss', 'lower_val_rises', 'cuda_rng', 'data_files',
               'meta_sha256'} - set(meta)
    missing |= fields - set(meta.get('config', fields))
    unknown = set(meta.get('config', {})) - fields
    if missing or unknown:
        raise ValueError(f"{meta['folder']}/meta.json was not written by this version of train.py (it lacks "
                         f"{sorted(missing)}, has the unknown config fields {sorted(unknown)})")
    if meta['step'] > end_step:
        raise ValueError(f"the checkpoint is at step {meta['step']}, past the step this run is to stop at ({end_step}): "
                         f"raise --stop_at (0: --max_steps) or --max_steps")
    changed = [k for k, v in meta['config'].items() if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v
               and not (k == 'data' and os.path.realpath(cfg.data) == os.path.realpath(v))]  # d1 or /abs/d1
    if changed:
        raise ValueError("--resume=True with a different config: " + ', '.join(
            f"{k}={getattr(cfg, k)!r} (checkpoint: {meta['config'][k]!r})" for k in changed))
    model_config = json.loads(json.dumps(model_config))  # as meta.json holds it: lists, not tuples
    changed = [f"{k} {v!r} (checkpoint: {meta['model_config'].get(k)!r})" for k, v in model_config.items()
               if meta['model_config'].get(k) != v]
    if changed:
        raise ValueError(f"--resume=True with another model: {', '.join(changed)}"
                         + (f" (--init_from={cfg.init_from}'s config.json changed)" if cfg.init_from else ''))


def load_checkpoint(meta, models, optimizers, tensors):
    """Loads the checkpoint that read_meta described, in place, once its files match their checksums. The
    optimizers' state entries must exist for the parameters that had state when the checkpoint was saved
    (get_optimizer_state_dict creates them for every parameter that requires grad, with a zero-lr step), so
    the caller sets requires_grad as it was at the save (LISA)."""
    folder = meta['folder']
    problem = _verify(folder, meta['files'])
    if problem:
        raise ValueError(f"the checkpoint is damaged: {problem}{_previous(folder)}")
    state = {'models': [get_model_state_dict(m) for m in models],
             'optimizers': [get_optimizer_state_dict(m, o) for m, o in zip(models, optimizers)],
             'tensors': tensors}
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # intact files that do not fit this run
        cause = next(iter(e.failures.values()))[0]
        raise ValueError(f"the checkpoint {folder} does not fit this run ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
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
    meta = read_meta(folder)
    if 'meta_sha256' not in meta:  # its fields (data, seed, method) are then only as good as the file's author
        raise ValueError(f"{folder}/meta.json has no checksum of its own: another version of train.py wrote it, or "
                         f"it was edited; train that run again")
    problem = _verify(folder, meta['files'])
    if problem:
        raise ValueError(f"the best model is damaged: {problem}")
    model = empty_model(GPTConfig(**meta['model_config']))
    state = {'models': [model.state_dict()]}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state['models'][0])
    return model.eval(), meta
