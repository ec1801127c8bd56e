import json

import pytest
import torch

import steps
import train
from baselines import irdro_row_weights, rholoss_select
from steps import proportional_rows, train_batch as data_train_batch
from config import METHODS
from test_train import assert_same_state, final_state, run


def test_irdro_weights_sum_to_one_and_rise_with_the_loss():
    losses = torch.tensor([2.0, 0.5, 3.0, 1.0, 1.5])
    for temperature in (0.3, 1.0, 5.0):
        weights = irdro_row_weights(losses, temperature)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        order = losses.argsort()
        assert (weights[order].diff() > 0).all()  # a larger loss, a larger weight
    # the KL regulariser: τ → ∞ is uniform training, τ → 0 puts everything on the hardest example
    assert torch.allclose(irdro_row_weights(losses, 1e6), torch.full((5,), 0.2), atol=1e-6)
    assert irdro_row_weights(losses, 1e-3)[2].item() == pytest.approx(1.0)
    # the closed form maximises Σ w·ℓ − τ·KL(w‖uniform) over the simplex: no random point beats it
    tau = 0.7
    def objective(w):
        return (w * losses).sum() - tau * (w * torch.log(w * len(w))).sum()
    best = objective(irdro_row_weights(losses, tau))
    for _ in range(200):
        assert objective(torch.distributions.Dirichlet(torch.ones(5)).sample()) <= best + 1e-6


def test_rholoss_selects_the_largest_reducible_losses():
    current = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])
    irreducible = torch.tensor([4.9, 0.1, 1.0, 1.5, 3.0, 0.0])  # the noisiest example (0) has most loss, not most to learn
    # reducible: 0.1, 0.9, 3.0, 0.5, 0.0, 0.5
    assert rholoss_select(current, irreducible, 2).tolist() == [1, 2]
    assert rholoss_select(current, irreducible, 1).tolist() == [2]
    assert rholoss_select(current, torch.zeros(6), 2).tolist() == [0, 2]  # no reference: plain largest loss


def test_val_only_never_sees_a_training_source(tmp_path, monkeypatch):
    def no_training_batches(*args, **kwargs):
        raise AssertionError("val_only asked for a training batch")
    monkeypatch.setattr(steps, 'train_batch', no_training_batches)
    summary = run(tmp_path / 'val', '--method=fixed', '--weights=val_only', '--max_steps=6')
    assert summary['weights'] == [0.0, 0.0, 0.0]
    with pytest.raises(AssertionError, match='training batch'):  # the guard is live: uniform does need them
        run(tmp_path / 'uniform', '--method=fixed', '--max_steps=6')


def test_val_only_learns_the_validation_split(tmp_path):
    """Trained on val alone, the model's val loss falls below a uniform model's (same steps and seed)."""
    args = ['--data=denoise', '--lisa_layers=0', '--max_steps=40', '--eval_interval=40', '--dtype=float32']
    val_only = run(tmp_path / 'val', '--method=fixed', '--weights=val_only', *args)
    uniform = run(tmp_path / 'uniform', '--method=fixed', *args)
    assert val_only['val_loss'] < uniform['val_loss']


def test_irdro_reports_the_share_each_source_received_and_resumes(tmp_path):
    whole = run(tmp_path / 'whole', '--method=irdro', '--max_steps=10')
    assert sum(whole['weights']) == pytest.approx(1.0)
    # the irrelevant source (random letters) has the highest loss, so IR-DRO gives it the most weight
    assert whole['weights'][2] == max(whole['weights'])
    run(tmp_path / 'parts', '--method=irdro', '--max_steps=10', '--stop_at=5')
    resumed = run(tmp_path / 'parts', '--method=irdro', '--max_steps=10', '--resume=True')
    assert resumed['weights'] == pytest.approx(whole['weights'], abs=1e-12)
    assert_same_state(final_state(tmp_path / 'parts'), final_state(tmp_path / 'whole'))


def test_rholoss_trains_on_selected_examples_with_a_reference_model(tmp_path):
    with pytest.raises(ValueError, match='--reference'):
        run(tmp_path / 'no_ref', '--method=rholoss', '--max_steps=2')
    run(tmp_path / 'ref', '--method=fixed', '--weights=val_only', '--max_steps=10')
    summary = run(tmp_path / 'rho', '--method=rholoss', f'--reference={tmp_path / "ref"}', '--max_steps=10')
    assert sum(summary['weights']) == pytest.approx(1.0)
    assert all(0.0 <= w <= 1.0 for w in summary['weights'])


def test_every_method_the_config_accepts_has_a_step():
    assert tuple(train.METHOD_STEPS) == METHODS


