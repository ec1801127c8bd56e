"""What a hostile user tries: bad values, bad files, a used out_dir, a damaged checkpoint, changed data. Each
ends in one line naming the field or the file (train.cli is what `python train.py` runs), no traceback, and
nothing a run wrote is lost or mixed. Interruption and killed ranks: test_train.py and test_distributed.py."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import train
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=4', '--val_batch=8',
        '--eval_batches=1', '--eval_interval=5', '--ckpt_interval=5', '--max_steps=10', '--warmup_steps=3',
        '--dtype=float64', '--device=cpu']


def fails(capsys, out_dir, *args):
    """Runs train.cli and returns the error line, once it checked that the run failed as a user must see it:
    exit status 1, the last line 'error: ...', no traceback."""
    code = train.cli([*TINY, f'--out_dir={out_dir}', *args])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert 'Traceback' not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: '), err
    return last


def listing(folder):
    """Every file under folder with its size and modification time; None if there is no folder."""
    if not os.path.exists(folder):
        return None
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def write(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        mode = 'wb' if isinstance(content, bytes) else 'w'
        with open(os.path.join(folder, name), mode) as f:
            f.write(content)
    return str(folder)


LINES = ''.join(f"{a}+{a}={2 * a}\n" for a in range(40))
RECORDS = json.dumps([{'instruction': f'{a}+{a}', 'output': str(2 * a)} for a in range(20)])


@pytest.mark.parametrize("args, message", [
    (['--micro_batch=-4'], "--micro_batch must be 0 or positive, got -4"),
    (['--n_head=5', '--n_embd=64'], "--n_embd=64 must be a multiple of --n_head=5"),
    (['--n_head=0'], "--n_head must be positive, got 0"),
    (['--n_embd=0'], "--n_embd must be positive, got 0"),
    (['--n_layer=-1'], "--n_layer must be 0 or positive, got -1"),
    (['--alpha_growth=0', '--alpha_interval=5'], "--alpha_growth must be positive, got 0.0"),
    (['--penalty_alpha=-10'], "--penalty_alpha must be positive, got -10.0"),
    (['--lr=-1'], "--lr must be 0 or positive, got -1.0"),
    (['--lr=nan'], "--lr must be 0 or positive, got nan"),
    (['--source_logits_lr=inf'], "--source_logits_lr must be 0 or positive, got inf"),
    (['--stop_at=-5'], "--stop_at must be 0 or positive, got -5"),
    (['--lisa_layers=-3'], "--lisa_layers must be 0 or positive, got -3"),
    (['--lisa_layers=2'], "--lisa_layers=2 must be fewer than the model's 2 blocks"),
    (['--dist_timeout=0'], "--dist_timeout must be positive, got 0.0"),
    (['--penalty_alpha=1e-40', '--dtype=float32'],  # a float32 subnormal (a float64 one may parse as 0 here)
     r"--penalty_alpha=1e-40 does not fit --dtype=float32 .* flushes smaller ones to 0"),
    (['--method=irdro', '--dro_temperature=1e-40', '--dtype=float32'], r"--dro_temperature=1e-40 does not fit"),
    (['--alpha_growth=1e-300', '--alpha_interval=1'], r"--alpha_growth=1e-300 every 1 steps takes α from "
                                                      r"--penalty_alpha=10.0 out of what --dtype=float64 holds"),
    (['--alpha_growth=1e5', '--alpha_interval=1', '--dtype=float32'], r"--alpha_growth=100000.0 every 1 steps takes"),
    (['--dist_timeout=1e300'], r"--dist_timeout must be between 0.1 and 10000 \(minutes\), got 1e\+300"),
    (['--dropout=1'], r"--dropout must be in \[0, 1\), got 1.0"),
    (['--device=tpu'], "--device must be auto, cpu, cuda or cuda:<index>, got 'tpu'"),
    (['--device=cuda:x'], "--device must be auto, cpu, cuda or cuda:<index>, got 'cuda:x'"),
    pytest.param(['--device=cuda'], "--device=cuda, but this machine has no CUDA device",
                 marks=pytest.mark.skipif(train.torch.cuda.is_available(), reason="this machine has CUDA")),
    (['--weights=README.md', '--method=fixed'], "--weights=README.md is not a summary.json"),
    (['--nonsense=1'], "unknown config field 'nonsense'"),
    (['--max_steps=ten'], "--max_steps expects int, got 'ten'"),
    (['--block_size=100000'], "built-in split 'val' has"),
    (['--lisa_interval=0'], "--lisa_interval must be positive, got 0"),
    (['--lisa_layers=1', '--lisa_merge_frozen=True', '--lisa_draw=independent'],
     "--lisa_merge_frozen=True merges the blocks both copies trained"),
    (['--lisa_draw=per_copy'], "--lisa_draw must be one of shared, independent, got 'per_copy'"),
    (['--micro_batch=3'], "--micro_batch=3 must divide the 4 rows per source that each process gets"),
])
def test_a_bad_value_is_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, args, message):
    assert re.search(message, fails(capsys, tmp_path / 'out', *args))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize("files, message", [
    ({'train_a.txt': LINES, 'train_b.txt': LINES, 'train_a.json': RECORDS, 'val.txt': LINES, 'test.txt': LINES},
     r"holds train_a.json and train_a.txt: one file per source and split"),
    ({'train_a.txt': LINES, 'train_b.json': RECORDS, 'val.txt': LINES, 'test.txt': LINES},
     r"mixes text and JSON sources \(train_a.txt and train_b.json\)"),
    ({'train_a.txt': LINES, 'val.txt': LINES, 'val.json': RECORDS, 'test.txt': LINES},
     r"holds val.json and val.txt"),
    ({'train_a.json': '[{"instruction": "q", "output": null}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1: "output" must be a string, got null'),
    ({'train_a.json': '[{"text": null}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1: "text" must be a string, got null'),
    ({'train_a.json': '[{"text": ["a", "b"]}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1: "text" must be a string, got \["a", "b"\]'),
    ({'train_a.json': RECORDS[:-1] + ', {"instruction": null, "output": "x"}]', 'val.json': RECORDS,
      'test.json': RECORDS}, r'train_a.json: record 21: "instruction" must be a string, got null'),
    ({'train_a.json': '[{"output": "x"}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1: "instruction" must be a string, got nothing'),
    ({'train_a.json': '[{"instruction": "q", "input": 3, "output": "x"}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1: "input" must be a string, got 3'),
    ({'train_a.txt': LINES, 'train_b.txt': ' \n\t\n' * 20, 'val.txt': LINES, 'test.txt': LINES},
     r"train_b.txt holds only whitespace"),
    ({'train_a.json': '[{"text": "  "}, {"text": "\\n"}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r"train_a.json: every record is blank"),
    ({'train_a.json': b'[{"text": "\xff\xfe"}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r"train_a.json is not UTF-8 text"),
    ({'train_a.json': '[{"instruction": " ", "input": "", "output": ""}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r"train_a.json: every record is blank"),
    ({'train_a.json': '[{"text": "abc", "output": 5}]', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.json: record 1 has both "text" and "output": one shape per record'),
    ({'train_a.jsonl': '{"text": "abc"}\n\n{"text": 7}\n', 'val.json': RECORDS, 'test.json': RECORDS},
     r'train_a.jsonl: line 3: "text" must be a string, got 7'),
])
def test_bad_data_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, files, message):
    folder = write(tmp_path / 'data', files)
    assert re.search(message, fails(capsys, tmp_path / 'out', f'--data={folder}', '--block_size=64'))
    assert not (tmp_path / 'out').exists()


def test_a_folder_named_like_a_source_is_an_error(tmp_path, capsys):
    folder = write(tmp_path / 'data', {'train_a.json': RECORDS, 'val.json': RECORDS, 'test.json': RECORDS})
    os.mkdir(os.path.join(folder, 'train_z.json'))
    assert re.search(r"train_z.json is not a file", fails(capsys, tmp_path / 'out', f'--data={folder}'))


# ----------------------------------------------------------------------------------------------
# the out_dir belongs to one run

def test_a_second_run_in_a_used_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}']) == 0
    before = listing(out)
    message = fails(capsys, out, '--seed=1')
    assert re.search(r"holds another run \(ckpt, ckpt.old, best, log.jsonl, summary.json\): continue it with "
                     r"--resume=True, or start afresh with --overwrite=True", message)
    assert listing(out) == before
    assert train.cli([*TINY, f'--out_dir={out}', '--seed=1', '--overwrite=True']) == 0
    with open(out / 'summary.json') as f:
        assert json.load(f)['config']['seed'] == 1
    with open(out / 'log.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [5, 10]  # the second run's records alone
    assert not (out / 'run.lock').exists()


def test_two_runs_at_once_in_one_out_dir_the_second_is_refused_and_the_first_goes_on(tmp_path):
    out = tmp_path / 'out'
    first = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--max_steps=100000',
                              '--ckpt_interval=100000'], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / 'log.jsonl').exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--overwrite=True'], cwd=ROOT,
                            capture_output=True, text=True)
    assert second.returncode == 1 and 'Traceback' not in second.stderr
    assert re.fullmatch(rf"error: --out_dir={out} is in use by another run \(process {first.pid} on .*\): wait "
                        rf"for it, or use another --out_dir\n", second.stderr)
    time.sleep(2)  # the first run goes on logging, alone
    first.terminate()
    assert first.wait(timeout=120) == 128 + 15, first.stderr.read()
    with open(out / 'log.jsonl') as f:
        steps = [json.loads(line)['step'] for line in f]
    assert len(steps) >= 2 and steps == list(range(5, 5 * len(steps) + 1, 5))
    assert not (out / 'run.lock').exists()


def test_a_lock_file_nobody_holds_is_taken_and_one_held_is_respected(tmp_path, capsys):
    """The lock is an flock: a killed run's file stays, its lock does not (test_train.py kills one for real)."""
    write(tmp_path / 'left', {'run.lock': "1234 another-host 2026-01-01 00:00:00\n"})
    assert train.cli([*TINY, f'--out_dir={tmp_path}/left', '--max_steps=5']) == 0
    capsys.readouterr()
    write(tmp_path / 'held', {'run.lock': "1234 another-host 2026-01-01 00:00:00\n"})
    holder = subprocess.Popen([sys.executable, '-c', f"import fcntl, sys, time; f = open('{tmp_path}/held/run.lock'); "
                               f"fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'held\n'
    try:
        assert re.search(r"is in use by another run \(process 1234 on another-host, since 2026-01-01 00:00:00\)",
                         fails(capsys, tmp_path / 'held'))
    finally:
        holder.kill()
    assert os.listdir(tmp_path / 'held') == ['run.lock']


def test_an_out_dir_that_cannot_be_written_or_holds_the_wrong_things_is_one_line(tmp_path, capsys):
    write(tmp_path, {'a_file': 'x'})
    assert re.search(r"--out_dir=.*a_file is a file, not a folder", fails(capsys, tmp_path / 'a_file'))
    assert re.search(r"--out_dir=.*a_file/out cannot be written \(Not a directory\)",
                     fails(capsys, tmp_path / 'a_file' / 'out'))
    os.makedirs(tmp_path / 'odd' / 'log.jsonl')
    assert re.search(r"odd/log.jsonl should be a file", fails(capsys, tmp_path / 'odd', '--resume=True'))
    write(tmp_path / 'odd2', {'ckpt': 'not a folder'})
    assert re.search(r"odd2/ckpt should be a folder", fails(capsys, tmp_path / 'odd2', '--resume=True'))
    assert listing(tmp_path / 'odd2') == {str(tmp_path / 'odd2' / 'ckpt'): listing(tmp_path / 'odd2')[
        str(tmp_path / 'odd2' / 'ckpt')]}  # untouched, no lock left behind


def test_an_out_dir_that_is_an_input_folder_is_refused_and_left_as_it_is(tmp_path, capsys):
    data = write(tmp_path / 'data', {'train_a.txt': LINES, 'train_b.txt': LINES, 'val.txt': LINES})
    before = listing(data)
    line = fails(capsys, f'{tmp_path}/./data', f'--data={data}')  # spelled another way, the same folder
    assert line == f"error: --out_dir={data} is the --data folder: the run's files would lie among its files; use " \
                   f"another --out_dir"
    assert listing(data) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / 'ro')
    os.chmod(tmp_path / 'ro', 0o555)
    assert re.search(r"--out_dir=.*ro cannot be written \(Permission denied\)", fails(capsys, tmp_path / 'ro'))


def test_a_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    assert train.cli([*TINY, '--out_dir=~/run', '--max_steps=5']) == 0
    assert (tmp_path / 'run' / 'summary.json').exists()


# ----------------------------------------------------------------------------------------------
# checkpoints that prove themselves

@pytest.fixture(scope='module')
def stopped_run(tmp_path_factory):
    """A run stopped at step 10 of 20: ckpt at step 10, ckpt.old at step 5."""
    out = tmp_path_factory.mktemp('stopped') / 'out'
    assert train.cli([*TINY, f'--out_dir={out}', '--max_steps=20', '--stop_at=10']) == 0
    return out


def damage(path, how):
    if how == 'flip':
        with open(path, 'r+b') as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(64))
    elif how == 'truncate':
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == 'empty':
        open(path, 'w').close()
    elif how == 'remove':
        os.remove(path)
    elif how == 'garble':
        with open(path, 'w') as f:
            f.write('{"step": 1')
    elif how == 'no checksums':
        with open(path) as f:
            meta = json.load(f)
        with open(path, 'w') as f:
            json.dump({**meta, 'files': {}}, f)


