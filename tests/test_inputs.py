"""Inputs a run must not destroy, half-written files it must not trust, values it must not ignore (issue 38's
findings, each reproduced here). Every failure is one line naming the field or the file (test_errors.fails)."""
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import fsdp
import outdir
import train
from config import MODEL_PRESETS, PATHS, TrainConfig, parse_config
from data import load_data
from tokenizer import BYTES
from hf import export_pretrained, read_tensors, weight_files
from model import GPT, GPTConfig
from test_errors import LINES, RECORDS, TINY, fails, listing, write

SHAPE = ('--n_layer', '--n_head', '--n_embd')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(capsys, *args):
    """train.cli's last line for args, once it checked the run failed as a user must see it (test_errors.fails,
    without its TINY shape)."""
    code = train.cli(list(args))
    out, err = capsys.readouterr()
    assert code == 1 and 'Traceback' not in out + err, out + err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished ScaleBiO run with its summary, its exported model and a best/ folder: a run's inputs-to-be."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    assert train.cli([*TINY, f'--out_dir={out}', '--export=True']) == 0
    return out


@pytest.mark.parametrize('args', [
    lambda out: ['--method=fixed', f'--weights={out}/summary.json'],
    lambda out: [f'--init_from={out}/hf'],
])
def test_overwrite_refuses_to_delete_the_runs_own_inputs(finished_run, tmp_path, capsys, args):
    run_args = args(finished_run)
    pretrained = any(a.startswith('--init_from') for a in run_args)
    run_args = [a for a in TINY if not (pretrained and a.startswith(SHAPE))] + run_args
    before = listing(finished_run)
    line = error_line(capsys, *run_args, f'--out_dir={finished_run}', '--overwrite=True')
    assert line.startswith(f"error: {run_args[-1].split('=')[0]}=") and 'would delete' in line
    assert listing(finished_run) == before  # nothing deleted, nothing written


def test_a_set_aside_stopped_midway_is_finished_by_the_next_overwrite(tmp_path, capsys, monkeypatch):
    """A disk error or a kill while the previous run's files move into out_dir/overwritten leaves some moved, some
    not: the next --overwrite=True must not take the moved part for a whole earlier run and delete the rest."""
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}']) == 0
    relative = lambda folder: {os.path.relpath(p, folder): v for p, v in listing(folder).items()}
    before = {p: v for p, v in relative(out).items() if p != 'run.lock'}
    rename, moved = os.rename, []

    def stopped_after_one(error):
        def stopped(source, target):
            if moved and os.path.basename(os.path.dirname(target)).startswith('overwritten'):
                raise error
            moved.append(source)
            return rename(source, target)
        return stopped
    monkeypatch.setattr(os, 'rename', stopped_after_one(OSError(errno.EIO, 'Input/output error')))
    assert fails(capsys, out, '--overwrite=True') == f"error: could not set the previous run in --out_dir={out} " \
        f"aside (Input/output error); nothing of it is deleted: its files are in {out} and {out}/overwritten.tmp"
    moved.clear()  # one more file moved, then a kill
    monkeypatch.setattr(os, 'rename', stopped_after_one(KeyboardInterrupt()))
    assert train.cli([*TINY, f'--out_dir={out}', '--overwrite=True']) == 130
    monkeypatch.setattr(os, 'rename', rename)
    capsys.readouterr()
    assert fails(capsys, out, '--overwrite=True', '--lr=1e200')  # fails before a checkpoint: the run stays aside
    assert relative(out / 'overwritten') == before


def test_a_deletion_of_the_overwritten_run_stopped_midway_leaves_nothing_the_next_overwrite_keeps(tmp_path, capsys,
                                                                                                  monkeypatch):
    """The first checkpoint of an --overwrite=True run deletes out_dir/overwritten; a kill during the deletion must
    not leave a part of it that the next --overwrite=True takes for a run to keep, deleting this one."""
    out, rmtree = tmp_path / 'out', shutil.rmtree
    assert train.cli([*TINY, f'--out_dir={out}']) == 0

    def killed(path, *args, **kwargs):
        if os.path.basename(path).startswith('overwritten'):
            os.remove(next(os.path.join(d, f) for d, _, files in os.walk(path) for f in files))  # a part is gone
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, 'rmtree', killed)
    assert train.cli([*TINY, f'--out_dir={out}', '--overwrite=True', '--max_steps=7']) == 130  # at its checkpoint 5
    monkeypatch.setattr(shutil, 'rmtree', rmtree)
    capsys.readouterr()
    assert fails(capsys, out, '--overwrite=True', '--lr=1e200')
    with open(out / 'overwritten' / 'ckpt' / 'meta.json') as f:
        assert json.load(f)['step'] == 5  # the run stopped at its checkpoint is the one kept


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_run_it_overwrote_whole(tmp_path, capsys):
    """--overwrite=True sets the previous run aside (out_dir/overwritten) until this run's first checkpoint: a
    value that fits its dtype but drives the loss to inf at step 2 leaves it whole there; the next
    --overwrite=True keeps it over the failed run's files, and its first checkpoint deletes it."""
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}']) == 0
    relative = lambda folder: {os.path.relpath(p, folder): v for p, v in listing(folder).items()}
    before = relative(out)
    line = fails(capsys, out, '--overwrite=True', '--lr=1e200')
    assert 'non-finite loss or gradient at step' in line and f"replaced is whole in {out / 'overwritten'}" in line
    assert relative(out / 'overwritten') == {p: v for p, v in before.items() if p != 'run.lock'}
    assert train.cli([*TINY, f'--out_dir={out}', '--overwrite=True', '--max_steps=6']) == 0
    assert not (out / 'overwritten').exists() and json.loads((out / 'summary.json').read_text())['steps'] == 6


