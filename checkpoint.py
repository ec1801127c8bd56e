"""
What a run keeps on disk, and how it proves itself.

- The out_dir belongs to one run: rank 0 holds a lock on out_dir/run.lock (its pid and host) while the run
  lives, and a fresh run refuses a folder that holds another run's files unless told --overwrite=True.
- Checkpoints: a folder written by torch.distributed.checkpoint (each rank writes its own shards, nothing is
  gathered into one rank's memory) plus meta.json; saved at one world size, loadable at any other. The same
  format serves out_dir/ckpt (everything needed to resume) and out_dir/best (the best upper model).
  torch.distributed.checkpoint also works without a process group, so one process writes the same format.
- meta.json records the SHA-256 of every file of the checkpoint and of every data file the run trained on;
  a load checks both, so a damaged shard or changed data is one clear error, not a different result.
- An interrupted run loses nothing: SIGINT or SIGTERM lets the step finish and a checkpoint be written
  (signals_stop_at_next_step), and a resumed run's log.jsonl is cut back to what its checkpoint has seen.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import time
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
from fsdp import barrier, is_main_process, merge_over_ranks, rank0_decides
from model import GPTConfig, empty_model

# one process has no process group, and torch.distributed.checkpoint says so at every save; that is expected
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')

# what a run writes into its out_dir, and whether each is a folder
RUN_FILES = {'ckpt': True, 'ckpt.old': True, 'ckpt.tmp': True, 'best': True, 'best.old': True, 'best.tmp': True,
             'hf': True, 'hf.tmp': True, 'log.jsonl': False, 'summary.json': False, 'mixture.json': False,
             'log.jsonl.tmp': False, 'summary.json.tmp': False, 'mixture.json.tmp': False}
LOCK = 'run.lock'


# ----------------------------------------------------------------------------------------------
# the out_dir

@contextlib.contextmanager
def own_out_dir(out_dir, resume, overwrite):
    """Holds out_dir for this run. Rank 0 takes out_dir/run.lock with flock, which the kernel releases when the
    process ends, so a killed run leaves no stale lock; taking it is also the test that the folder can be
    written. A fresh run in a folder with another run's files is refused unless --overwrite=True; yields those
    files, for the run to delete once its inputs are known to be good (remove_files). On the way out, the folders
    this run created and left empty (bad input) go again."""
    if resume and overwrite:
        raise ValueError("--resume=True continues the run in out_dir, --overwrite=True deletes it: choose one")
    created, previous = rank0_decides(lambda: _claim(out_dir, resume, overwrite))
    try:
        yield previous
    finally:
        if is_main_process():
            lock = _HELD_LOCKS.pop(out_dir)
            os.remove(lock.name)
            lock.close()
            for folder in created:  # the deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only if empty


_HELD_LOCKS = {}  # out_dir -> the open, flocked run.lock of this process's run


def _claim(out_dir, resume, overwrite):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir={out_dir} is a file, not a folder")
    created, folder = [], os.path.abspath(out_dir)
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = _take_lock(out_dir)
    except OSError as e:  # read-only, or under a file, or on a full disk: writing the lock is the test
        raise ValueError(f"--out_dir={out_dir} cannot be written ({e.strerror})") from None
    used = [name for name in RUN_FILES if os.path.lexists(os.path.join(out_dir, name))]
    wrong = [name for name in used if os.path.isdir(os.path.join(out_dir, name)) != RUN_FILES[name]]
    problem = None
    if wrong and not overwrite:
        problem = (f"{os.path.join(out_dir, wrong[0])} should be a {'folder' if RUN_FILES[wrong[0]] else 'file'}: "
                   f"this out_dir holds something else; use another --out_dir, or --overwrite=True to replace it")
    elif used and not resume and not overwrite:
        problem = (f"--out_dir={out_dir} holds another run ({', '.join(used)}): continue it with --resume=True, "
                   f"or start afresh with --overwrite=True (deletes those) or another --out_dir")
    if problem:
        os.remove(lock.name)
        lock.close()
        raise ValueError(problem)
    _HELD_LOCKS[out_dir] = lock
    return created, used if overwrite else []


def _take_lock(out_dir):
    """out_dir/run.lock, open and flocked, holding this process's pid and host for the message of a refused run."""
    path = os.path.join(out_dir, LOCK)
    while True:
        lock = open(path, 'a+')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid, host, *since = lock.read().split() + ['?'] * 4
            lock.close()
            raise ValueError(f"--out_dir={out_dir} is in use by another run (process {pid} on {host}, since "
                             f"{' '.join(since[:2])}): wait for it, or use another --out_dir") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()  # the run that held it removed it as we locked it: take the new one
    lock.truncate(0)
    lock.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def remove_files(out_dir, names, inputs):
    """Deletes these files and folders of out_dir (the previous run's, for --overwrite=True), on rank 0, unless one
    of this run's inputs ({'--field': path}) lies in them: then nothing is deleted and the error names it."""
    for field, path in inputs.items():
        real = os.path.realpath(path)
        for name in names:
            doomed = os.path.realpath(os.path.join(out_dir, name))
            if real == doomed or real.startswith(doomed + os.sep):
                raise ValueError(f"{field}={path} lies in {os.path.join(out_dir, name)}, which --overwrite=True would "
                                 f"delete: copy it out of --out_dir={out_dir} first, or use another --out_dir")
    if is_main_process():
        for name in names:
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    barrier()


