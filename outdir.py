"""
The out_dir a run owns, and what it writes there.

- The out_dir belongs to one run: rank 0 holds a lock on out_dir/run.lock (its pid and host) while the run
  lives, and a fresh run refuses a folder that holds another run's files unless told --overwrite=True, which
  sets them aside once every input of the new run is known to be good and outside them, and deletes them at
  the new run's first checkpoint (set_aside, drop_overwritten).
- Every file is whole or absent: written aside, flushed to the disk, then renamed (write_whole); the
  checkpoints (checkpoint.py) and the export (publish_folder) are folders published the same way.
- An interrupted run loses nothing: SIGINT or SIGTERM lets the step finish and a checkpoint be written
  (signals_stop_at_next_step), and a resumed run's log.jsonl is cut back to what its checkpoint has seen.
"""
import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import time

from fsdp import barrier, is_main_process, rank0_decides

# what a run writes into its out_dir, and whether each is a folder
RUN_FILES = {'ckpt': True, 'ckpt.old': True, 'ckpt.tmp': True, 'best': True, 'best.old': True, 'best.tmp': True,
             'hf': True, 'hf.tmp': True, 'log.jsonl': False, 'summary.json': False, 'mixture.json': False,
             'log.jsonl.tmp': False, 'summary.json.tmp': False, 'mixture.json.tmp': False}
LOCK = 'run.lock'
OVERWRITTEN = 'overwritten'  # --overwrite=True: the previous run, kept whole until this run's first checkpoint
RUN_FILES[OVERWRITTEN] = RUN_FILES[OVERWRITTEN + '.tmp'] = RUN_FILES[OVERWRITTEN + '.old'] = True


@contextlib.contextmanager
def own_out_dir(out_dir, resume, overwrite):
    """Holds out_dir for this run. Rank 0 takes out_dir/run.lock with flock, which the kernel releases when the
    process ends, so a killed run leaves no stale lock; taking it is also the test that the folder can be
    written. A fresh run in a folder with another run's files is refused unless --overwrite=True; yields those
    files, for the run to set aside once its inputs are known to be good (set_aside). On the way out, the folders
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


def set_aside(out_dir, names, inputs):
    """--overwrite=True: the previous run's files and folders (names) move into out_dir/overwritten on rank 0,
    unless one of this run's inputs ({'--field': path}) lies in them: then nothing moves and the error names it.
    drop_overwritten deletes them once this run has written its first checkpoint, so a run that fails before
    (a NaN at step 1) leaves the previous one whole there. A folder overwritten/ already there holds a run that
    was set aside by a run that never reached a checkpoint: it stays, and that run's own files go."""
    for field, path in inputs.items():  # a folder's files too: a symlink among them may lead into out_dir
        files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else []
        reals = [os.path.realpath(p) for p in [path, *files]]
        for name in names:
            doomed = os.path.realpath(os.path.join(out_dir, name))
            hit = next((p for p, real in zip([path, *files], reals) if real == doomed
                        or real.startswith(doomed + os.sep)), None)
            if hit:
                where = 'lies in' if hit == path else f'holds {hit}, which is or leads into'
                raise ValueError(f"{field}={path} {where} {os.path.join(out_dir, name)}, which --overwrite=True would "
                                 f"delete: copy it out of --out_dir={out_dir} first, or use another --out_dir")
    rank0_decides(lambda: _move_aside(out_dir, names))  # every rank gets rank 0's error, if any


def _move_aside(out_dir, names):
    aside, part = os.path.join(out_dir, OVERWRITTEN), os.path.join(out_dir, OVERWRITTEN + '.tmp')
    keep_earlier = OVERWRITTEN in names
    try:
        for name in names:
            path = os.path.join(out_dir, name)
            if keep_earlier and name != OVERWRITTEN:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            elif not keep_earlier and path != part:  # into overwritten.tmp, renamed once all is there: a run stopped
                os.makedirs(part, exist_ok=True)     # midway leaves it, and the next --overwrite=True moves the rest
                os.rename(path, os.path.join(part, name))
        if not keep_earlier and os.path.isdir(part):
            os.rename(part, aside)
        sync_folder(out_dir)
    except OSError as e:
        kept = aside if keep_earlier else f"{out_dir} and {part}"
        raise OSError(f"could not set the previous run in --out_dir={out_dir} aside ({e.strerror or e}); nothing of it "
                      f"is deleted: its files are in {kept}") from None


