"""Instruction data in the ScaleBiO authors' layout: train_<source>.json, val.json, test.json."""
import json
import random
import re
import subprocess
import sys

import pytest
import numpy as np
import torch

import train
from config import TrainConfig
from steps import Run, model_objective
from data import PROMPT, load_data
from tokenizer import BYTES
from steps import train_batch
from model import GPT, GPTConfig

ROOT = __file__.rsplit('/tests/', 1)[0]


def additions(n, correct, rng):
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({'instruction': f'{a}+{b}', 'output': str(a + b if correct else rng.randrange(199))})
    return rows


def write(folder, files):
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return str(folder)


def test_prompt_tokens_carry_no_loss_and_rows_are_whole_examples(tmp_path):
    record = {'instruction': 'add', 'input': '2+3', 'output': '5'}
    folder = write(tmp_path / 'd', {'train_a.json': [record], 'val.json': [record], 'test.jsonl': json.dumps(record)})
    data = load_data(folder, block_size=64, seed=0)
    x, y = train_batch(data, 0, 2, 64, seed=0)
    prompt = PROMPT.format(instruction='add', input_section='### Input:\n2+3\n\n')
    n_prompt = len(BYTES.encode(prompt))
    assert bytes(x[0, :n_prompt].tolist()).decode() == prompt
    assert (y[0, :n_prompt - 1] == -1).all()  # predicting prompt tokens: no loss
    assert bytes(y[0, n_prompt - 1:n_prompt + 1].tolist()).decode() == '5\n'  # the response, then the end
    assert (y[0, n_prompt + 1:] == -1).all()  # padding


def test_per_source_losses_are_means_of_per_example_means_or_of_tokens(tmp_path):
    short, long = {'instruction': 'q', 'output': 'ab'}, {'instruction': 'q', 'output': 'abcdefghijklmnop'}
    folder = write(tmp_path / 'd', {'train_a.json': [short, long], 'val.json': [short], 'test.json': [short]})
    data = load_data(folder, block_size=48, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    x = torch.tensor(data.train[0][:, 0])
    y = torch.tensor(data.train[0][:, 1])
    run = Run(TrainConfig(grad_clip=0.0, source_loss='example'), [model])
    source_loss, _, _ = model_objective(run, model, x, y, None, None, 1, 0.0)(torch.ones(1), 0.0)
    per_example = [torch.nn.functional.cross_entropy(model(x[i:i + 1])[0][0], y[i], ignore_index=-1) for i in range(2)]
    assert torch.allclose(source_loss, torch.stack(per_example).mean().detach(), atol=1e-6)
    # --source_loss=token: every token of the source counts alike, as in L_val
    run = Run(TrainConfig(grad_clip=0.0, source_loss='token'), [model])
    token_loss, _, _ = model_objective(run, model, x, y, None, None, 1, 0.0)(torch.ones(1), 0.0)
    every_token = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1)
    assert torch.allclose(token_loss, every_token.detach(), atol=1e-6)
    assert not torch.allclose(token_loss, source_loss, atol=1e-3)  # the long answer weighs more


def test_a_run_on_instruction_sources_learns_weights(tmp_path):
    rng = random.Random(0)
    junk = [{'instruction': 'say something', 'output': ''.join(rng.choice('xyzw') for _ in range(8))}
            for _ in range(300)]
    folder = write(tmp_path / 'd', {'train_correct.json': additions(300, True, rng),
                                    'train_wrong.json': additions(300, False, rng), 'train_junk.json': junk,
                                    'val.json': additions(100, True, rng), 'test.json': additions(100, True, rng)})
    summary = train.main([f'--data={folder}', f'--out_dir={tmp_path}/out', '--block_size=48', '--n_layer=2',
                          '--max_steps=150', '--eval_interval=150', '--batch_per_source=8', '--val_batch=16'])
    weights = dict(zip(summary['sources'], summary['weights']))
    assert weights['junk'] == min(weights.values()) and weights['junk'] < 0.2