def test_proportional_rows_round_by_the_largest_remainder():
    assert proportional_rows([0.9716, 0.0284, 0.0], 48) == [47, 1, 0]  # 46.64, 1.36, 0: one row left, to 0.64
    assert proportional_rows([1 / 3] * 3, 48) == [16, 16, 16]          # the stratified batch
    assert proportional_rows([0.5, 0.25, 0.25], 6) == [3, 2, 1]        # a tie goes to the earlier source
    assert proportional_rows([0.2] * 5, 12) == [3, 3, 2, 2, 2]
    for weights in ([0.7, 0.3, 0.0], [0.01, 0.01, 0.98], [0.6, 0.39, 0.01]):
        counts = proportional_rows(weights, 48)
        assert sum(counts) == 48 and all(abs(c - w * 48) < 1 for c, w in zip(counts, weights))


def write_weights(path, sources, weights):
    with open(path, 'w') as f:
        json.dump({'sources': sources, 'weights': weights}, f)
    return f'--weights={path}'


def test_proportional_batches_draw_each_source_by_its_weight_and_equal_weights_are_the_stratified_run(tmp_path, monkeypatch):
    uniform = run(tmp_path / 'stratified', '--method=fixed', '--max_steps=8', '--sampling=stratified')
    same = run(tmp_path / 'proportional', '--method=fixed', '--max_steps=8', '--sampling=proportional')
    assert same['val_loss'] == pytest.approx(uniform['val_loss'], rel=1e-12)
    assert_same_state(final_state(tmp_path / 'proportional'), final_state(tmp_path / 'stratified'), atol=1e-12)
    # half the weight on clean additions, half on the random letters: 6 rows of each a step, additions first
    batches = []
    monkeypatch.setattr(steps, 'train_batch', lambda *args: batches.append(data_train_batch(*args)) or batches[-1])
    weights = write_weights(tmp_path / 'w.json', ['clean', 'noisy', 'irrelevant'], [0.5, 0.0, 0.5])
    summary = run(tmp_path / 'halves', '--method=fixed', weights, '--max_steps=4', '--sampling=proportional')
    assert len(batches) == 4 and summary['weights'] == pytest.approx([0.5, 0.0, 0.5])
    for x, _ in batches:
        rows = [bytes(row.tolist()).decode() for row in x]
        assert len(rows) == 12 and all(any(c.isdigit() for c in r) for r in rows[:6])
        assert all(set(r) <= set('abcdefghijklmnopqrstuvwxyz\n') for r in rows[6:])


def test_a_proportional_stage_two_resumes_exactly(tmp_path):
    weights = write_weights(tmp_path / 'w.json', ['clean', 'noisy', 'irrelevant'], [0.6, 0.3, 0.1])
    args = ['--method=fixed', weights, '--sampling=proportional', '--max_steps=12']
    run(tmp_path / 'whole', *args)
    run(tmp_path / 'parts', *args, '--stop_at=6')
    run(tmp_path / 'parts', *args, '--resume=True')
    assert_same_state(final_state(tmp_path / 'parts'), final_state(tmp_path / 'whole'))


@pytest.mark.parametrize('weights', [[0.2, 0.2, 0.2], [70, 30, 0], [1.2, -0.2, 0.0], [0.5, 0.5], [0.5, None, 0.5],
                                     [True, False, False]])
def test_weights_that_are_not_on_the_simplex_are_refused(tmp_path, weights):
    spec = write_weights(tmp_path / 'w.json', ['clean', 'noisy', 'irrelevant'], weights)
    with pytest.raises(ValueError, match=r"has weights .*: one per source, each 0 or more, summing to 1"):
        run(tmp_path / 'out', '--method=fixed', spec, '--max_steps=2')


def test_a_baseline_clips_its_one_model_at_grad_clip_whatever_alpha(tmp_path):
    """α multiplies ScaleBiO's losses, not a baseline's: its model is clipped at grad_clip itself."""
    from baselines import fixed_step
    cfg = train.parse_config(['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=4',
                              '--val_batch=8', '--method=fixed', '--grad_clip=0.01',
                              f'--out_dir={tmp_path}', '--device=cpu'])
    run_ = train.build_run(cfg, train.init_distributed(cfg.device))
    norms = []
    run_.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: norms.append(torch.cat(
        [p.grad.reshape(-1) for g in opt.param_groups for p in g['params'] if p.grad is not None]).norm().item()))
    fixed_step(run_, 0, 100.0)  # the loop passes α to every method's step
    assert norms == pytest.approx([0.01], rel=1e-5)