def drop_overwritten(out_dir):
    """Deletes out_dir/overwritten (set_aside), on rank 0: this run has a checkpoint of its own. Renamed first:
    a deletion stopped midway must not leave a part of it that the next --overwrite=True keeps over this run."""
    aside, old = os.path.join(out_dir, OVERWRITTEN), os.path.join(out_dir, OVERWRITTEN + '.old')
    if is_main_process():
        if os.path.isdir(aside):
            os.rename(aside, old)
            sync_folder(out_dir)
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# files written whole

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
        sync_folder(os.path.dirname(path))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"could not write {path} ({e.strerror or e}); the file as it was before is intact") from None


def sync_folder(folder):
    """The names in folder (a rename, a new file) to the disk: fsync of the folder itself (POSIX)."""
    fd = os.open(folder or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(folder, write, extra_files=()):
    """folder, written by write(folder.tmp) on every rank (an export: each gathers tensor by tensor, rank 0
    writes), extra_files (a tokenizer's) copied beside, flushed to the disk, then renamed: an export stopped by a
    full disk leaves no folder that looks whole."""
    tmp = folder + '.tmp'
    try:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if is_main_process():
            for path in extra_files:
                shutil.copy(path, tmp)
            for name in os.listdir(tmp):  # on the disk before the rename makes the folder look whole
                with open(os.path.join(tmp, name), 'rb') as f:
                    os.fsync(f.fileno())
            sync_folder(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # an earlier export of the same run
            os.rename(tmp, folder)
            sync_folder(os.path.dirname(folder))
    except OSError as e:
        raise OSError(f"could not write the export {tmp} ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# the log

def trim_log(out_dir, start_step):
    """A resumed run's log.jsonl keeps only what its checkpoint has seen (a killed run logs more, perhaps half
    a line)."""
    path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(path):
        kept = [record for record in read_log(path) if record['step'] <= start_step]
        write_whole(path, lambda f: f.writelines(json.dumps(record) + '\n' for record in kept))


def read_log(path):
    """The records of a log.jsonl, but a line that a kill cut short, one that is not a record of a step, and one
    holding NaN or an infinity (1e999 parses as one): the run stops before it logs such a value, so it is damage."""
    records = []
    with open(path, encoding='utf-8', errors='replace') as f:  # bytes that are not UTF-8: a line to skip
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line, parse_float=finite_number, parse_constant=finite_number))
    return [r for r in records if isinstance(r, dict) and type(r.get('step')) is int]


def finite_number(text):
    if not math.isfinite(number := float(text)):
        raise ValueError(f"{text} is not a finite number")
    return number


def logged_record(out_dir, step):
    records = [r for r in read_log(os.path.join(out_dir, 'log.jsonl')) if r['step'] == step]
    if not records:
        raise ValueError(f"the checkpoint is at the final step {step}, and {out_dir}/log.jsonl has no record of it "
                         f"to write summary.json from")
    return records[-1]

def append_log(out_dir, record):
    """One record more in out_dir/log.jsonl; a failed write names the file and leaves no part of the record."""
    path = os.path.join(out_dir, 'log.jsonl')
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)  # the part of the record that was written
        raise OSError(f"could not append to {path} ({e.strerror or e}); the records before are intact") from None


def finished_summary(out_dir):
    """out_dir/summary.json of a finished run, or None where it is missing or damaged (a resume writes it again
    from the checkpoint and log.jsonl)."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(out_dir, 'summary.json')) as f:
            summary = json.load(f)
        if isinstance(summary, dict) and isinstance(summary.get('weights'), list):
            return summary
    return None


# ----------------------------------------------------------------------------------------------
# signals

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
    except BaseException:  # the run ends with an error: torchrun sends SIGTERM to every rank once one ends, and
        old_handlers[signal.SIGTERM] = signal.SIG_IGN  # its default would end this rank before train.cli's line
        raise
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
