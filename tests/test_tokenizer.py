"""A GPT-2-style BPE from a local folder (the optional tokenizers package), in both of its file formats."""
import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest

import train
from data import load_data
from test_errors import fails, listing
from tokenizer import load_tokenizer

tokenizers = pytest.importorskip('tokenizers')
ROOT = __file__.rsplit('/tests/', 1)[0]
TEXT = ['the cat sat on the mat', 'a dog sat on a log', 'two plus two is four'] * 50


@pytest.fixture
def bpe_folders(tmp_path):
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, special_tokens=['<|endoftext|>'])
    (tmp_path / 'json').mkdir()
    bpe.save(str(tmp_path / 'json' / 'tokenizer.json'))
    (tmp_path / 'gpt2').mkdir()
    bpe.save_model(str(tmp_path / 'gpt2'))  # vocab.json + merges.txt, GPT-2's own format
    return tmp_path / 'json', tmp_path / 'gpt2'


def test_both_formats_encode_alike_and_round_trip(bpe_folders):
    a, b = (load_tokenizer(str(folder)) for folder in bpe_folders)
    ids = a.encode('the dog sat on two mats')
    assert np.array_equal(ids, b.encode('the dog sat on two mats'))
    assert len(ids) < len('the dog sat on two mats')  # merges were applied
    assert a.decode(ids) == 'the dog sat on two mats' and a.vocab_size == b.vocab_size <= 300


def test_a_run_with_a_bpe_tokenizer(bpe_folders, tmp_path):
    folder = tmp_path / 'd'
    folder.mkdir()
    for name in ('train_animals.txt', 'train_numbers.txt', 'val.txt', 'test.txt'):
        (folder / name).write_text(' '.join(TEXT))
    data = load_data(str(folder), block_size=16, seed=0, tokenizer=load_tokenizer(str(bpe_folders[0])))
    assert data.vocab_size == load_tokenizer(str(bpe_folders[0])).vocab_size
    summary = train.main([f'--data={folder}', f'--tokenizer={bpe_folders[0]}', f'--out_dir={tmp_path}/out',
                          '--block_size=16', '--n_layer=1', '--max_steps=3', '--eval_interval=3'])
    assert summary['sources'] == ['animals', 'numbers']


def test_a_tokenizer_folder_without_its_files_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, 'train.py', f'--tokenizer={tmp_path}', f'--out_dir={tmp_path}/out'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert 'put tokenizer.json, or GPT-2' in proc.stderr and not (tmp_path / 'out').exists()


def test_instruction_responses_end_with_the_end_of_text_token(bpe_folders, tmp_path):
    folder = tmp_path / 'd'
    folder.mkdir()
    record = '[{"instruction": "what sat on the mat", "output": "the cat"}]'
    for name in ('train_a.json', 'val.json', 'test.json'):
        (folder / name).write_text(record)
    tokenizer = load_tokenizer(str(bpe_folders[0]))
    rows = load_data(str(folder), block_size=64, seed=0, tokenizer=tokenizer).train[0]
    targets = rows[0, 1][rows[0, 1] != -1]
    assert targets[-1] == tokenizer.end_of_text
    assert tokenizer.decode(targets[:-1].tolist()).strip() == 'the cat'