@pytest.mark.parametrize("name, how, message", [
    ('__0_0.distcp', 'flip', r"the checkpoint is damaged: .*/ckpt/__0_0.distcp does not match its checksum"),
    ('__0_0.distcp', 'truncate', r"the checkpoint is damaged: .*/ckpt/__0_0.distcp does not match its checksum"),
    ('.metadata', 'empty', r"the checkpoint is damaged: .*/ckpt/.metadata does not match its checksum"),
    ('__0_0.distcp', 'remove', r"the checkpoint is damaged: .*/ckpt/__0_0.distcp is missing"),
    ('meta.json', 'garble', r".*/ckpt/meta.json is unreadable \(.*\)"),
    ('meta.json', 'no checksums', r".*/ckpt/meta.json is unreadable \(no checksums of its files\)"),
    ('meta.json', 'remove', r"the checkpoint .*/ckpt is incomplete: it has no meta.json"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one(stopped_run, tmp_path, capsys,
                                                                             name, how, message):
    out = tmp_path / 'out'
    shutil.copytree(stopped_run, out)
    damage(out / 'ckpt' / name, how)
    before = listing(out)
    line = fails(capsys, out, '--max_steps=20', '--resume=True')
    assert re.search(message + rf"; the previous checkpoint {out}/ckpt.old \(step 5\) is intact: move it to "
                     rf"{out}/ckpt to resume from it", line), line
    assert listing(out) == before
    # as it says: the previous checkpoint resumes
    shutil.rmtree(out / 'ckpt')
    os.rename(out / 'ckpt.old', out / 'ckpt')
    assert train.cli([*TINY, f'--out_dir={out}', '--max_steps=20', '--resume=True', '--stop_at=12']) == 0


def test_a_damaged_best_model_is_refused(stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / 'out')
    damage(tmp_path / 'out' / 'best' / '__0_0.distcp', 'flip')
    with pytest.raises(ValueError, match=r"the best model is damaged: .*best/__0_0.distcp does not match"):
        checkpoint.load_best_model(tmp_path / 'out')


@pytest.mark.parametrize("change, message", [
    (lambda d: write(d, {'train_c.txt': LINES}), r"the data file train_c.txt is new since the checkpoint"),
    (lambda d: write(d, {'train_a.txt': LINES + '1+1=2\n'}), r"the data file train_a.txt has changed since"),
    (lambda d: os.remove(os.path.join(d, 'train_b.txt')), r"the data file train_b.txt is gone since"),
])
def test_resuming_on_other_data_is_refused_naming_the_file(tmp_path, capsys, change, message):
    data = write(tmp_path / 'data', {'train_a.txt': LINES, 'train_b.txt': LINES[::-1], 'val.txt': LINES,
                                     'test.txt': LINES})
    args = [f'--data={data}', '--max_steps=20']
    assert train.cli([*TINY, f'--out_dir={tmp_path}/out', *args, '--stop_at=5']) == 0
    change(data)
    before = listing(tmp_path / 'out')
    assert re.search(message, fails(capsys, tmp_path / 'out', *args, '--resume=True'))
    assert listing(tmp_path / 'out') == before


def test_a_half_written_log_line_does_not_block_resume(stopped_run, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(stopped_run, out)
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"step": 15, "val_lo')  # a kill in the middle of a write
    assert train.cli([*TINY, f'--out_dir={out}', '--max_steps=20', '--resume=True']) == 0
    with open(out / 'log.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [5, 10, 15, 20]


def test_resuming_a_run_killed_after_its_last_checkpoint_writes_its_summary(tmp_path):
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}']) == 0
    with open(out / 'summary.json') as f:
        whole = json.load(f)
    os.remove(out / 'summary.json')  # killed between the last checkpoint and the summary
    assert train.cli([*TINY, f'--out_dir={out}', '--resume=True']) == 0
    with open(out / 'summary.json') as f:
        resumed = json.load(f)
    assert resumed['weights'] == whole['weights'] and resumed['val_loss'] == whole['val_loss']


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_checkpoint_stays(tmp_path, capsys, monkeypatch):
    save, saves = checkpoint.dcp.save, []

    def save_until_the_disk_fills(state, checkpoint_id, **kwargs):
        saves.append(checkpoint_id)
        if len(saves) > 1:  # the checkpoint of step 5 is written, then the disk is full
            os.makedirs(checkpoint_id, exist_ok=True)
            open(os.path.join(checkpoint_id, '__0_0.distcp'), 'w').close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, checkpoint_id=checkpoint_id, **kwargs)
    monkeypatch.setattr(checkpoint.dcp, 'save', save_until_the_disk_fills)
    line = fails(capsys, tmp_path / 'out', '--save_best=False', '--max_steps=20')
    assert re.search(r"could not write the checkpoint .*/out/ckpt.tmp \(No space left on device\), removed; "
                     r".*/out/ckpt, if there is one, is intact", line)
    assert not (tmp_path / 'out' / 'ckpt.tmp').exists()
    monkeypatch.setattr(checkpoint.dcp, 'save', save)
    meta = checkpoint.read_meta(str(tmp_path / 'out' / 'ckpt'))
    assert meta['step'] == 5 and checkpoint._verify(meta['folder'], meta['files']) is None


def test_a_nan_at_the_first_step_says_no_checkpoint_exists(tmp_path, capsys, monkeypatch):
    forward = GPT.forward
    monkeypatch.setattr(GPT, 'forward', lambda self, idx, targets=None: tuple(
        t * float('nan') if t is not None else t for t in forward(self, idx, targets)))
    line = fails(capsys, tmp_path / 'out')
    assert re.search(r"non-finite loss or gradient at step 0: .*; stopped without saving, no checkpoint was "
                     r"written yet", line)


def test_with_the_previous_checkpoint_damaged_too_the_error_offers_none(stopped_run, tmp_path, capsys):
    shutil.copytree(stopped_run, tmp_path / 'out')
    for folder in ('ckpt', 'ckpt.old'):
        damage(tmp_path / 'out' / folder / '__0_0.distcp', 'flip')
    line = fails(capsys, tmp_path / 'out', '--max_steps=20', '--resume=True')
    assert line.endswith("ckpt/__0_0.distcp does not match its checksum")


def test_a_checkpoint_of_another_version_or_past_the_stop_is_refused(stopped_run, tmp_path, capsys):
    out = tmp_path / 'out'
    shutil.copytree(stopped_run, out)
    assert re.search(r"the checkpoint is at step 10, past the step this run is to stop at \(5\)",
                     fails(capsys, out, '--max_steps=20', '--resume=True', '--stop_at=5'))
    with open(out / 'ckpt' / 'meta.json') as f:
        meta = json.load(f)
    older = {k: v for k, v in meta.items() if k != 'meta_sha256'}  # written before meta.json had a checksum
    with open(out / 'ckpt' / 'meta.json', 'w') as f:
        json.dump(older, f)
    assert "meta.json was not written by this version of train.py (it lacks ['meta_sha256']" in \
        fails(capsys, out, '--max_steps=20', '--resume=True')
    other_version = {**meta, 'config': {**meta['config'], 'gone_field': 1}}
    other_version['meta_sha256'] = checkpoint._meta_digest(other_version)  # whole, as another version wrote it
    with open(out / 'ckpt' / 'meta.json', 'w') as f:
        json.dump(other_version, f)
    assert re.search(r"meta.json was not written by this version of train.py \(it lacks \[\], has the unknown "
                     r"config fields \['gone_field'\]\)", fails(capsys, out, '--max_steps=20', '--resume=True'))


def test_overwrite_deletes_the_previous_run_only_once_the_inputs_are_good(stopped_run, tmp_path, capsys):
    out = tmp_path / 'out'
    shutil.copytree(stopped_run, out)
    before = listing(out)
    assert re.search(r"--data=/nonexistent is neither", fails(capsys, out, '--overwrite=True', '--data=/nonexistent'))
    assert re.search(r"--resume=True continues the run in out_dir, --overwrite=True deletes it: choose one",
                     fails(capsys, out, '--overwrite=True', '--resume=True'))
    assert listing(out) == before


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    fails(capsys, tmp_path / 'a' / 'b' / 'c', '--data=/nonexistent')
    assert os.listdir(tmp_path) == []


def test_resuming_a_finished_run_leaves_it_and_a_killed_export_is_finished(tmp_path, capsys):
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}', '--export=True']) == 0
    with open(out / 'summary.json') as f:
        finished = f.read()
    assert train.cli([*TINY, f'--out_dir={out}', '--export=True', '--resume=True']) == 0
    assert "nothing to do: the run is complete" in capsys.readouterr().out
    with open(out / 'summary.json') as f:
        assert f.read() == finished  # not overwritten with this process's (empty) measurements
    shutil.rmtree(out / 'hf')
    os.remove(out / 'mixture.json')  # killed during the export
    assert train.cli([*TINY, f'--out_dir={out}', '--export=True', '--resume=True']) == 0
    assert (out / 'mixture.json').exists() and (out / 'hf' / 'config.json').exists()


def limited_run(out_dir, limit, *args):
    """train.py under a file-size limit (EFBIG on every write past it, as a full disk would fail it)."""
    def limit_file_size():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, 'train.py', *TINY, f'--out_dir={out_dir}', '--save_best=False', *args],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_a_file_size_limit_during_a_checkpoint_is_one_line(tmp_path):
    """A real write error inside torch.distributed.checkpoint; the part written is removed."""
    line = limited_run(tmp_path / 'out', 100_000)
    assert re.fullmatch(r"error: could not write the checkpoint .*/out/ckpt.tmp \(File too large\), removed; "
                        r".*/out/ckpt, if there is one, is intact", line), line
    assert not (tmp_path / 'out' / 'ckpt.tmp').exists()


def test_a_file_size_limit_while_logging_leaves_no_part_of_a_record(tmp_path):
    line = limited_run(tmp_path / 'out', 1_000, '--eval_interval=1')
    assert re.fullmatch(r"error: could not append to .*/out/log.jsonl \(File too large\); the records before are "
                        r"intact", line), line
    text = (tmp_path / 'out' / 'log.jsonl').read_text()
    assert text.endswith('\n') and all(json.loads(record) for record in text.splitlines())