def write_whole(path, write, mode='w'):
    """path, written by write(f) whole or not at all: into path.tmp, flushed to the disk, then renamed over path.
    A full disk, a kill or a power cut leaves path as it was; the error names it."""
    tmp = path + '.tmp'
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)  # the rename itself, to the disk
        os.fsync(folder)
        os.close(folder)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"could not write {path} ({e.strerror or e}); the file as it was before is intact") from None


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
        raise OSError(f"could not write the checkpoint {tmp} ({getattr(cause, 'strerror', None) or cause}); "
                      f"{path}, if there is one, is intact") from None
    if is_main_process():
        shutil.rmtree(path + '.old', ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, path + '.old')
        os.rename(tmp, path)  # between the renames only path.old exists, which checkpoint_folder accepts
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
    return f"the fields {wrong} are of the wrong type" if wrong else None


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
                         f"raise --stop_at, or set it to 0")
    changed = [k for k, v in meta['config'].items() if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v]
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
    problem = _verify(folder, meta['files'])
    if problem:
        raise ValueError(f"the best model is damaged: {problem}")
    model = empty_model(GPTConfig(**meta['model_config']))
    state = {'models': [model.state_dict()]}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state['models'][0])
    return model.eval(), meta


def trim_log(out_dir, start_step):
    """A resumed run's log.jsonl keeps only what its checkpoint has seen (a killed run logs more, perhaps half
    a line)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(path):
        kept = [record for record in read_log(path) if record['step'] <= start_step]
        write_whole(path, lambda f: f.writelines(json.dumps(record) + '\n' for record in kept))


def read_log(path):
    """The records of a log.jsonl, but a line that a kill cut short."""
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def logged_record(out_dir, step):
    records = [r for r in read_log(os.path.join(out_dir, 'log.jsonl')) if r['step'] == step]
    if not records:
        raise ValueError(f"the checkpoint is at the final step {step}, and {out_dir}/log.jsonl has no record of it "
                         f"to write summary.json from")
    return records[-1]


@contextlib.contextmanager
def signals_stop_at_next_step():
    """SIGINT / SIGTERM: the loop finishes the current step, saves a checkpoint and exits. A second signal
    acts at once."""
    stop_signals, old_handlers = [], {}

    def request_stop(signum, frame):
        stop_signals.append(signum)
        signal.signal(signum, old_handlers[signum])
    for s in (signal.SIGINT, signal.SIGTERM):
        old_handlers[s] = signal.signal(s, request_stop)
    try:
        yield stop_signals
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