def test_overwrite_refuses_an_input_that_reaches_into_the_run_by_a_link(finished_run, tmp_path, capsys):
    """A data folder whose file is a symlink into the run --overwrite=True would set aside is refused, as a folder
    inside it is."""
    write(tmp_path / 'data', {'train_a.txt': LINES, 'val.txt': LINES, 'test.txt': LINES})
    os.symlink(finished_run / 'summary.json', tmp_path / 'data' / 'train_b.txt')
    before = listing(finished_run)
    line = error_line(capsys, *TINY, f'--data={tmp_path}/data', f'--out_dir={finished_run}', '--overwrite=True')
    assert line.startswith(f"error: --data={tmp_path}/data holds {tmp_path}/data/train_b.txt, which is or leads "
                           f"into {finished_run}/summary.json") and 'would delete' in line
    assert listing(finished_run) == before


@pytest.mark.parametrize('files', [
    {'train_a.txt': LINES, 'train_val.txt': LINES, 'val.txt': LINES, 'test.txt': LINES},
    {'train_a.json': RECORDS, 'train_test.json': RECORDS, 'val.json': RECORDS, 'test.json': RECORDS},
    {'train_a.json': RECORDS, 'train_.json': RECORDS, 'val.json': RECORDS, 'test.json': RECORDS},  # no name
    {'train_a.json': RECORDS, 'train_ .json': RECORDS, 'val.json': RECORDS, 'test.json': RECORDS},  # a blank one
    {'train_a.json': RECORDS, 'train_b\nc.json': RECORDS, 'val.json': RECORDS, 'test.json': RECORDS},  # two lines
])
def test_a_source_named_like_a_held_out_split_is_refused(tmp_path, capsys, files):
    """A source named val or test would be evaluated as, or loaded in place of, the held-out split of that name;
    one named blank, or with a line break, would leave a blank column or break a line of the tables."""
    write(tmp_path / 'data', files)
    line = fails(capsys, tmp_path / 'out', f'--data={tmp_path}/data', '--block_size=16')
    assert "a source needs a printable name, and not 'val' or 'test'" in line
    assert str(tmp_path / 'data' / 'train_') in line and '\n' not in line


def test_jsonl_lines_are_split_at_newlines_only_and_a_log_with_bytes_that_are_not_utf8_resumes(tmp_path, capsys):
    """U+2028 inside a JSON string is one record (str.splitlines splits there); bytes that are not UTF-8 in
    log.jsonl are a line to skip on resume, not an error naming no file, and so is a record with a number no run
    logs (1e999 parses as infinity, which json.dumps would write back as Infinity, not JSON)."""
    record = json.dumps({'instruction': 'a\u2028b', 'output': 'c\x85d'}, ensure_ascii=False)
    write(tmp_path / 'data', {name: (record + '\n') * 20 for name in ('train_a.jsonl', 'train_b.jsonl', 'val.jsonl',
                                                                      'test.jsonl')})
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--data={tmp_path}/data', '--block_size=48', f'--out_dir={out}', '--stop_at=5']) == 0
    log = (out / 'log.jsonl').read_text()
    assert log.count('"val_loss": ') == 1
    with open(out / 'log.jsonl', 'wb') as f:
        f.write(re.sub(r'"val_loss": [^,]*', '"val_loss": 1e999', log).encode() + b'\xff\xfe garbage\n')
    assert train.cli([*TINY, f'--data={tmp_path}/data', '--block_size=48', f'--out_dir={out}', '--resume=True']) == 0
    records = [json.loads(line, parse_constant=float) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if 'val_loss' in r] == [10]  # the damaged step-5 record is gone, not kept


def test_a_reference_must_be_a_val_only_run_on_this_runs_files(tmp_path, capsys):
    """RHO-LOSS's reference: a --method=fixed --weights=val_only run that read the same data and tokenizer files,
    byte for byte (the same path with other contents is refused); its --data compared as a path, a trailing slash
    aside. The out_dir's '..' creates no folder to step out of."""
    write(tmp_path / 'data', {'train_a.txt': LINES, 'train_b.txt': LINES, 'val.txt': LINES, 'test.txt': LINES})
    data, short = f'--data={tmp_path}/data', '--max_steps=5'
    assert train.cli([*TINY, data, short, f'--out_dir={tmp_path}/nothere/../ref', '--method=fixed',
                      '--weights=val_only']) == 0
    assert not (tmp_path / 'nothere').exists()
    assert train.cli([*TINY, data, short, f'--out_dir={tmp_path}/learned']) == 0
    rholoss = [*TINY, short, '--method=rholoss']
    assert 'is not a --method=fixed --weights=val_only run' in error_line(
        capsys, *rholoss, data, f'--reference={tmp_path}/learned', f'--out_dir={tmp_path}/a')
    assert train.cli([*rholoss, data + '/', f'--reference={tmp_path}/ref', f'--out_dir={tmp_path}/b']) == 0
    (tmp_path / 'data' / 'val.txt').write_text(LINES.replace('1', '7'))
    assert 'read other data or tokenizer files than this run: val.txt differs' in error_line(
        capsys, *rholoss, data, f'--reference={tmp_path}/ref', f'--out_dir={tmp_path}/c')


def test_overwrite_refuses_to_delete_the_reference_run_it_reads(tmp_path, capsys):
    ref = tmp_path / 'ref'
    assert train.cli([*TINY, f'--out_dir={ref}', '--method=fixed', '--weights=val_only', '--max_steps=5']) == 0
    before = listing(ref)
    line = error_line(capsys, *TINY, '--method=rholoss', f'--reference={ref}', f'--out_dir={ref}', '--overwrite=True')
    assert line.startswith(f"error: --reference={ref}") and 'would delete' in line
    assert listing(ref) == before  # nothing deleted, nothing written


def test_a_value_the_dtype_cannot_hold_is_refused_before_the_previous_run_is_deleted(finished_run, capsys):
    before = listing(finished_run)
    assert fails(capsys, finished_run, '--overwrite=True', '--lr=1e300', '--dtype=float32').startswith(
        "error: --lr=1e+300 does not fit --dtype=float32 (at most 3.4e+38")
    assert listing(finished_run) == before