@pytest.mark.parametrize("files, message", [
    ({'train_a.json': '[{"output": "x"},\n {"output": }]', 'val.json': '[]', 'test.json': '[]'},
     r"train_a.json: line 2: malformed JSON"),
    ({'train_a.jsonl': '{"output": "x"}\n{"output": "y"\n', 'val.json': '[]', 'test.json': '[]'},
     r"train_a.jsonl: line 2: malformed JSON"),
    ({'train_a.json': '[{"instruction": "x"}]', 'val.json': '[]', 'test.json': '[]'},
     r'train_a.json: record 1: "output" must be a string, got nothing'),
    ({'train_a.json': '[]', 'val.json': '[{"text": "abc"}]', 'test.json': '[{"text": "abc"}]'},
     r"train_a.json holds no examples"),
    ({'train_a.json': '[{"text": "abcdef"}]', 'test.json': '[{"text": "abc"}]'}, r"missing file .*val.json"),
])
def test_bad_instruction_data_is_one_clear_error_and_writes_nothing(tmp_path, files, message):
    folder = write(tmp_path / 'd', files)
    out_dir = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'train.py', f'--data={folder}', f'--out_dir={out_dir}'], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and re.search(message, proc.stderr)
    assert not out_dir.exists()


def test_token_weighted_source_losses_weigh_every_token_alike_across_sources(tmp_path):
    """Two sources, short and long answers: with uniform weights ℓ_token gives the batch's token mean; ℓ_example
    gives the mean of row means, where a long answer's tokens weigh less."""
    short, long = {'instruction': 'q', 'output': 'ab'}, {'instruction': 'q', 'output': 'abcdefghijklmnop'}
    folder = write(tmp_path / 'd', {'train_a.json': [short], 'train_b.json': [long], 'val.json': [short],
                                    'test.json': [short]})
    data = load_data(folder, block_size=48, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=256, n_layer=1, n_head=2, n_embd=16))
    x, y = (torch.tensor(np.concatenate([data.train[0][:, k], data.train[1][:, k]])) for k in (0, 1))
    uniform = torch.full((2,), 0.5)
    losses = {}
    for source_loss in ('example', 'token'):
        run = Run(TrainConfig(grad_clip=0.0, source_loss=source_loss), [model])
        losses[source_loss], _, _ = model_objective(run, model, x, y, None, None, 2, 0.0)(uniform, 0.0)
    every_token = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1)
    assert torch.allclose((uniform * losses['token']).sum(), every_token.detach(), atol=1e-6)
    assert torch.allclose((uniform * losses['example']).sum(), losses['example'].mean(), atol=1e-6)
    assert not torch.allclose((uniform * losses['example']).sum(), every_token.detach(), atol=1e-3)


def test_rows_cropped_to_the_longest_answer_learn_what_full_rows_learn_on_one_and_two_processes(tmp_path):
    """Each forward's rows are cut after their last target (--crop_padding): the same run in float64 with and without
    it, and under torchrun with 2 processes, each rank cropping its own rows to its own longest."""
    rng = random.Random(0)
    folder = write(tmp_path / 'd', {'train_correct.json': additions(40, True, rng),
                                    'train_wrong.json': additions(40, False, rng),
                                    'val.json': additions(20, True, rng), 'test.json': additions(20, True, rng)})
    args = [f'--data={folder}', '--block_size=64', '--n_layer=2', '--n_head=2', '--n_embd=16', '--max_steps=12',
            '--eval_interval=6', '--eval_batches=1', '--batch_per_source=4', '--val_batch=8', '--micro_batch=1',
            '--lisa_layers=1', '--lisa_interval=3', '--warmup_steps=2', '--source_logits_lr=1.0', '--dtype=float64',
            '--device=cpu']
    runs = {crop: train.main(args + [f'--crop_padding={crop}', f'--out_dir={tmp_path}/{crop}']) for crop in (True, False)}
    assert abs(runs[True]['weights'][0] - 0.5) > 1e-3  # the weights moved
    for key in ('weights', 'per_source_loss'):
        a, b = runs[True][key], runs[False][key]
        assert np.allclose(list(a.values()) if isinstance(a, dict) else a,
                           list(b.values()) if isinstance(b, dict) else b, atol=1e-10, rtol=0), key
    assert abs(runs[True]['val_loss'] - runs[False]['val_loss']) < 1e-10
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'train.py', *args, f'--out_dir={tmp_path}/two'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'two' / 'summary.json') as f:
        two = json.load(f)
    assert np.allclose(two['weights'], runs[True]['weights'], atol=1e-10, rtol=0)
