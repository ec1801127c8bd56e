"""
The five pictures of theory/README.md, one per stage of the lesson, drawn by `python -m theory --plots`.
They show the curves run_checks returns (the numbers the checks judge), plus two small runs of their own: the
landscape F(s) over the simplex (stage 1) and ρ(J) against p's step size (stage 3), a few seconds together.
matplotlib is optional in this project: theory/__main__.py checks that it is installed before the checks run.
"""
import os

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

from theory.quadratics import (equations_spectral_radius, fixed_point, make_problem, model_step_sizes,
                               stability_boundary, true_value_and_gradient)


def draw(curves, folder):
    """Writes folder/1_hypergradient.png ... 5_lisa.png from run_checks' curves."""
    os.makedirs(folder, exist_ok=True)
    stages = [('1_hypergradient', hypergradient), ('2_bias', bias), ('3_single_loop', single_loop),
              ('4_noise', noise), ('5_lisa', lisa)]
    for name, stage in stages:
        fig = stage(curves)
        path = os.path.join(folder, f'{name}.png')
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        print(f"wrote {path}")


def guide(ax, x, y, slope, label):
    """A dashed reference line y ∝ x^slope through the curve's first point."""
    x = np.asarray(x, dtype=float)
    ax.loglog(x, y[0] * (x / x[0]) ** slope, 'k--', lw=0.8, alpha=0.6, label=label)


def corners(s):
    """Simplex weights (…, 3) to the plane: a triangle with source i at corner i."""
    return np.asarray(s) @ np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])


def hypergradient(curves):
    """Stage 1: F(s) over the simplex of 3 sources with scalar curvatures a_i (the checks' instance, seed 0),
    where s*_i ∝ π_i/a_i is known; gradient descent on p with the exact hypergradient (implicit function
    theorem) leads there from the mixture π the validation target was built from."""
    prob = make_problem(0, case='scalar')
    a = prob['curvatures'][:, 0, 0]
    s_star = prob['mixture'] / a / (prob['mixture'] / a).sum()
    n = 60
    grid = torch.tensor([[i, j, n - i - j] for i in range(1, n) for j in range(1, n - i)], dtype=torch.float64) / n
    values = [true_value_and_gradient(prob, torch.log(s))[0] for s in grid]
    p, path = torch.log(prob['mixture']), []  # from the mixture's weights
    for _ in range(1000):
        path.append(torch.softmax(p, 0).numpy())
        p = p - 2.0 * true_value_and_gradient(prob, p)[1]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    xy = corners(grid.numpy())
    filled = ax.tricontourf(xy[:, 0], xy[:, 1], np.log10(values), levels=20, cmap='viridis')
    fig.colorbar(filled, ax=ax, label='log10 F(s)')
    ax.plot(*corners(path).T, 'w.-', lw=1, ms=2, label='descent on p from π, exact hypergradient (1,000 steps)')
    ax.plot(*corners(prob['mixture'].numpy()), 'rs', ms=8, label='π (the mixture)')
    ax.plot(*corners(s_star.numpy()), 'w*', ms=14, mec='k', label='s* ∝ π_i / a_i')
    for i, xy_i in enumerate(corners(np.eye(3))):
        ax.annotate(f'source {i} (a = {a[i]:g})', xy_i, ha='center', va='top' if i < 2 else 'bottom')
    ax.set(title='F(s) = ½‖θ*(s) − θ_val‖² on the simplex', xlim=(-0.15, 1.15), ylim=(-0.35, 0.95))
    ax.set_aspect('equal')
    ax.axis('off')
    ax.legend(loc='lower center', fontsize=8)
    return fig


def bias(curves):
    """Stage 2: the penalty's bias against α (the first non-realizable instance of the bias checks)."""
    alpha = curves['alpha']
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    forward, central = curves['hypergradient_error_forward'], curves['hypergradient_error_central']
    left.loglog(alpha, forward, 'o-', label='forward difference (train.py)')
    left.loglog(alpha, central, 's-', label='central difference')
    guide(left, alpha, forward, -1, 'slope −1')
    guide(left, alpha, central, -2, 'slope −2')
    left.set(xlabel='α', ylabel='‖p-gradient − ∇_p F‖', title='the p-gradient at the exact u, w')
    left.legend(fontsize=8)
    right.loglog(alpha, curves['weights_error'], 'o-', label='‖s_α − s*‖')
    right.loglog(alpha, curves['value_gap'], 's-', label='F(s_α) − F*')
    guide(right, alpha, curves['weights_error'], -1, 'slope −1')
    guide(right, alpha, curves['value_gap'], -2, 'slope −2')
    right.set(xlabel='α', title="the penalty's stationary weights s_α")
    right.legend(fontsize=8)
    return fig