def test_a_cut_safetensors_file_is_refused_naming_it(tmp_path, capsys):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    weights = folder / 'model.safetensors'
    os.truncate(weights, os.path.getsize(weights) // 2)  # an export stopped by a full disk
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}']
    line = error_line(capsys, *args, f'--out_dir={tmp_path}/out')
    assert str(weights) in line and 'not a whole safetensors file' in line
    with open(weights, 'r+b') as f:  # a header that is not JSON
        f.seek(8)
        f.write(b'\xff' * 16)
    assert str(weights) in error_line(capsys, *args, f'--out_dir={tmp_path}/out')


@pytest.mark.parametrize('damage, message', [
    ('nan', 'with NaN or infinite values'),  # a model that diverged before it was saved
    ('int32', 'this one is torch.int32'),  # a float32 tensor's bytes under another label: the byte count agrees
])
def test_a_weight_that_is_not_finite_floats_is_refused_naming_its_file_and_tensor(tmp_path, capsys, damage, message):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    weights, name = folder / 'model.safetensors', 'transformer.h.1.mlp.c_fc.weight'
    if damage == 'int32':
        rewrite_header(weights, lambda header: header[name].update(dtype='I32'))
    else:
        with open(weights, 'rb') as f:
            length = int.from_bytes(f.read(8), 'little')
            begin = json.loads(f.read(length))[name]['data_offsets'][0]
        with open(weights, 'r+b') as f:
            f.seek(8 + length + begin + 4 * 5)  # its sixth float
            f.write(struct.pack('<f', math.nan))
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', f'--out_dir={tmp_path}/out']
    line = error_line(capsys, *args)
    assert f'{weights}: {name}' in line and message in line, line
    assert not (tmp_path / 'out' / 'ckpt').exists()


@pytest.mark.parametrize('damage, message', [
    ({'train_b.jsonl': '{"text": "zz", "instruction": "9+9", "output": "18"}\n'},  # the instruction would be dropped
     'train_b.jsonl: line 1 has both "text" and "instruction": one shape per record'),
    ({'val.json': '[' * 100_000 + ']' * 100_000}, 'val.json: line 1: malformed JSON (maximum recursion'),
    ({'train_b.jsonl': '{"text": "ab", "n": ' + '9' * 5000 + '}\n'}, 'train_b.jsonl: line 1: malformed JSON'),
    ({'train_b.jsonl': '{"text": "ab\\ud800cd"}\n'}, 'train_b.jsonl: line 1: "text" holds a lone surrogate'),
    ({'val.json': None}, 'val.json is not a file'),  # a folder where the file should be
    ({'train_c.TXT': 'x'}, "train_c.TXT: a source's file is train_<source>.txt, .json or .jsonl"),  # was skipped
])
def test_data_files_of_odd_shapes_are_one_line_naming_the_file(tmp_path, capsys, damage, message):
    record = json.dumps({'instruction': '1+1', 'output': '2'})
    files = {name: (record + '\n') * 20 for name in ('train_a.jsonl', 'train_b.jsonl')}
    files.update({'val.json': f'[{record}]', 'test.json': f'[{record}]'})
    files.update({k: v for k, v in damage.items() if v is not None})
    write(tmp_path / 'data', files)
    for name in [k for k, v in damage.items() if v is None]:
        os.remove(tmp_path / 'data' / name)
        os.mkdir(tmp_path / 'data' / name)
    line = fails(capsys, tmp_path / 'out', f'--data={tmp_path}/data', '--block_size=48')
    assert message in line, line


def test_a_weight_stored_twice_or_an_untied_gpt2_head_is_refused(tmp_path, capsys):
    """GPT2Model's name wte.weight beside GPT2LMHeadModel's transformer.wte.weight is one weight twice (the later
    copy would win); a GPT-2 config with an untied head would have its lm_head.weight dropped for the embedding."""
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    weights = folder / 'model.safetensors'
    with open(weights, 'rb') as f:
        length = int.from_bytes(f.read(8), 'little')
        header, data = json.loads(f.read(length)), f.read()
    extra = torch.randn(256, 16).numpy().tobytes()  # our padded table holds 256 rows at this vocabulary
    header['wte.weight'] = {'dtype': 'F32', 'shape': [256, 16], 'data_offsets': [len(data), len(data) + len(extra)]}
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, 'little') + text + data + extra)
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', f'--out_dir={tmp_path}/out']
    line = error_line(capsys, *args)
    assert f"{weights}: weight transformer.wte.weight is stored twice" in line, line
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**config, 'tie_word_embeddings': False}))
    assert 'tie_word_embeddings False: its head is its embedding' in error_line(capsys, *args)


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_a_tied_head_stored_beside_its_embedding_must_equal_it(tmp_path, family):
    """A tied model's file may hold lm_head.weight too (a .bin saved by torch does); read as a tied model, one
    that differs from the embedding would be dropped for it, so it is refused, and a copy is accepted."""
    import torch
    from hf import from_pretrained
    from model import make_model
    llama = dict(family='llama', bias=False, n_kv_head=1, mlp_hidden=32, tie_embeddings=False)
    model = make_model(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16,
                                 **(llama if family == 'llama' else {})))
    folder = tmp_path / 'model'
    export_pretrained(model, str(folder))
    state = {name: rows.read(0, rows.shape[0]) for file in weight_files(str(folder)) for name, rows in read_tensors(file)}
    embedding = 'transformer.wte.weight' if family == 'gpt2' else 'model.embed_tokens.weight'
    if family == 'llama':  # exported untied: its own head, then config.json made to say tied
        (folder / 'config.json').write_text(json.dumps({**json.loads((folder / 'config.json').read_text()),
                                                        'tie_word_embeddings': True}))
    os.remove(folder / 'model.safetensors')
    torch.save({**state, 'lm_head.weight': torch.randn_like(state[embedding])}, folder / 'pytorch_model.bin')
    with pytest.raises(ValueError, match=r"pytorch_model.bin: lm_head.weight differs from .*pytorch_model.bin: "
                                         r".* but config.json ties the head to the embedding"):
        from_pretrained(str(folder))
    torch.save({**state, 'lm_head.weight': state[embedding].clone()}, folder / 'pytorch_model.bin')
    assert torch.equal(from_pretrained(str(folder)).lm_head.weight, state[embedding])


