import json
import os
import re
import subprocess
import sys

import pytest

from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smallest_configuration_reports_ratios_and_exact_state_bytes():
    shape = ['--n_layer=4', '--n_head=2', '--n_embd=16', '--block_size=16']
    proc = subprocess.run([sys.executable, '-m', 'tools.bench', *shape, '--batch_per_source=2', '--val_batch=4',
                           '--lisa_layers=1', '--lisa_interval=1', '--warmup=1', '--repeats=3', '--peak_rss=False'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ('floor_ratio', 'scalebio_over_sft', 'lisa_over_sft', 'lisa_over_scalebio', 'state_bytes',
                'lisa_state_over_sft_state', 'predicted_lisa_state_over_sft_state', 'device'):
        assert key in result
    n_params = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=4, n_head=2, n_embd=16)).num_params()
    # plain fine-tuning in float32: weight, gradient and two AdamW moments, 4 bytes each
    assert result['state_bytes']['sft'] == 16 * n_params
    assert result['state_bytes']['scalebio'] == 2 * 16 * n_params + 2 * 4 * 3  # and p's two Adam moments per source
    # after 3 LISA switches, state only for the drawn blocks: the closed form, and the same as before them
    assert result['lisa_switches_timed'] == 3
    assert abs(result['lisa_state_over_sft_state'] - result['predicted_lisa_state_over_sft_state']) < 1e-12
    before, after = result['lisa_state_bytes_before_and_after_switches']
    assert before == after
    assert result['floor_ratio'] == (2 * 3 * 2 + 4) / (3 * 2)  # the forward difference: val rows in w only


def test_bench_instruction_workload_times_padded_rows_cropped_and_not():
    shape = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=64']
    proc = subprocess.run([sys.executable, '-m', 'tools.bench', *shape, '--workload=instruction', '--batch_per_source=2',
                           '--val_batch=4', '--micro_batch=1', '--lisa_layers=1', '--warmup=1', '--repeats=2',
                           '--peak_rss=False'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['workload'] == 'instruction'
    assert result['cropped_over_uncropped'] > 0 and result['logits_at_targets_over_all'] > 0
    assert result['state_bytes']['uncropped'] == result['state_bytes']['scalebio']  # the same step, on fewer positions


@pytest.mark.parametrize('args, message', [
    (['--model=foo'], "--model must be one of gpt2,"),
    (['--repeats=0'], "--repeats must be 1 or more, got 0"),
    (['--n_sources=0'], "--n_sources must be 1 or more, got 0"),
    (['--n_head=3'], "--n_embd=16 must be a multiple of --n_head=3"),
    (['--batch_per_source=8', '--val_batch=4', '--micro_batch=3'], "--micro_batch=3 must divide the 8 rows per source"),
    (['--workload=foo'], "--workload must be random or instruction, got 'foo'"),
    (['--lisa_layers=4'], "--lisa_layers must be fewer than the 4 blocks"),
    (['--lisa_layers=0'], "--lisa_layers must be fewer than the 4 blocks, and (but for --plan) 1 or more, got 0"),
    (['--plan=True', '--world_size=0'], "--world_size must be 1 or more, got 0"),
    (['--source_loss=foo'], "--source_loss must be one of example, token, got 'foo'"),
])
def test_a_bad_bench_setting_is_refused_before_anything_runs(args, message):
    from config import override
    from tools import bench
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.check_bench_config(override(bench.BenchConfig(), ['--n_layer=4', '--n_head=2', '--n_embd=16', *args]))


def test_a_bad_bench_setting_is_one_line():
    proc = subprocess.run([sys.executable, '-m', 'tools.bench', '--repeats=0'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "error: --repeats must be 1 or more, got 0\n", proc.stderr
