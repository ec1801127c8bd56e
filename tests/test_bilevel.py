import copy
import sys

import numpy as np
import pytest
import torch

from bilevel import cosine_lr, source_logits_gradient, make_source_logits_optimizer, penalty_schedule, scalebio_step
from config import TrainConfig
from model import GPT, GPTConfig, make_optimizer
from steps import Run, model_objective, scalebio_gpt_step


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons need float64; restore the default for the other test files."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Recorder:
    """An optimizer stand-in for scalebio_step that applies nothing and records its calls."""
    def __init__(self, name='', calls=None):
        self.name, self.calls, self.param_groups = name, calls if calls is not None else [], [{}]

    def step(self):
        self.calls.append(self.name)

    def zero_grad(self, set_to_none=True):
        pass


no_update = Recorder()


def quadratic_objective(theta, centres, target, noise=None):
    """ℓ_i(θ) = ½‖θ − c_i − ξ_i‖² (ξ: an optional noise sample), L_val(θ) = ½‖θ − target‖²."""
    def objective(source_coeffs, val_coeff):
        theta.grad = None
        shifted = centres if noise is None else centres + noise
        losses = 0.5 * ((theta - shifted) ** 2).sum(dim=1)
        val = 0.5 * ((theta - target) ** 2).sum()
        ((source_coeffs * losses).sum() + val_coeff * val).backward()
        return losses.detach(), val.detach() if val_coeff else None, {}
    return objective


def test_source_logits_gradient_equals_autograd_and_the_softmax_jacobian():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=gen, requires_grad=True)
    upper, lower, alpha = torch.randn(5, generator=gen), torch.randn(5, generator=gen), 7.0
    weights = torch.softmax(p, 0)
    (alpha * (weights @ upper - weights @ lower)).backward()
    w = weights.detach()
    jacobian = torch.diag(w) - torch.outer(w, w)
    ours = source_logits_gradient(w, upper, lower, alpha)
    assert torch.allclose(ours, p.grad, atol=1e-12)
    assert torch.allclose(ours, alpha * jacobian @ (upper - lower), atol=1e-12)


def test_a_step_on_the_mirror_gradient_is_exponentiated_gradient_on_the_simplex():
    """p ← p − η·α·(d − λᵀd) gives λ ← λ ⊙ exp(−η·α·d) / Z, and a source near weight 0 still moves."""
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([4.0, 0.0, -16.0])  # the last source at weight ~2e-9
    upper, lower, alpha, lr = torch.randn(3, generator=gen), torch.randn(3, generator=gen), 5.0, 0.1
    weights, d = torch.softmax(p, 0), upper - lower
    step = source_logits_gradient(weights, upper, lower, alpha, mirror=True)
    exponentiated = weights * torch.exp(-lr * alpha * d)
    assert torch.allclose(torch.softmax(p - lr * step, 0), exponentiated / exponentiated.sum(), atol=1e-15)
    favoured = int(torch.argmin(d))  # the source on which w beats u the most gains weight
    assert torch.softmax(p - lr * step, 0)[favoured] > weights[favoured]
    # the gradient in p carries the factor λ_i: the near-zero source hardly moves, under mirror it does
    plain = source_logits_gradient(weights, upper, lower, alpha)
    assert abs(plain[2]) < 1e-6 < abs(step[2])


@pytest.mark.parametrize("micro_steps", [1, 2])
def test_step_on_a_gpt_sets_the_autograd_gradient_of_the_penalty(micro_steps):
    torch.manual_seed(0)
    lower_model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    upper_model = copy.deepcopy(lower_model)
    with torch.no_grad():  # make the two copies differ, as they do after some steps
        for param in upper_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    x, y = torch.randint(0, 20, (6, 8)), torch.randint(0, 20, (6, 8))  # 3 sources, 2 rows each
    vx, vy = torch.randint(0, 20, (4, 8)), torch.randint(0, 20, (4, 8))
    source_logits = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    alpha = 10.0
    run = Run(TrainConfig(grad_clip=0.0), [lower_model, upper_model], micro_steps=micro_steps)  # 0: no clipping
    result = scalebio_step(source_logits, alpha,
                           model_objective(run, lower_model, x, y, None, None, 3, 0.0, 'lower'),
                           model_objective(run, upper_model, x, y, vx, vy, 3, 0.0, 'upper'),
                           no_update, no_update, no_update)
    p = source_logits.detach().clone().requires_grad_(True)
    weights = torch.softmax(p, 0)
    with torch.no_grad():
        upper_losses = upper_model(x, y)[1].view(3, 2).mean(1)
        lower_losses = lower_model(x, y)[1].view(3, 2).mean(1)
    (alpha * (weights @ upper_losses - weights @ lower_losses)).backward()
    assert torch.allclose(source_logits.grad, p.grad, atol=1e-12)
    assert torch.allclose(result['source_logits_grad'], p.grad, atol=1e-12)
    # the model gradients: those of α·L_train(u, λ) and of L_val(w) + α·L_train(w, λ), however many micro-steps
    weights = weights.detach()
    for model, val in ((lower_model, None), (upper_model, (vx, vy))):
        reference = copy.deepcopy(model)
        reference.zero_grad(set_to_none=True)
        objective = alpha * weights @ reference(x, y)[1].view(3, 2).mean(1)
        if val:
            objective = objective + reference(*val)[1].mean()
        objective.backward()
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(mine.grad, theirs.grad, atol=1e-12)