def test_a_model_folder_with_its_own_tokenizer_is_not_read_with_raw_bytes(tmp_path, capsys):
    """An export of a BPE run holds its tokenizer.json: without --tokenizer, raw bytes would index its embedding
    rows (any vocabulary of 256 or more passes the size check) and the run would train on the wrong ids."""
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    (folder / 'tokenizer.json').write_text('{}')
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', f'--out_dir={tmp_path}/out']
    assert error_line(capsys, *args) == f"error: --init_from={folder} holds tokenizer.json: its model reads that " \
        f"tokenizer's ids, not raw bytes; add --tokenizer={folder}"
    assert not (tmp_path / 'out').exists()


def rewrite_header(file, change):
    """The safetensors file with its JSON header changed by change(header), its tensors' bytes as they were."""
    with open(file, 'rb') as f:
        length = int.from_bytes(f.read(8), 'little')
        header, data = json.loads(f.read(length)), f.read()
    change(header)
    text = json.dumps(header).encode()
    with open(file, 'wb') as f:
        f.write(len(text).to_bytes(8, 'little') + text + data)


def shift(name, by):
    return lambda header: header[name].update(data_offsets=[n + by for n in header[name]['data_offsets']])


@pytest.mark.parametrize('change, message', [
    (shift('transformer.h.0.ln_1.bias', -4), 'overlap'),  # its first float is the previous tensor's last
    (shift('transformer.wte.weight', 4), 'leave a gap'),  # the header's end and the first tensor
    (lambda header: header['transformer.h.0.ln_1.bias'].update(data_offsets=[
        float(n) for n in header['transformer.h.0.ln_1.bias']['data_offsets']]), 'do not hold'),
    (lambda header: header['transformer.h.0.ln_1.bias'].update(shape=[8.5]), 'do not hold'),
])
def test_a_safetensors_header_whose_tensors_do_not_tile_the_file_is_refused_naming_it(tmp_path, change, message):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    weights = folder / 'model.safetensors'
    rewrite_header(weights, change)
    with pytest.raises(ValueError, match=message) as error:
        dict(read_tensors(str(weights)))
    assert str(weights) in str(error.value)


@pytest.mark.parametrize('index, message', [
    ('{"metadata": {}}', 'is not an index of weight files'), ('{"weight_map": ', 'is not an index of weight files'),
    ('{"weight_map": ["a.safetensors"]}', 'is not an index of weight files'),
    ('{"weight_map": {"x": 3}}', 'names 3, which is not a file in the folder'),
    ('{"weight_map": {"x": "../run/hf/model.safetensors"}}', 'which is not a file in the folder'),  # another folder's
    ('{"weight_map": {"x": "/etc/hostname"}}', 'which is not a file in the folder'),
])
def test_an_index_that_names_no_weight_files_of_its_folder_is_refused_naming_it(tmp_path, index, message):
    (tmp_path / 'model').mkdir()
    (tmp_path / 'run' / 'hf').mkdir(parents=True)
    (tmp_path / 'run' / 'hf' / 'model.safetensors').write_bytes(b'')
    (tmp_path / 'model' / 'model.safetensors.index.json').write_text(index)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        weight_files(str(tmp_path / 'model'))
    assert str(tmp_path / 'model' / 'model.safetensors.index.json') in str(error.value)


@pytest.mark.parametrize('args, field', [
    (['--weights=uniform.json'], '--weights'), (['--sampling=stratified'], '--sampling'),
    (['--method=irdro', '--reference=somewhere'], '--reference'), (['--dro_temperature=2'], '--dro_temperature'),
    (['--lisa_layers=0', '--lisa_draw=independent'], '--lisa_draw'), (['--alpha_growth=2'], '--alpha_growth'),
    (['--model=gpt2'], '--n_head'),  # TINY's --n_head=2 against the preset's width
    (['--method=irdro', '--penalty_alpha=100'], '--penalty_alpha'), (['--method=fixed', '--lower_first=True'],
    '--lower_first'), (['--method=fixed', '--weights=val_only', '--sampling=stratified'], '--sampling'),
    (['--amp=False'], '--amp'),  # TINY's --device=cpu
    (['--method=irdro', '--lisa_layers=1', '--lisa_draw=independent'], '--lisa_draw'),  # one model: no pair to draw for
])
def test_a_value_the_run_would_ignore_is_an_error_naming_it(tmp_path, capsys, args, field):
    line = fails(capsys, tmp_path / 'out', *args)
    assert line.startswith(f'error: {field}=') and 'this run would ignore it' in line
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('model, n_layer', [('llama3-8b', 1), ('gpt2', 0)])
def test_n_layer_sets_a_presets_depth_at_its_width(model, n_layer):
    cfg = parse_config([f'--model={model}', f'--n_layer={n_layer}'])
    config = train.model_config_for(cfg, load_data('denoise', 32, 0, BYTES))
    preset = MODEL_PRESETS[model]
    assert (config.n_layer, config.n_embd, config.vocab_size) == \
        (n_layer or preset['n_layer'], preset['n_embd'], preset.get('vocab_size', 256))


def test_dropout_is_used_by_a_gpt2_from_init_from(tmp_path):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', '--dropout=0.5', '--max_steps=2']
    summary = train.main([*args, f'--out_dir={tmp_path}/out'])
    assert summary['model_config']['dropout'] == 0.5