def single_loop(curves):
    """Stage 3: the single loop's error against the step, at half and twice the p step-size boundary, beside
    ρ(J) against p's step (the checks' first run: the realizable instance, seed 0, α = 10)."""
    errors, rho = np.array(curves['single_loop_error']), curves['single_loop_rho']
    prob, alpha = make_problem(0, case='realizable'), 10.0
    state, sizes = fixed_point(prob, alpha), model_step_sizes(prob, alpha, 0.9)
    boundary = stability_boundary(prob, alpha, state, sizes)
    ratios = np.geomspace(0.05, 4, 40)
    radii = [equations_spectral_radius(prob, alpha, state, (*sizes, r * boundary)) for r in ratios]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogy(errors, label='p step = boundary / 2')
    left.semilogy(curves['single_loop_too_fast'], label='p step = 2 × boundary')
    k = int(np.argmax(errors < 1e-4))  # anchor ρ^t where the checks fit the rate
    t = np.arange(len(errors))
    left.semilogy(t, errors[k] * rho ** (t - k), 'k--', lw=0.8, label=f'ρ(J)^t, ρ = {rho:.4f}')
    left.set(xlabel='step', ylabel='‖(u, w, p) − fixed point‖', title='the single loop at α = 10',
             ylim=(1e-13, 1e2))
    left.legend(fontsize=8)
    right.semilogx(ratios, radii, 'o-', ms=3)
    right.axhline(1.0, color='k', lw=0.8)
    right.axvline(1.0, color='r', lw=0.8, ls='--', label='the boundary: ρ(J) = 1')
    right.set(xlabel="p's step / boundary", ylabel='ρ(J)', title='spectral radius of the update')
    right.legend(fontsize=8)
    return fig


def noise(curves):
    """Stage 4: noisy losses. The variance of p's gradient at the fixed point against α, one batch shared by
    both copies or one each; and steps ∝ 1/t at α = 10: the noise dies at 1/t, the penalty's bias stays."""
    alpha = curves['noise_alpha']
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(alpha, curves['noise_variance_shared'], 'o-', label='one batch for u and w (train.py)')
    left.loglog(alpha, curves['noise_variance_independent'], 's-', label='a batch per copy')
    guide(left, alpha, curves['noise_variance_independent'], 2, 'slope 2')
    left.set(xlabel='α', ylabel='var(p-gradient)', title="the noise in p's gradient")
    left.legend(fontsize=8)
    steps = curves['noisy_steps']
    right.loglog(steps, curves['noisy_to_alpha'], 'o-', label='E‖s_t − s_α‖²')
    right.loglog(steps, curves['noisy_to_star'], 's-', label='E‖s_t − s*‖²')
    right.axhline(curves['noisy_bias_squared'], color='k', lw=0.8, label='‖s_α − s*‖² (the bias)')
    guide(right, steps, curves['noisy_to_alpha'], -1, 'slope −1')
    right.set(xlabel='step t', title='steps ∝ 1/t at α = 10, from the fixed point')
    right.legend(fontsize=8)
    return fig


def lisa(curves):
    """Stage 5: LISA's three rules, where the loop ends against α; and the variance of p's gradient with noisy
    losses when the copies draw the same blocks or their own."""
    alpha = np.array(curves['lisa_alpha'])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rules = [('lisa_shared', "shared draw (train.py), 3,000 steps"), ('lisa_merged', 'frozen blocks merged'),
             ('lisa_independent', 'independent draws')]
    for (key, label), marker in zip(rules, 'o^s'):
        runs = np.array(curves[key])  # (α, run)
        line, = left.loglog(alpha, runs.mean(axis=1), marker + '-', label=label)
        for column in runs.T:
            left.loglog(alpha, column, marker, color=line.get_color(), alpha=0.3, ms=4)
    guide(left, alpha, [np.mean(curves['lisa_merged'][0])], -1, 'a bias ∝ 1/α would fall so')
    left.set(xlabel='α', ylabel='max_i |s_i − s_α,i| at the end', title='LISA: where the loop ends')
    left.legend(fontsize=8)
    right.loglog(alpha, curves['lisa_noise_shared'], 'o-', label='shared draw')
    right.loglog(alpha, curves['lisa_noise_independent'], 's-', label='independent draws')
    guide(right, alpha, curves['lisa_noise_independent'], 2, 'slope 2')
    right.set(xlabel='α', ylabel='var(p-gradient)', title='LISA with noisy losses, p held')
    right.legend(fontsize=8)
    return fig
