"""
Checks of ScaleBiO's penalty on data-reweighting quadratics whose answers are known in closed form.
(Part of the theory issue: the exact-inner-solution checks. The single-loop, growing-penalty, stochastic and
central-difference checks are still to come.)

    python -m theory            # every check: a table, theory/results.json; exit status 1 if one misses
    python -m theory --quick    # the same here (all checks take seconds); tests/ calls it

Problem Q2 (theory/README.md): S sources, ℓ_i(θ) = ½‖θ − c_i‖²_{A_i}, L_train(θ, s) = Σ_i s_i·ℓ_i(θ),
s = softmax(p), L_val(θ) = ½‖θ − θ_val‖². Closed forms, with M(s) = Σ_i s_i·A_i:
    θ*(s) = M⁻¹ Σ_i s_i·A_i·c_i                          (the lower level's solution: u's optimum)
    w_α(s) = (I + α·M)⁻¹ (θ_val + α Σ_i s_i·A_i·c_i)      (the penalised upper level: w's optimum)
    ∂F/∂s_i = (θ* − θ_val)ᵀ M⁻¹ A_i (c_i − θ*)           (implicit function theorem)
The penalty's p-gradient is NOT re-implemented here: it comes from bilevel.scalebio_step, the function
train.py calls, fed with u = θ*(s) and w = w_α(s) and no-op updates.
"""
import json
import os
import sys

import numpy as np
import torch

from bilevel import scalebio_step  # `python -m theory` from the repository root puts it on the path

torch.set_default_dtype(torch.float64)


def make_problem(seed, n_sources=3, dim=4, case='nonrealizable'):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_sources, dim, generator=gen)
    if case == 'scalar':
        curvatures = torch.stack([a * torch.eye(dim) for a in (1.0, 4.0, 0.5)[:n_sources]])
    else:  # unequal, non-isotropic curvatures: the case where the penalty's bias is visible
        q = torch.randn(n_sources, dim, dim, generator=gen)
        curvatures = q @ q.transpose(1, 2) / dim + 0.5 * torch.eye(dim)
    mixture = torch.softmax(torch.randn(n_sources, generator=gen), 0)  # π
    if case == 'realizable':
        target = lower_solution(curvatures, centres, mixture)          # θ_val = θ*(π)
    elif case == 'scalar':
        target = mixture @ centres                                     # θ_val = Σ π_i c_i
    else:
        target = lower_solution(curvatures, centres, mixture) + 0.1 * torch.randn(dim, generator=gen)
    return dict(centres=centres, curvatures=curvatures, target=target, mixture=mixture)


def lower_solution(curvatures, centres, weights):
    M = torch.einsum('i,ijk->jk', weights, curvatures)
    return torch.linalg.solve(M, torch.einsum('i,ijk,ik->j', weights, curvatures, centres))


def upper_solution(prob, weights, alpha):
    A, c = prob['curvatures'], prob['centres']
    M = torch.einsum('i,ijk->jk', weights, A)
    rhs = prob['target'] + alpha * torch.einsum('i,ijk,ik->j', weights, A, c)
    return torch.linalg.solve(torch.eye(len(rhs)) + alpha * M, rhs)


def objective(prob, theta):
    """The objective callable of bilevel.scalebio_step for the quadratic 'model' θ."""
    def run(source_coeffs, val_coeff):
        theta.grad = None
        diff = theta - prob['centres']
        losses = 0.5 * torch.einsum('ij,ijk,ik->i', diff, prob['curvatures'], diff)
        val = 0.5 * ((theta - prob['target']) ** 2).sum()
        ((source_coeffs * losses).sum() + val_coeff * val).backward()
        return losses.detach(), val.detach() if val_coeff else None
    return run


def penalty_gradient(prob, logits, alpha):
    """ScaleBiO's p-gradient at the exact inner solutions u = θ*(s), w = w_α(s), from bilevel.py."""
    weights = torch.softmax(logits, 0)
    u = lower_solution(prob['curvatures'], prob['centres'], weights).requires_grad_(True)
    w = upper_solution(prob, weights, alpha).requires_grad_(True)
    source_logits = logits.clone().requires_grad_(True)
    result = scalebio_step(source_logits, alpha, objective(prob, u), objective(prob, w),
                           lambda: None, lambda: None, lambda: None)
    return result['logits_grad']


def true_value_and_gradient(prob, logits):
    """F(s) = ½‖θ*(s) − θ_val‖² and its exact gradient in the logits."""
    s = torch.softmax(logits, 0)
    A, c = prob['curvatures'], prob['centres']
    theta = lower_solution(A, c, s)
    M = torch.einsum('i,ijk->jk', s, A)
    dF_ds = torch.einsum('j,ijk,ik->i', torch.linalg.solve(M, theta - prob['target']), A, c - theta)
    return 0.5 * ((theta - prob['target']) ** 2).sum().item(), (torch.diag(s) - torch.outer(s, s)) @ dF_ds


def penalty_value_and_gradient(prob, logits, alpha):
    """L*_α(p) = L_val(w_α) + α·(L_train(w_α, s) − L_train(θ*, s)) and, by Danskin, bilevel.py's p-gradient."""
    s = torch.softmax(logits, 0)
    losses = lambda theta: 0.5 * torch.einsum('ij,ijk,ik->i', theta - prob['centres'], prob['curvatures'],
                                              theta - prob['centres'])
    u, w = lower_solution(prob['curvatures'], prob['centres'], s), upper_solution(prob, s, alpha)
    value = 0.5 * ((w - prob['target']) ** 2).sum() + alpha * s @ (losses(w) - losses(u))
    return value.item(), penalty_gradient(prob, logits, alpha)