@pytest.mark.parametrize('name', ['summary.json', 'mixture.json'])
def test_a_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys, name):
    """A full disk while summary.json (or the export's mixture.json) is written leaves no half file: the error
    names it, and a resume finishes the run."""
    out, real_dump = tmp_path / 'out', json.dump

    def full_disk(value, f, **kwargs):
        if os.path.basename(f.name).startswith(name):  # the file, or a temporary beside it
            f.write('{"sources": ["cle')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_dump(value, f, **kwargs)
    monkeypatch.setattr(json, 'dump', full_disk)
    line = error_line(capsys, *TINY, f'--out_dir={out}', '--export=True')
    assert str(out / name) in line and 'intact' in line
    assert not os.path.exists(out / name) and not os.path.exists(out / f'{name}.tmp')
    monkeypatch.setattr(json, 'dump', real_dump)
    assert train.cli([*TINY, f'--out_dir={out}', '--resume=True', '--export=True']) == 0
    with open(out / name) as f:
        assert len(json.load(f)['weights']) == 3


def test_the_weights_file_is_fingerprinted_as_it_was_parsed(tmp_path, monkeypatch):
    """--weights=FILE is read before the run's fingerprint is taken, and the fingerprint holds the bytes parsed: a
    file rewritten right after the fingerprint changes neither the weights the run uses nor what it records."""
    path = tmp_path / 'weights.json'
    path.write_text(json.dumps({'sources': ['clean', 'noisy', 'irrelevant'], 'weights': [0.5, 0.3, 0.2]}))
    parsed = hashlib.sha256(path.read_bytes()).hexdigest()
    fingerprint = train.data_fingerprint

    def then_rewritten(*args, **kwargs):
        taken = fingerprint(*args, **kwargs)
        path.write_text(json.dumps({'sources': ['clean', 'noisy', 'irrelevant'], 'weights': [0.1, 0.1, 0.8]}))
        return taken
    monkeypatch.setattr(train, 'data_fingerprint', then_rewritten)
    summary = train.main([*TINY, f'--out_dir={tmp_path}/out', '--method=fixed', f'--weights={path}', '--max_steps=5',
                          '--sampling=stratified'])  # loss weights: the summary reports them as given
    assert summary['weights'] == pytest.approx([0.5, 0.3, 0.2])
    assert checkpoint.read_meta(str(tmp_path / 'out' / 'ckpt'))['data_files']['weights.json'][1] == parsed


def test_a_damaged_summary_is_written_again_on_resume_and_a_full_disk_while_logging_names_the_log(tmp_path, capsys):
    """summary.json cut by hand (or by a disk that lied): --resume=True writes it again from the final checkpoint
    and log.jsonl, the same as before. A log line that cannot be written (/dev/full) names log.jsonl."""
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}']) == 0
    whole = (out / 'summary.json').read_text()
    os.truncate(out / 'summary.json', 40)
    assert train.cli([*TINY, f'--out_dir={out}', '--resume=True']) == 0
    assert json.loads((out / 'summary.json').read_text())['weights'] == json.loads(whole)['weights']
    os.symlink('/dev/full', tmp_path / 'log.jsonl')
    with pytest.raises(OSError, match=f"could not append to {tmp_path / 'log.jsonl'} .*the records before are intact"):
        outdir.append_log(str(tmp_path), {'step': 1})


def stop(out, *args):
    assert train.cli([*args, f'--out_dir={out}', '--max_steps=20', '--stop_at=10']) == 0
    return out / 'ckpt' / 'meta.json'


def test_an_edited_meta_json_is_refused(tmp_path, capsys):
    meta_file = stop(tmp_path / 'out', *TINY)
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, 'w') as f:
        json.dump({**meta, 'step': 11}, f)
    line = error_line(capsys, *TINY, f'--out_dir={tmp_path}/out', '--max_steps=20', '--resume=True')
    assert str(meta_file) in line and 'checksum' in line
    forged = {**meta, 'best_val_loss': 'low'}  # a wrong type under a checksum that matches it
    forged['meta_sha256'] = checkpoint._meta_digest(forged)
    with open(meta_file, 'w') as f:
        json.dump(forged, f)
    line = error_line(capsys, *TINY, f'--out_dir={tmp_path}/out', '--max_steps=20', '--resume=True')
    assert str(meta_file) in line and "['best_val_loss'] are of the wrong type" in line
    forged = {**meta, 'best_val_loss': float('nan')}  # no later loss would count as better: best/ would stay
    forged['meta_sha256'] = checkpoint._meta_digest(forged)
    with open(meta_file, 'w') as f:
        json.dump(forged, f)
    line = error_line(capsys, *TINY, f'--out_dir={tmp_path}/out', '--max_steps=20', '--resume=True')
    assert str(meta_file) in line and "a loss in it is NaN or -inf" in line


def test_a_changed_init_from_config_is_refused_on_resume(tmp_path, capsys):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}']
    stop(tmp_path / 'out', *args)
    with open(folder / 'config.json') as f:
        config = json.load(f)
    with open(folder / 'config.json', 'w') as f:
        json.dump({**config, 'n_head': 4}, f)  # the same tensors, another model
    line = error_line(capsys, *args, f'--out_dir={tmp_path}/out', '--max_steps=20', '--resume=True')
    assert line.startswith('error: --resume=True with another model: n_head 4 (checkpoint: 2)')


