"""A GPT-2-style BPE from a local folder (the optional tokenizers package), in both of its file formats."""
import subprocess
import sys

import numpy as np
import pytest

import train
from data import load_data, load_tokenizer

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
