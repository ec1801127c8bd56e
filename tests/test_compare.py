"""compare.py's bookkeeping, with train.py runs replaced by a known landscape (real runs take minutes)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tools import compare
from steps import proportional_rows


def test_grid_covers_the_simplex():
    points = compare.grid(2, 0.1)
    assert len(points) == 11 and all(abs(p.sum() - 1) < 1e-12 for p in points)
    assert len(compare.grid(3, 0.25)) == 15


def fake_run(out_dir, *args):
    """val loss (λ_add − 0.7)² + seed noise, as if from a stage-two run; learned weights near the optimum."""
    options = dict(a.removeprefix('--').split('=', 1) for a in args)
    seed = int(options.get('seed', 0))
    if options.get('method') == 'fixed':
        if options['weights'] == 'uniform':
            weights = [1 / 3] * 3
        else:
            with open(options['weights']) as f:
                weights = json.load(f)['weights']
        loss = 1.5 + (weights[0] - 0.7) ** 2 + 1e-3 * seed
        return {'val_loss': loss, 'test_loss': loss + 0.01, 'weights': weights, 'wall_seconds': 1.0}
    learned = [0.68 + 0.01 * seed, 0.32 - 0.01 * seed, 0.0]
    if options.get('lisa_draw') == 'independent':
        learned = [0.5, 0.5, 0.0]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
        json.dump({'sources': ['add', 'sub', 'letters'], 'weights': learned}, f)
    return {'weights': learned, 'wall_seconds': 2.0}


def test_oracle_finds_the_best_grid_point_and_updates_measure_the_distance_to_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'run', fake_run)
    cfg = compare.CompareConfig(what='oracle', data='mixture', out_dir=str(tmp_path))
    result = compare.oracle(cfg)
    assert result['best']['weights'] == {'add': 0.7, 'sub': pytest.approx(0.3), 'letters': 0.0}
    assert result['worst']['weights']['add'] == 0.0
    assert result['best_minus_worst'] == pytest.approx(0.49, abs=1e-9)
    assert result['max_seed_spread'] == pytest.approx(1e-3)
    rows = compare.compare_logits_rules(compare.CompareConfig(what='updates', data='mixture', updates='adam,mirror',
                                                 seeds=3, candidate_seeds=2, out_dir=str(tmp_path)))
    assert [len(r['weights']) for r in rows] == [3, 2]  # --seeds for the default, --candidate_seeds for others
    assert rows[0]['seed_spread'] == pytest.approx(0.02)  # the default's seeds learned 0.68, 0.69, 0.70
    assert rows[1]['distance_to_oracle'] == pytest.approx(0.02)  # 0.68 and 0.69 against 0.7
    assert rows[1]['seed_spread'] == pytest.approx(0.01)
    # seed by seed against the oracle's point on the same seed
    ratios = [(1.5 + (w - 0.7) ** 2 + 1e-3 * s + 0.01) / (1.5 + 1e-3 * s + 0.01) for s, w in enumerate((0.68, 0.69))]
    assert rows[1]['test_loss_vs_oracle'] == pytest.approx(np.mean(ratios) - 1)


def test_lisa_rows_measure_each_variant_against_the_closed_form_and_lisa_off(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'run', fake_run)
    rows = compare.study(compare.CompareConfig(what='lisa', tasks='mixture,denoise', variants='off,authors',
                                               seeds=2, first_seed=1, out_dir=str(tmp_path)))
    assert [(r['seed'], r['task'], r['variant']) for r in rows][:4] == [
        (1, 'mixture', 'off'), (1, 'mixture', 'authors'), (1, 'denoise', 'off'), (1, 'denoise', 'authors')]
    assert len(rows) == 8 and {r['seed'] for r in rows} == {1, 2}
    off, independent = rows[0], rows[1]
    assert off['to_reference'] == 0 and off['to_closed_form'] == pytest.approx(0.01)  # learned 0.69 / 0.31 / 0
    assert independent['to_reference'] == pytest.approx(0.19) and independent['to_closed_form'] == pytest.approx(0.2)
    assert rows[2]['to_closed_form'] is None  # denoise has no closed form
    # stage two of each variant's weights: the landscape's loss at add 0.5, seed 1
    assert independent['stage_two_test_loss'] == pytest.approx(1.5 + 0.2 ** 2 + 1e-3 + 0.01)
    # and uniform weights' stage two on the same seed, beside it
    assert independent['uniform_stage_two_test_loss'] == pytest.approx(1.5 + (1 / 3 - 0.7) ** 2 + 1e-3 + 0.01)


def test_ablations_change_one_factor_and_run_every_stage_two_with_the_default_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, 'run', lambda out_dir, *args: calls.append(args) or fake_run(out_dir, *args))
    rows = compare.study(compare.CompareConfig(what='ablations', seeds=1, out_dir=str(tmp_path)))
    assert [(r['task'], r['variant']) for r in rows][:7] == [('mixture', name) for name in compare.ABLATION_VARIANTS]
    assert len(rows) == 14 and all(r['to_reference'] == 0 for r in rows)  # fake_run learns alike for every factor
    compare.study(compare.CompareConfig(what='ablations', seeds=1, tasks='dilution', out_dir=str(tmp_path)))
    for tasks in ('mixture-dilution', 'dilution'):  # processes that split the tasks keep their own results
        with open(tmp_path / 'ablations' / f'ablations_{tasks}_seeds0-0.json') as f:
            assert {r['task'] for r in json.load(f)['rows']} == set(tasks.split('-'))
    learning = [args for args in calls if '--method=fixed' not in args]
    assert ('--data=mixture', '--seed=0', '--grad_clip=0') in learning
    assert all(not any(a.startswith(('--grad_clip', '--weight_decay', '--penalty_alpha', '--central')) for a in args)
               for args in calls if '--method=fixed' in args)  # stage two: only the weights differ


@pytest.mark.parametrize("args, message", [
    (['--what=grid'], "error: --what must be baselines, oracle, updates, lisa, ablations, defaults, got 'grid'"),
    (["--what=lisa", "--variants=off,both"], "error: --variants: unknown both; known: off, default, authors, merged"),
    (['--what=ablations', '--variants=default,alpha 7'], "error: --variants: unknown alpha 7; known: default, alpha 3,"),
    (['--what=oracle', '--data=denoise'], "error: --data=denoise: the oracle's grid is defined for mixture, dilution"),
    (['--what=updates', '--data=mixture'], "error: no oracle at "),
    (['--seeds=two'], "error: --seeds expects int, got 'two'"),
    (['--train_args=--lr=1e-3 --out_dir=elsewhere'], "error: --train_args: --out_dir is set by compare.py for each run"),
])
def test_bad_input_is_one_clear_error_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, '-m', 'tools.compare', *args, f'--out_dir={tmp_path}'], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message)


@pytest.mark.parametrize("args, message", [
    (['--seeds=0'], "--seeds must be 1 or more, got 0"),
    (['--what=lisa', '--first_seed=-1'], "--first_seed must be 0 or more, got -1"),
    (['--what=oracle', '--grid_step=0.3'], "--grid_step must be 1/k for a whole k from 1 to 100"),
    (['--what=oracle', '--grid_step=0'], "--grid_step must be 1/k for a whole k from 1 to 100"),
    (['--what=lisa', '--train_args=--seed=3'], "--train_args: --seed is set by compare.py for each run"),
])
def test_settings_that_would_run_nothing_or_the_wrong_runs_are_refused_first(tmp_path, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compare.main([*args, f'--out_dir={tmp_path}'])
    compare.TRAIN_ARGS[:] = []
    assert not any(tmp_path.iterdir())


def test_baselines_run_every_method_per_task_and_seed_and_stage_two_both_ways(tmp_path):
    compare.TRAIN_ARGS[:] = ['--max_steps=4', '--n_layer=1', '--n_embd=16', '--n_head=2', '--eval_batches=1',
                             '--batch_per_source=4', '--val_batch=8', '--block_size=16', '--dtype=float64']
    try:
        rows = compare.baselines(compare.CompareConfig(what='baselines', tasks='mixture', seeds=2, out_dir=str(tmp_path)))
    finally:
        compare.TRAIN_ARGS[:] = []
    methods = ['uniform', 'scalebio, loss-weighted', 'scalebio, sampled', 'val_only', 'irdro', 'rholoss',
               'best weights, sampled']
    assert [(r['seed'], r['method']) for r in rows] == [(s, m) for s in (0, 1) for m in methods]
    for r in rows:
        if r['method'] == 'scalebio, loss-weighted':
            assert list(r['weights'].values()) == pytest.approx(r['learned_weights'])
        if r['method'] == 'scalebio, sampled':  # each source's share of the 12 rows: the learned weights, rounded
            counts = proportional_rows(r['learned_weights'], 12)
            assert list(r['weights'].values()) == pytest.approx([c / 12 for c in counts])
    assert [r['weights'] for r in rows if r['method'] == 'best weights, sampled'][0] == pytest.approx(
        {'add': 8 / 12, 'sub': 4 / 12, 'letters': 0})  # 0.7·12 = 8.4, 0.3·12 = 3.6: the remainder to sub
    with open(tmp_path / 'baselines' / 'results.json') as f:
        assert json.load(f) == rows


def test_baselines_table_covers_the_default_tasks(tmp_path, monkeypatch, capsys):
    def every_run(out_dir, *args):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
            json.dump({'sources': ['a', 'b'], 'weights': [0.5, 0.5]}, f)
        return {'test_loss': 1.0, 'sources': ['a', 'b'], 'weights': [0.5, 0.5], 'wall_seconds': 1.0}
    monkeypatch.setattr(compare, 'run', every_run)
    rows = compare.baselines(compare.CompareConfig(what='baselines', seeds=1, out_dir=str(tmp_path)))  # no --tasks
    tasks = compare.BASELINE_TASKS.split(',')
    assert [r['task'] for r in rows[::7]] == tasks
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ') and ' | uniform | ' in line]
    assert [line.split(' | ')[0][2:] for line in table] == tasks
    assert os.path.isfile(tmp_path / 'baselines' / 'results.json')