def identity_curvature_problem(seed):
    """Per-source losses ½‖θ − a_i‖², validation ½‖θ − b‖², random logits; θ* = Σ λ_i a_i and the exact
    hypergradient by the implicit function theorem: ∇²g·dθ*/dλ_i = −∂_θ ℓ_i(θ*) with ∇²g = I, so
    dθ*/dλ_i = a_i − θ*, ∂F/∂λ_i = (θ* − b)ᵀ(a_i − θ*), and in logits ∇_p F = (diag λ − λλᵀ) ∂F/∂λ."""
    gen = torch.Generator().manual_seed(seed)
    centres, target = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
    source_logits = torch.randn(4, generator=gen).requires_grad_(True)
    weights = torch.softmax(source_logits.detach(), 0)
    lower_opt = weights @ centres
    hypergradient = (torch.diag(weights) - torch.outer(weights, weights)) @ ((centres - lower_opt) @ (lower_opt - target))
    assert hypergradient.abs().max() > 1e-2  # not trivially zero
    return centres, target, source_logits, lower_opt, hypergradient


@pytest.mark.parametrize("alpha", [1.0, 10.0, 100.0])
def test_quadratic_at_exact_optima_gives_alpha_over_one_plus_alpha_times_hypergradient(alpha):
    centres, target, source_logits, lower_opt, hypergradient = identity_curvature_problem(1)
    # u = θ*; the penalised upper level's optimum w_α = (b + α θ*) / (1 + α)
    u = lower_opt.clone().requires_grad_(True)
    w = ((target + alpha * lower_opt) / (1 + alpha)).requires_grad_(True)
    result = scalebio_step(source_logits, alpha, quadratic_objective(u, centres, target),
                           quadratic_objective(w, centres, target), no_update, no_update, no_update)
    assert torch.allclose(result['source_logits_grad'], alpha / (1 + alpha) * hypergradient, atol=1e-12)


@pytest.mark.parametrize("alpha", [10.0, 100.0])
def test_central_difference_at_exact_optima_gives_alpha2_over_alpha2_minus_one_times_hypergradient(alpha):
    centres, target, source_logits, lower_opt, hypergradient = identity_curvature_problem(3)
    # w = argmin L_val + α·L_train, v = argmin α·L_train − L_val (α > 1)
    w = ((target + alpha * lower_opt) / (alpha + 1)).requires_grad_(True)
    v = ((alpha * lower_opt - target) / (alpha - 1)).requires_grad_(True)
    result = scalebio_step(source_logits, alpha, quadratic_objective(v, centres, target),
                           quadratic_objective(w, centres, target), no_update, no_update, no_update,
                           central_difference=True)
    # w − v = (b − θ*)·2α/(α² − 1): the error is O(1/α²), against the forward difference's α/(1 + α)
    assert torch.allclose(result['source_logits_grad'], alpha ** 2 / (alpha ** 2 - 1) * hypergradient, atol=1e-12)


def source_logits_gradient_variance(alpha, shared, n_samples=400, sigma=0.5):
    gen = torch.Generator().manual_seed(2)
    centres, target = torch.randn(3, 4, generator=gen), torch.randn(4, generator=gen)
    source_logits = torch.zeros(3, requires_grad=True)
    weights = torch.softmax(source_logits.detach(), 0)
    lower_opt = weights @ centres
    u = lower_opt.clone().requires_grad_(True)
    w = ((target + alpha * lower_opt) / (1 + alpha)).requires_grad_(True)
    grads = []
    for _ in range(n_samples):
        noise_w = sigma * torch.randn(3, 4, generator=gen)
        noise_u = noise_w if shared else sigma * torch.randn(3, 4, generator=gen)
        result = scalebio_step(source_logits, alpha, quadratic_objective(u, centres, target, noise_u),
                               quadratic_objective(w, centres, target, noise_w), no_update, no_update, no_update)
        grads.append(result['source_logits_grad'])
    return torch.stack(grads).var(dim=0).sum().item()


def test_shared_batches_keep_the_source_logits_gradient_variance_bounded_independent_ones_grow_like_alpha_squared():
    alphas = [10.0, 100.0, 1000.0]
    slope = {shared: np.polyfit(np.log(alphas), np.log([source_logits_gradient_variance(a, shared) for a in alphas]), 1)[0]
             for shared in (True, False)}
    assert abs(slope[True]) < 0.2
    assert abs(slope[False] - 2.0) < 0.2