def test_the_fingerprint_is_of_the_bytes_parsed(tmp_path, monkeypatch, capsys):
    """train_a.txt changes while the other files load: the checkpoint records what was parsed, and a resume on
    the changed file is refused."""
    lines = ''.join(f"{a}+{a}={2 * a}\n" for a in range(40))
    folder = tmp_path / 'data'
    folder.mkdir()
    for name in ('train_a.txt', 'train_b.txt', 'val.txt', 'test.txt'):
        (folder / name).write_text(lines)
    parsed = hashlib.sha256(lines.encode()).hexdigest()
    calls = []

    def encode_then_change_a(text):  # called right after each file is read, train_a.txt first
        if not calls:
            with open(folder / 'train_a.txt', 'a') as f:
                f.write('1+1=3\n')
        calls.append(1)
        return BYTES.encode(text)
    monkeypatch.setattr(train, 'load_tokenizer', lambda spec: dataclasses.replace(BYTES, encode=encode_then_change_a))
    args = [*TINY, f'--data={folder}', f'--out_dir={tmp_path}/out']
    assert train.cli([*args, '--max_steps=20', '--stop_at=10']) == 0
    with open(tmp_path / 'out' / 'ckpt' / 'meta.json') as f:
        assert json.load(f)['data_files']['train_a.txt'][1] == parsed
    monkeypatch.undo()
    line = error_line(capsys, *args, '--max_steps=20', '--resume=True')
    assert 'the data file train_a.txt has changed' in line


LLAMA = dict(model_type='llama', hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             vocab_size=256, max_position_embeddings=16)


@pytest.mark.parametrize('content, message', [
    ('{"model_type": "gpt2", "n_layer": 2,', 'is not valid JSON'),
    ('[1, 2]', 'is not a model config'),
    ('{"model_type": "gpt2", "n_positions": 16, "vocab_size": 256, "n_layer": 2, "n_head": "two", "n_embd": 16}',
     "n_head='two': sizes must be positive integers"),
    ('{"model_type": "gpt2", "n_positions": 16, "vocab_size": 256, "n_layer": 2, "n_head": 3, "n_embd": 16}',
     "n_embd=16 is not a multiple of n_head=3"),
    ('{"model_type": "gpt2", "n_positions": 16, "vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 16, '
     '"scale_attn_weights": false}', "is not a GPT-2 config read here"),  # attention unscaled: not implemented
    ('{"model_type": "gpt2", "n_positions": 16, "vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 16, '
     '"scale_attn_by_inverse_layer_idx": true}', "scale_attn_by_inverse_layer_idx true"),
    ('{"model_type": ["llama"]}', 'model_type ["llama"] is neither GPT-2'),
    (json.dumps({**LLAMA, 'rope_scaling': {'rope_type': 'llama3', 'low_freq_factor': 1, 'high_freq_factor': 4}}),
     "llama3 rope scaling {'factor': None"),
    (json.dumps({**LLAMA, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8, 'low_freq_factor': 4,
                                           'high_freq_factor': 4}}), "high_freq_factor above low_freq_factor"),
    (json.dumps({**LLAMA, 'rope_scaling': ['llama3']}), "a field is missing or of the wrong kind"),
    (json.dumps({**LLAMA, 'rope_theta': 'big'}), "rope_theta='big': sizes must be"),
    (json.dumps({**LLAMA, 'rope_theta': 0}), "rope_theta=0: sizes must be"),  # a NaN at step 0 otherwise
    (json.dumps({**LLAMA, 'rms_norm_eps': 'x'}), "rms_norm_eps='x': sizes must be"),
    (json.dumps({**LLAMA, 'rms_norm_eps': -1}), "rms_norm_eps=-1: sizes must be"),
    (json.dumps({**LLAMA, 'model_type': 'mistral', 'sliding_window': '4096'}), "sliding_window='4096': sizes must"),
    (json.dumps({**LLAMA, 'tie_word_embeddings': 'false'}), "tie_word_embeddings='false': sizes must"),
    ('{"model_type": "gpt2", "n_positions": 1099511627776, "vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 16}',
     "n_positions=1099511627776: sizes must be positive integers up to 2**24"),
    (json.dumps({**LLAMA, 'model_type': 'gpt_neox', 'rotary_pct': 'half', 'intermediate_size': 64}),
     "rotary_pct 'half' must rotate 2 to 8 dimensions"),
    (json.dumps({**LLAMA, 'model_type': 'gpt_neox', 'rotary_emb_base': 'big', 'intermediate_size': 64}),
     "rotary_emb_base='big': sizes must be"),
    (json.dumps({**LLAMA, 'model_type': 'gpt_neox', 'layer_norm_eps': [1], 'intermediate_size': 64}),
     "layer_norm_eps=[1]: sizes must be"),
])
def test_a_malformed_config_json_is_one_line_naming_it(tmp_path, capsys, content, message):
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    (folder / 'config.json').write_text(content)
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', f'--out_dir={tmp_path}/out']
    line = error_line(capsys, *args)
    assert str(folder / 'config.json') in line and message in line


@pytest.mark.parametrize('saved', [[1, 2], {'transformer.wte.weight': 3}])
def test_a_torch_file_that_holds_no_weights_is_one_line_naming_it(tmp_path, capsys, saved):
    import torch
    folder = tmp_path / 'model'
    export_pretrained(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(folder))
    os.remove(folder / 'model.safetensors')
    torch.save(saved, folder / 'pytorch_model.bin')
    args = [a for a in TINY if not a.startswith(SHAPE)] + [f'--init_from={folder}', f'--out_dir={tmp_path}/out']
    line = error_line(capsys, *args)
    assert str(folder / 'pytorch_model.bin') in line and "is not a model's weights" in line


def test_log_lines_that_are_no_step_records_are_skipped_on_resume(tmp_path):
    """A hand-edited log.jsonl (a list, a record without a step, a step that is not a number) resumes as a cut
    line does: those lines are dropped, the run goes on."""
    out = tmp_path / 'out'
    assert train.cli([*TINY, f'--out_dir={out}', '--stop_at=5']) == 0
    with open(out / 'log.jsonl', 'a') as f:
        f.write('[1]\n{"a": 1}\n{"step": "x"}\n5\n')
    assert train.cli([*TINY, f'--out_dir={out}', '--resume=True']) == 0
    assert [json.loads(line)['step'] for line in open(out / 'log.jsonl')] == [5, 10]


