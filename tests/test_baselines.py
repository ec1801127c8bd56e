import pytest
import torch

import steps
import train
from baselines import irdro_row_weights, rholoss_select
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
    assert_same_state(final_state(tmp_path / 'parts'), final_state(tmp_path / 'whole'), atol=1e-10)


def test_rholoss_trains_on_selected_examples_with_a_reference_model(tmp_path):
    with pytest.raises(ValueError, match='--reference'):
        run(tmp_path / 'no_ref', '--method=rholoss', '--max_steps=2')
    run(tmp_path / 'ref', '--method=fixed', '--weights=val_only', '--max_steps=10')
    summary = run(tmp_path / 'rho', '--method=rholoss', f'--reference={tmp_path / "ref"}', '--max_steps=10')
    assert sum(summary['weights']) == pytest.approx(1.0)
    assert all(0.0 <= w <= 1.0 for w in summary['weights'])


def test_every_method_the_config_accepts_has_a_step():
    assert tuple(train.METHOD_STEPS) == METHODS