def test_a_nan_loss_raises_before_any_update():
    updates = []
    theta = torch.zeros(3, requires_grad=True)
    centres = torch.tensor([[0.0, 0.0, float('nan')], [1.0, 1.0, 1.0]])
    with pytest.raises(FloatingPointError, match="upper_losses"):
        scalebio_step(torch.zeros(2, requires_grad=True), 10.0, quadratic_objective(theta, centres[[1, 1]], centres[1]),
                      quadratic_objective(theta, centres, centres[1]),
                      Recorder('u', updates), Recorder('w', updates), Recorder('p', updates))
    assert updates == []
    # finite losses: the three updates, in the authors' order
    scalebio_step(torch.zeros(2, requires_grad=True), 10.0, quadratic_objective(theta, centres[[1, 1]], centres[1]),
                  quadratic_objective(theta, centres[[1, 1]], centres[1]),
                  Recorder('u', updates), Recorder('w', updates), Recorder('p', updates))
    assert updates == ['u', 'w', 'p']


def test_penalty_schedule_and_learning_rate_shape():
    assert penalty_schedule(123, 10.0) == (10.0, 1.0)
    assert penalty_schedule(250, 10.0, alpha_growth=2.0, alpha_interval=100) == (40.0, 0.25)
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.0)


def test_a_nan_gradient_of_the_upper_copy_stops_the_step_before_the_lower_copy_moves():
    torch.manual_seed(0)
    lower_model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    upper_model = copy.deepcopy(lower_model)
    upper_model.lm_head.weight.register_hook(lambda grad: grad * float('nan'))  # finite losses, NaN gradient
    source_logits = torch.zeros(3, requires_grad=True)
    run = Run(TrainConfig(source_logits_update='mirror'), [lower_model, upper_model], [make_optimizer(m, 1e-2, 0.0) for m in (lower_model, upper_model)],
              source_logits, make_source_logits_optimizer(source_logits, 'mirror'))
    before = copy.deepcopy(lower_model.state_dict())
    x, y = torch.randint(0, 20, (6, 8)), torch.randint(0, 20, (6, 8))
    with pytest.raises(FloatingPointError, match="upper_gradient_norm"):
        scalebio_gpt_step(run, x, y, x[:2], y[:2], 10.0)
    for name, value in lower_model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not run.optimizers[0].state and torch.equal(source_logits, torch.zeros(3))


def test_a_scalebio_step_reads_the_device_once_for_all_its_checks(monkeypatch):
    """Every loss and both gradient norms are checked for NaN in one host read (on a GPU each read waits for the
    queued kernels); a NaN still stops the step before any update (the tests above). Counted: reads made by our
    code. Rows already on the host are read freely (the crop), so the step here runs without it; torch's AdamW
    reads its step counters, which it keeps on the host for that reason."""
    torch.manual_seed(0)
    lower_model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    upper_model = copy.deepcopy(lower_model)
    source_logits = torch.zeros(3, requires_grad=True)
    run = Run(TrainConfig(crop_padding=False, source_logits_update='mirror'), [lower_model, upper_model],
              [make_optimizer(m, 1e-2, 0.0) for m in (lower_model, upper_model)],
              source_logits, make_source_logits_optimizer(source_logits, 'mirror'))
    x, y = torch.randint(0, 20, (6, 8)), torch.randint(0, 20, (6, 8))
    reads = []
    for method in ('__bool__', 'item', 'tolist', '__float__', '__int__', '__index__'):
        original = getattr(torch.Tensor, method)
        def counted(self, *args, _original=original, _method=method):
            if not sys._getframe(1).f_code.co_filename.startswith(torch.__path__[0]):
                reads.append(_method)
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, method, counted)
    scalebio_gpt_step(run, x, y, x[:2], y[:2], 10.0)
    monkeypatch.undo()
    assert reads == ['__bool__'] and run.optimizers[0].state  # one read, and the copies stepped


@pytest.mark.parametrize('alpha', [10.0, 100.0])
def test_both_copies_are_clipped_at_grad_clip_times_alpha(alpha):
    """The authors clip u and w at α: each copy's gradient carries the factor α (α·∇L_train), so the norm each
    optimizer steps on is grad_clip·α once the gradient is larger."""
    torch.manual_seed(0)
    lower_model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    upper_model = copy.deepcopy(lower_model)
    source_logits = torch.zeros(3, requires_grad=True)
    run = Run(TrainConfig(grad_clip=0.01), [lower_model, upper_model],
              [make_optimizer(m, 1e-2, 0.0) for m in (lower_model, upper_model)],
              source_logits, make_source_logits_optimizer(source_logits, 'adam'))
    norms = []
    for optimizer in run.optimizers:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(torch.cat(
            [p.grad.reshape(-1) for g in opt.param_groups for p in g['params'] if p.grad is not None]).norm().item()))
    x, y = torch.randint(0, 20, (6, 8)), torch.randint(0, 20, (6, 8))
    scalebio_gpt_step(run, x, y, x[:2], y[:2], alpha)
    assert norms == pytest.approx([0.01 * alpha] * 2, rel=1e-5)