def test_a_malformed_tokenizer_file_is_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip('tokenizers')
    (tmp_path / 'tok').mkdir()
    (tmp_path / 'tok' / 'tokenizer.json').write_text('{"version": "1.0", "model": ')
    line = error_line(capsys, *TINY, f'--tokenizer={tmp_path}/tok', f'--out_dir={tmp_path}/out')
    assert str(tmp_path / 'tok' / 'tokenizer.json') in line and 'cannot be read as a tokenizer' in line


def test_a_timeout_too_short_for_any_collective_is_refused(tmp_path, capsys):
    assert fails(capsys, tmp_path / 'out', '--dist_timeout=1e-9') == \
        "error: --dist_timeout must be between 0.1 and 10000 (minutes), got 1e-09"


@pytest.mark.parametrize('args, message', [(['--seed=1'], "was trained with --seed=0, this run has --seed=1"),
                                           (['--data=mixture'], "was trained on --data=denoise, this run is on mixture")])
def test_a_reference_run_of_another_seed_or_task_is_refused(finished_run, tmp_path, capsys, args, message):
    line = fails(capsys, tmp_path / 'out', '--method=rholoss', f'--reference={finished_run}', *args)
    assert line == f"error: --reference={finished_run} {message}"


def test_a_best_model_whose_meta_has_no_checksum_is_refused(finished_run, tmp_path, capsys):
    shutil.copytree(finished_run, tmp_path / 'ref')
    meta_path = tmp_path / 'ref' / 'best' / 'meta.json'
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != 'meta_sha256'}))
    line = fails(capsys, tmp_path / 'out', '--method=rholoss', f'--reference={tmp_path}/ref')
    assert line == f"error: {tmp_path}/ref/best/meta.json has no checksum of its own: another version of train.py " \
                   f"wrote it, or it was edited; train that run again"


def test_a_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    assert fails(capsys, tmp_path / 'out', '--seed=99999999999999999999999') == \
        "error: --seed must be below 2**63 (torch's generator takes 64 bits), got 99999999999999999999999"


HOSTILE = ['nan', 'inf', '-inf', '-1', '0', '1e400', '1e300', '1e-320', '99999999999999999999999', '', 'x', '0.5',
           'True']


def test_hostile_values_end_in_a_run_or_one_line_naming_the_field(tmp_path, capsys):
    """Every field, values drawn from HOSTILE (a fixed sample of field-value pairs, seed 0; HOSTILE_CASES=702 runs
    them all): each run ends with exit 0, or exit 1 and one line naming the field (a value the run can hold but the
    model cannot train with: the step whose loss was not finite, and the step sizes set), never a traceback;
    nothing outside its out_dir changes."""
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ('out_dir', 'resume', 'device')]
    cases = random.Random(0).sample([(name, value) for name in fields for value in HOSTILE], int(os.environ.get('HOSTILE_CASES', 120)))
    data = write(tmp_path / 'data', {name: LINES for name in ('train_a.txt', 'train_b.txt', 'val.txt', 'test.txt')})
    outside = listing(tmp_path), sorted(os.listdir(ROOT))  # the data folder the runs read, too
    for k, (name, value) in enumerate(cases):
        out = tmp_path / 'runs' / str(k)
        code = train.cli([*TINY, '--max_steps=2', '--stop_at=0' if name == 'stop_at' else '--stop_at=2',
                          '--eval_interval=2', f'--data={data}', f'--out_dir={out}', f'--{name}={value}'])
        stdout, err = capsys.readouterr()
        assert 'Traceback' not in stdout + err, (name, value, err)
        last = err.strip().splitlines()[-1] if err.strip() else ''
        names_it = f'--{name}' in last or (name in PATHS and value and value in last)  # the field, or its file
        assert code == 0 or (code == 1 and names_it), (name, value, err)  # a NaN loss names the step sizes set
    assert ({p: v for p, v in listing(tmp_path).items() if '/runs/' not in p}, sorted(os.listdir(ROOT))) == outside


@pytest.mark.parametrize('victim', ['config.json', 'model.safetensors', 'pytorch_model.bin', 'data', 'meta.json',
                                    'log.jsonl', 'summary.json'])
def test_files_cut_at_random_offsets_end_in_a_run_or_one_line_naming_the_file(tmp_path, capsys, victim):
    """A file the run reads, cut at 3 offsets drawn with a fixed seed: one line naming the file (a cut log.jsonl is
    trimmed on resume and the run goes on), and no file outside the run's out_dir changes."""
    model, data = tmp_path / 'model', tmp_path / 'data'
    export_pretrained(GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=16)), str(model))
    if victim == 'pytorch_model.bin':  # the same model in torch's zip format, as transformers' save_pretrained wrote it
        tensors = {name: rows.read(0, rows.shape[0]).clone() for name, rows in read_tensors(str(model / 'model.safetensors'))}
        (model / 'model.safetensors').unlink()
        torch.save(tensors, model / 'pytorch_model.bin')
    data.mkdir()
    records = [{'instruction': f'{a}+{a}', 'output': str(2 * a)} for a in range(20)]
    for name in ('train_a.json', 'train_b.json', 'val.json', 'test.json'):
        (data / name).write_text(json.dumps(records))
    args = [a for a in TINY if not a.startswith(SHAPE + ('--block_size',))] + [
        f'--init_from={model}', f'--data={data}', '--max_steps=4', '--block_size=64']
    stopped = tmp_path / 'stopped'
    assert train.cli([*args, f'--out_dir={stopped}', '--stop_at=2', '--eval_interval=1']) == 0
    path = {'config.json': model / 'config.json', 'model.safetensors': model / 'model.safetensors',
            'pytorch_model.bin': model / 'pytorch_model.bin', 'data': data / 'train_b.json',
            'meta.json': stopped / 'ckpt' / 'meta.json', 'log.jsonl': stopped / 'log.jsonl',
            'summary.json': tmp_path / 'summary.json'}[victim]
    if victim == 'summary.json':  # a learned mixture, as --weights of a stage-two run
        path.write_text(json.dumps({'sources': ['a', 'b'], 'weights': [0.75, 0.25]}))
        args += ['--method=fixed', f'--weights={path}']
    whole = path.read_bytes()
    for offset in sorted(random.Random(1).sample(range(1, len(whole)), 3)):
        path.write_bytes(whole[:offset])
        resume = victim in ('meta.json', 'log.jsonl')
        out = stopped if resume else tmp_path / f'cut{offset}'
        def outside():  # every input's files, and the weights file's bytes
            return {folder: listing(folder) for folder in (model, data, stopped) if folder != out}, \
                (tmp_path / 'summary.json').read_bytes() if victim == 'summary.json' else None
        before = outside()
        code = train.cli([*args, f'--out_dir={out}', '--resume=True' if resume else '--eval_interval=4'])
        stdout, err = capsys.readouterr()
        assert 'Traceback' not in stdout + err, (offset, err)
        if victim == 'log.jsonl':  # a cut log is trimmed on resume: the run goes on
            assert code == 0, err
        else:  # a cut JSON, safetensors or .bin file is never whole: one line naming it, never a run on a part of it
            assert code == 1 and str(path) in err.strip().splitlines()[-1], (offset, err)
            assert resume or not out.exists()  # a refused fresh run leaves no folder
        assert outside() == before  # nothing outside the out_dir changed
    path.write_bytes(whole)