@pytest.fixture
def llama3_style_folder(tmp_path):
    """A byte-level BPE whose template adds <|begin_of_text|>, with its eos_token in tokenizer_config.json, as
    Llama 3's files have them (built here, offline)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>']
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id('<|begin_of_text|>')
    bpe.post_processor = processors.TemplateProcessing(single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', bos)])
    folder = tmp_path / 'llama3'
    folder.mkdir()
    bpe.save(str(folder / 'tokenizer.json'))
    (folder / 'tokenizer_config.json').write_text('{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}')
    return folder


def test_a_llama3_style_tokenizer_puts_bos_once_at_the_start_and_eos_at_the_end(llama3_style_folder, tmp_path):
    tokenizer = load_tokenizer(str(llama3_style_folder))
    bos, eos = tokenizer.begin_of_text, tokenizer.end_of_text
    assert (bos, eos) == (0, 2)  # the template's BOS; tokenizer_config.json's eos_token, not <|end_of_text|>
    folder = tmp_path / 'd'
    folder.mkdir()
    records = '[{"instruction": "what sat on the mat", "output": "the cat"}, {"text": "a dog sat on a log"}]'
    for name in ('train_a.json', 'val.json', 'test.json'):
        (folder / name).write_text(records)
    rows = load_data(str(folder), block_size=64, seed=0, tokenizer=tokenizer).train[0]
    for x, y in rows:
        length = np.flatnonzero(y != -1)[-1] + 1  # the example; zeros pad it, never targets
        assert x[0] == bos and bos not in x[1:length] and bos not in y  # once, at the start, never a target
    instruction_x, instruction_y = rows[0]
    targets = instruction_y[instruction_y != -1]
    assert targets[-1] == eos and eos not in targets[:-1]
    assert tokenizer.decode(targets[:-1].tolist()) == 'the cat'  # loss on the response tokens only
    n_prompt = len(tokenizer.encode('### Instruction:\nwhat sat on the mat\n\n### Response:\n'))
    assert (instruction_y[:n_prompt] == -1).all() and instruction_y[n_prompt] != -1
    eos_free = llama3_style_folder / 'tokenizer_config.json'
    eos_free.write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(ValueError, match="eos_token '<|im_end|>' is not in the tokenizer's vocabulary"):
        load_tokenizer(str(llama3_style_folder))


def test_a_tokenizer_is_fingerprinted_as_it_was_parsed(bpe_folders, monkeypatch):
    """The checkpoint records the digests of the tokenizer files taken as they were parsed (with the data's): a
    file rewritten meanwhile is an error, not a fingerprint of bytes the run never read."""
    path = str(bpe_folders[0] / 'tokenizer.json')
    from_file = tokenizers.Tokenizer.from_file

    def rewritten_while_parsed(file):
        bpe = from_file(file)
        with open(file, 'a') as f:
            f.write(' ')
        return bpe
    monkeypatch.setattr(tokenizers.Tokenizer, 'from_file', rewritten_while_parsed)
    with pytest.raises(ValueError, match="changed while they were read"):
        load_tokenizer(str(bpe_folders[0]))
    monkeypatch.undo()
    with open(path, 'rb') as f:
        raw = f.read()
    data = load_data('denoise', 16, 0, load_tokenizer(str(bpe_folders[0])))
    assert data.digests[path] == [len(raw), hashlib.sha256(raw).hexdigest()]


@pytest.mark.parametrize('name', ['tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt'])
def test_a_tokenizer_file_cut_at_random_offsets_is_one_line_naming_it(bpe_folders, tmp_path, capsys, name):
    folder = bpe_folders[name in ('vocab.json', 'merges.txt')]  # GPT-2's two files, or tokenizer.json
    (folder / 'tokenizer_config.json').write_text('{"eos_token": "<|endoftext|>"}')
    path = folder / name
    whole = path.read_bytes()
    for offset in sorted(random.Random(1).sample(range(1, len(whole)), 3)):
        path.write_bytes(whole[:offset])
        before = listing(folder)
        assert str(path) in fails(capsys, tmp_path / f'out{offset}', f'--tokenizer={folder}'), offset
        assert listing(folder) == before and not (tmp_path / f'out{offset}').exists()  # nothing changed, no folder


@pytest.mark.parametrize('eos', ['5', '["<|endoftext|>"]', '{"content": 7}'])
def test_an_eos_token_that_is_not_a_string_is_one_line_naming_the_file(bpe_folders, tmp_path, capsys, eos):
    (bpe_folders[0] / 'tokenizer_config.json').write_text(f'{{"eos_token": {eos}}}')
    line = fails(capsys, tmp_path / 'out', f'--tokenizer={bpe_folders[0]}')
    assert str(bpe_folders[0] / 'tokenizer_config.json') in line and 'is not a token' in line


def test_a_vocabulary_with_a_gap_sizes_the_model_by_its_largest_id(bpe_folders, tmp_path):
    """One id moved past the others (get_vocab_size still counts tokens, not ids): the embedding must hold it, or
    the first row that uses it ends in an index error inside torch."""
    import json
    path = bpe_folders[0] / 'tokenizer.json'
    spec = json.loads(path.read_text())
    first = int(load_tokenizer(str(bpe_folders[0])).encode('the cat')[0])
    token = next(t for t, i in spec['model']['vocab'].items() if i == first)
    spec['model']['vocab'][token] = 5000  # a token of every line of TEXT
    path.write_text(json.dumps(spec))
    tokenizer = load_tokenizer(str(bpe_folders[0]))
    assert 5000 in tokenizer.encode('the cat') and tokenizer.vocab_size == 5001
    (tmp_path / 'data').mkdir()
    for name in ('train_a.txt', 'train_b.txt', 'val.txt', 'test.txt'):
        (tmp_path / 'data' / name).write_text('\n'.join(TEXT))
    assert train.cli(['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=2',
                      '--val_batch=4', '--eval_batches=1', '--max_steps=2', '--device=cpu', f'--data={tmp_path}/data',
                      f'--tokenizer={bpe_folders[0]}', f'--out_dir={tmp_path}/out']) == 0


def test_characters_a_tokenizer_cannot_give_back_are_named_in_a_warning(bpe_folders, tmp_path, capsys):
    """A BPE without byte-level pieces gives [UNK] for a character it never saw: the run warns, naming it; a
    byte-level BPE gives back every character, and the run says nothing."""
    from tokenizers import models, pre_tokenizers, trainers
    bpe = tokenizers.Tokenizer(models.BPE(unk_token='[UNK]'))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=100, special_tokens=['[UNK]']))
    (tmp_path / 'tok').mkdir()
    bpe.save(str(tmp_path / 'tok' / 'tokenizer.json'))
    folder = tmp_path / 'd'
    folder.mkdir()
    for name in ('train_a.txt', 'train_b.txt', 'val.txt', 'test.txt'):
        (folder / name).write_text(' '.join(TEXT) + (' the café sat' if name == 'train_b.txt' else ''))
    args = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=2', '--val_batch=4',
            '--eval_batches=1', '--max_steps=2', '--device=cpu', f'--data={folder}']
    assert train.cli(args + [f'--tokenizer={tmp_path}/tok', f'--out_dir={tmp_path}/out']) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning')]
    assert warnings == [f"warning: --tokenizer={tmp_path}/tok does not give back 1 character(s) of the data ('é'): "
                        f"the model sees its unknown token, or nothing, in their place"]
    assert train.cli(args + [f'--tokenizer={bpe_folders[0]}', f'--out_dir={tmp_path}/byte_level']) == 0
    assert 'warning' not in capsys.readouterr().out


def test_a_word_level_vocabulary_without_its_unknown_token_is_one_line(tmp_path, capsys):
    model = tokenizers.models.WordLevel({'a': 0, 'b': 1}, unk_token='[UNK]')  # [UNK] is not in the vocabulary
    word_level = tokenizers.Tokenizer(model)
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (tmp_path / 'tok').mkdir()
    word_level.save(str(tmp_path / 'tok' / 'tokenizer.json'))
    line = fails(capsys, tmp_path / 'out', f'--tokenizer={tmp_path}/tok')
    assert line.startswith(f"error: --tokenizer={tmp_path}/tok cannot encode") and 'Missing [UNK]' in line, line


def test_a_tokenizer_edited_during_the_run_is_neither_exported_nor_sampled_with(bpe_folders, tmp_path, capsys,
                                                                                monkeypatch):
    """The export copies the tokenizer's files beside the model, and tools.sample decodes with them: files that
    changed since the run read them would pair the model with ids it never learned."""
    from tools import sample
    folder, tokenizer_json = tmp_path / 'd', bpe_folders[0] / 'tokenizer.json'
    folder.mkdir()
    for name in ('train_a.txt', 'train_b.txt', 'val.txt', 'test.txt'):
        (folder / name).write_text('\n'.join(TEXT))
    export = train.export

    def edit_then_export(run, weights):
        tokenizer_json.write_text(tokenizer_json.read_text() + ' ')  # other bytes, the same tokenizer
        return export(run, weights)
    monkeypatch.setattr(train, 'export', edit_then_export)
    out = tmp_path / 'out'
    line = fails(capsys, out, f'--data={folder}', f'--tokenizer={bpe_folders[0]}', '--export=True')
    assert line == f"error: --tokenizer={bpe_folders[0]}: its files changed during the run; restore them to export"
    assert not (out / 'hf').exists()
    with pytest.raises(ValueError, match=f"{tokenizer_json} changed since the model was trained with the tokenizer's"):
        sample.main([f'--out_dir={out}', '--max_new_tokens=2'])
    tokenizer_json.write_text(tokenizer_json.read_text()[:-1])  # as trained: sampling works
    sample.main([f'--out_dir={out}', '--max_new_tokens=2'])
    # a file the run did not read, which names another end of text: the ids would decode otherwise
    other_end = tokenizers.Tokenizer.from_file(str(tokenizer_json)).id_to_token(100)
    (bpe_folders[0] / 'tokenizer_config.json').write_text(json.dumps({'eos_token': other_end}))
    with pytest.raises(ValueError, match=f"{bpe_folders[0] / 'tokenizer_config.json'} appeared since the model was"):
        sample.main([f'--out_dir={out}', '--max_new_tokens=2'])