def stationary_weights(value_and_gradient, n_sources, newton_steps=8, h=1e-5):
    """s at a minimiser over p: L-BFGS from uniform, then Newton steps on the gradient (finite-difference
    Hessian; pinv because softmax is invariant to adding a constant to p) to reach ~1e-15."""
    logits = torch.zeros(n_sources, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-30,
                            history_size=20, line_search_fn='strong_wolfe')

    def closure():
        value, grad = value_and_gradient(logits.detach())
        logits.grad = grad.clone()
        return value
    opt.step(closure)
    p = logits.detach().clone()
    for _ in range(newton_steps):
        grad = value_and_gradient(p)[1]
        hessian = torch.stack([(value_and_gradient(p + h * e)[1] - value_and_gradient(p - h * e)[1]) / (2 * h)
                               for e in torch.eye(n_sources)])
        p = p - torch.linalg.pinv(0.5 * (hessian + hessian.T), rtol=1e-10) @ grad
    return torch.softmax(p, 0), value_and_gradient(p)[1].norm().item()


def slope(x, y):
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def run_checks(seeds=range(5)):
    alphas = np.logspace(1, 3, 7)
    rows = []

    def check(name, predicted, measured, tolerance):
        rows.append(dict(check=name, predicted=predicted, measured=measured, tolerance=tolerance,
                         passed=bool(abs(measured - predicted) <= tolerance)))

    # realizable: θ_val = θ*(π), so s* = π and the penalty's stationary point is exactly π for every α
    errors = []
    for seed in seeds:
        prob = make_problem(seed, case='realizable')
        for alpha in (1.0, 10.0, 100.0):
            s_alpha, _ = stationary_weights(lambda p: penalty_value_and_gradient(prob, p, alpha), 3)
            errors.append((s_alpha - prob['mixture']).abs().max().item())
    check('realizable: max |s_alpha - pi|', 0.0, max(errors), 1e-10)

    # scalar curvatures A_i = a_i I, θ_val = Σ π_i c_i: s*_i ∝ π_i / a_i (theory/README.md), and s_α = s*
    errors_true, errors_penalty = [], []
    for seed in seeds:
        prob = make_problem(seed, case='scalar')
        closed_form = prob['mixture'] / torch.tensor([1.0, 4.0, 0.5])
        closed_form = closed_form / closed_form.sum()
        s_star, _ = stationary_weights(lambda p: true_value_and_gradient(prob, p), 3)
        s_alpha, _ = stationary_weights(lambda p: penalty_value_and_gradient(prob, p, 10.0), 3)
        errors_true.append((s_star - closed_form).abs().max().item())
        errors_penalty.append((s_alpha - closed_form).abs().max().item())
    check('scalar curvatures: max |s* - pi/a normalised|', 0.0, max(errors_true), 1e-8)
    check('scalar curvatures: max |s_alpha - s*| at alpha=10', 0.0, max(errors_penalty), 1e-8)

    # non-realizable, unequal curvatures: the penalty is a forward difference in 1/α, bias O(1/α)
    # (only instances whose optimum s* is inside the simplex: on its boundary p* is at infinity)
    bias_slopes, dist_slopes, gap_slopes, seed = [], [], [], 0
    while len(bias_slopes) < len(seeds):
        prob, seed = make_problem(seed), seed + 1
        s_star, _ = stationary_weights(lambda p: true_value_and_gradient(prob, p), 3)
        if s_star.min() < 0.02:
            continue
        probe = torch.randn(3, generator=torch.Generator().manual_seed(100 + seed))
        true_grad = true_value_and_gradient(prob, probe)[1]
        bias = [(penalty_gradient(prob, probe, a) - true_grad).norm().item() for a in alphas]
        f_star = true_value_and_gradient(prob, torch.log(s_star))[0]
        dist, gap = [], []
        for a in alphas:
            s_alpha, _ = stationary_weights(lambda p: penalty_value_and_gradient(prob, p, a), 3)
            dist.append((s_alpha - s_star).norm().item())
            gap.append(true_value_and_gradient(prob, torch.log(s_alpha))[0] - f_star)
        bias_slopes.append(slope(alphas, bias))
        dist_slopes.append(slope(alphas, dist))
        gap_slopes.append(slope(alphas, gap))
    check('non-realizable: hypergradient error vs alpha, slope', -1.0, float(np.mean(bias_slopes)), 0.1)
    check('non-realizable: |s_alpha - s*| vs alpha, slope', -1.0, float(np.mean(dist_slopes)), 0.1)
    check('non-realizable: F(s_alpha) - F* vs alpha, slope', -2.0, float(np.mean(gap_slopes)), 0.1)
    return rows


def main(argv):
    unknown = [a for a in argv if a != '--quick']
    if unknown:
        sys.exit(f"error: unknown argument(s) {' '.join(unknown)}; usage: python -m theory [--quick]")
    rows = run_checks()
    print(f"{'check':<56}{'predicted':>10}{'measured':>12}{'tolerance':>11}  pass")
    for r in rows:
        print(f"{r['check']:<56}{r['predicted']:>10.3g}{r['measured']:>12.3g}{r['tolerance']:>11.1g}  "
              f"{'yes' if r['passed'] else 'NO'}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.json')
    with open(path, 'w') as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {path}")
    return 0 if all(r['passed'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