def test_a_second_ctrl_c_while_a_checkpoint_is_written_is_the_interrupt_line(tmp_path, capsys, monkeypatch):
    """torch.distributed.checkpoint wraps what its writer raised, a KeyboardInterrupt too: that is the interrupt's
    line, not a write error with an empty reason."""
    from torch.distributed.checkpoint.api import CheckpointException

    def interrupted(*args, **kwargs):
        raise CheckpointException('save', {0: (KeyboardInterrupt(), None)})
    monkeypatch.setattr(checkpoint.dcp, 'save', interrupted)
    code = train.cli([*TINY, f'--out_dir={tmp_path}/out'])
    out, err = capsys.readouterr()
    assert code == 130 and 'Traceback' not in out + err and err.strip().splitlines()[-1].startswith('error: interrupted')


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """SIGINT 0.3 s after `python train.py` starts lands while torch is still being imported (1-2 s), before
    cli() and its handler: one line, exit status 1, nothing written."""
    proc = subprocess.Popen([sys.executable, 'train.py', f'--out_dir={tmp_path}/out'], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip() == "error: interrupted while starting; nothing was written", err
    assert not os.path.exists(tmp_path / 'out')


def test_a_second_interrupt_or_a_group_that_never_forms_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt  # what a second SIGINT raises, the first one's handler gone
    monkeypatch.setattr(train, 'train', interrupted)
    assert train.cli([*TINY, f'--out_dir={tmp_path}/out']) == 130
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err and err.strip().startswith('error: interrupted')

    def no_group(*args):
        raise RuntimeError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")
    monkeypatch.setenv('RANK', '0')  # as torchrun sets it
    monkeypatch.setattr(fsdp, '_init_process_group', no_group)
    assert error_line(capsys, *TINY, f'--out_dir={tmp_path}/out').startswith('error: the process group did not form')


def test_an_export_and_a_written_file_reach_the_disk_before_a_rename_publishes_them(tmp_path, monkeypatch):
    """fsync of every exported file and of hf.tmp before it becomes hf, then of the folder that holds it; of a file
    and its folder for write_whole (summary.json, meta.json): what a power cut leaves is whole or absent, never a
    whole-looking empty file."""
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), fsync(fd))[1])
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    outdir.publish_folder(str(tmp_path / 'hf'), lambda tmp: export_pretrained(model, tmp))
    files = [str(tmp_path / 'hf.tmp' / name) for name in os.listdir(tmp_path / 'hf')]
    assert sorted(synced[:-2]) == sorted(files) and synced[-2:] == [str(tmp_path / 'hf.tmp'), str(tmp_path)]
    synced.clear()
    outdir.write_whole(str(tmp_path / 'summary.json'), lambda f: json.dump({}, f))
    assert synced == [str(tmp_path / 'summary.json.tmp'), str(tmp_path)]


@pytest.mark.parametrize('world_size', ['2', 'abc'])
def test_a_stray_world_size_without_torchrun_still_ends_in_one_line(tmp_path, capsys, monkeypatch, world_size):
    """WORLD_SIZE left in the environment without RANK (no torchrun): one process, and its errors one line."""
    monkeypatch.setenv('WORLD_SIZE', world_size)
    monkeypatch.delenv('RANK', raising=False)
    assert fails(capsys, tmp_path / 'out', '--bogus=1').startswith("error: unknown config field 'bogus'")


def test_one_data_folder_spelled_two_ways_is_one_folder_on_resume_and_as_a_reference(tmp_path, monkeypatch):
    """--data=d1 from its parent and --data=/abs/d1 name one folder: a resume and a RHO-LOSS reference accept
    either spelling (the data's checksums still compare the bytes read)."""
    data = write(tmp_path / 'd1', {'train_a.txt': LINES, 'train_b.txt': LINES, 'val.txt': LINES, 'test.txt': LINES})
    monkeypatch.chdir(tmp_path)
    assert train.cli([*TINY, '--data=d1', f'--out_dir={tmp_path}/out', '--stop_at=5']) == 0
    assert train.cli([*TINY, f'--data={data}', f'--out_dir={tmp_path}/out', '--resume=True']) == 0
    assert train.cli([*TINY, '--data=d1', f'--out_dir={tmp_path}/ref', '--method=fixed', '--weights=val_only']) == 0
    assert train.cli([*TINY, f'--data={data}', f'--out_dir={tmp_path}/rho', '--method=rholoss',
                      f'--reference={tmp_path}/ref']) == 0
