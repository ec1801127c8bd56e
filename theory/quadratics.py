"""
Data-reweighting quadratics (problem Q2 of theory/README.md) with their closed forms, and the single-loop
iteration of bilevel.scalebio_step on them. Nothing here re-implements the step: the p-gradient and the
order of the updates come from bilevel.py, the function train.py calls; the models are tensors θ and the
optimizers plain gradient steps (torch.optim.SGD).

    ℓ_i(θ) = ½‖θ − c_i‖²_{A_i},  L_train(θ, s) = Σ_i s_i·ℓ_i(θ),  s = softmax(p),  L_val(θ) = ½‖θ − θ_val‖²
    θ*(s) = M⁻¹ Σ_i s_i·A_i·c_i,  M(s) = Σ_i s_i·A_i             (the lower level: u's optimum)
    w_α(s) = (I + α·M)⁻¹ (θ_val + α Σ_i s_i·A_i·c_i)              (the penalised upper level: w's optimum)
    ∂F/∂s_i = (θ* − θ_val)ᵀ M⁻¹ A_i (c_i − θ*)                   (implicit function theorem)
"""
import torch

from bilevel import cosine_lr, make_source_logits_optimizer, scalebio_step
from lisa import set_lisa_blocks


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


def upper_solution(prob, weights, alpha, val_sign=1.0):
    """argmin_θ val_sign·L_val(θ) + α·L_train(θ, s): w_α, or with val_sign = −1 the central difference's v_α
    (a minimum only while α·M − I ≻ 0)."""
    A, c = prob['curvatures'], prob['centres']
    M = torch.einsum('i,ijk->jk', weights, A)
    rhs = val_sign * prob['target'] + alpha * torch.einsum('i,ijk,ik->j', weights, A, c)
    return torch.linalg.solve(val_sign * torch.eye(len(rhs)) + alpha * M, rhs)


def objective(prob, blocks, noise=None):
    """The objective callable of bilevel.scalebio_step for the quadratic 'model' θ = concat(blocks): one block,
    or the blocks lisa.py freezes and unfreezes. With a noise sample ξ (shape (S, d)) the per-source losses
    are stochastic: ℓ_i(θ; ξ) = ½‖θ − c_i − ξ_i‖²_{A_i}."""
    def run(source_coeffs, val_coeff):
        for block in blocks:
            block.grad = None
        theta = torch.cat(list(blocks))
        diff = theta - prob['centres'] - (0.0 if noise is None else noise)
        losses = 0.5 * torch.einsum('ij,ijk,ik->i', diff, prob['curvatures'], diff)
        val = 0.5 * ((theta - prob['target']) ** 2).sum()
        ((source_coeffs * losses).sum() + val_coeff * val).backward()
        return losses.detach(), val.detach() if val_coeff else None, {}
    return run


def inner_solutions(prob, weights, alpha, central):
    """The exact optima of the two copies: (θ*(s) or, for the central difference, v_α(s)) and w_α(s)."""
    lower = upper_solution(prob, weights, alpha, val_sign=-1.0) if central \
        else lower_solution(prob['curvatures'], prob['centres'], weights)
    return lower, upper_solution(prob, weights, alpha)


def penalty_gradient(prob, logits, alpha, central=False):
    """ScaleBiO's p-gradient at the exact inner solutions, from bilevel.scalebio_step with no-op updates."""
    u, w = (t.requires_grad_(True) for t in inner_solutions(prob, torch.softmax(logits, 0), alpha, central))
    source_logits = logits.clone().requires_grad_(True)
    no_update = [torch.optim.SGD([x], lr=0.0) for x in (u, w, source_logits)]
    result = scalebio_step(source_logits, alpha, objective(prob, [u]), objective(prob, [w]), *no_update,
                           central_difference=central)
    return result['source_logits_grad']


def weight_gradient(prob, s):
    """∂F/∂s_i = (θ* − θ_val)ᵀ M⁻¹ A_i (c_i − θ*), by the implicit function theorem."""
    A, c = prob['curvatures'], prob['centres']
    theta = lower_solution(A, c, s)
    M = torch.einsum('i,ijk->jk', s, A)
    return torch.einsum('j,ijk,ik->i', torch.linalg.solve(M, theta - prob['target']), A, c - theta), theta


def true_value_and_gradient(prob, logits):
    """F(s) = ½‖θ*(s) − θ_val‖² and its exact gradient in the logits."""
    s = torch.softmax(logits, 0)
    dF_ds, theta = weight_gradient(prob, s)
    return 0.5 * ((theta - prob['target']) ** 2).sum().item(), (torch.diag(s) - torch.outer(s, s)) @ dF_ds


def trusted_optimum(prob, starts=5):
    """s* = argmin_s F(s) on the simplex, from several starts (the best is kept), with its certificate:
    (s*, the largest distance between the starts' answers, the KKT residual). At an interior optimum the
    simplex's optimality conditions say every source has the same marginal value, ∂F/∂s_i = const: the
    residual is max_i ∂F/∂s_i − min_i ∂F/∂s_i."""
    gen = torch.Generator().manual_seed(0)
    n = len(prob['mixture'])
    found = [stationary_weights(lambda p: true_value_and_gradient(prob, p), n,
                                start=None if k == 0 else torch.randn(n, generator=gen))[0] for k in range(starts)]
    values = [true_value_and_gradient(prob, torch.log(s))[0] for s in found]
    best = found[min(range(starts), key=values.__getitem__)]
    marginal = weight_gradient(prob, best)[0]
    return best, max((s - best).abs().max().item() for s in found), (marginal.max() - marginal.min()).item()


def penalty_value_and_gradient(prob, logits, alpha, central=False):
    """L*_α(p) = L_val(w_α) + α·(L_train(w_α, s) − L_train(θ*, s)) and, by Danskin, bilevel.py's p-gradient.
    Central: ½[(L_val(w_α) + α·L_train(w_α, s)) − (α·L_train(v_α, s) − L_val(v_α))]."""
    s = torch.softmax(logits, 0)
    losses = lambda theta: 0.5 * torch.einsum('ij,ijk,ik->i', theta - prob['centres'], prob['curvatures'],
                                              theta - prob['centres'])
    val = lambda theta: 0.5 * ((theta - prob['target']) ** 2).sum()
    u, w = inner_solutions(prob, s, alpha, central)
    if central:
        value = 0.5 * ((val(w) + alpha * s @ losses(w)) - (alpha * s @ losses(u) - val(u)))
    else:
        value = val(w) + alpha * s @ (losses(w) - losses(u))
    return value.item(), penalty_gradient(prob, logits, alpha, central)


def logits_hessian(gradient, logits, h=1e-5):
    """Central finite differences of a logits gradient, symmetrised."""
    hessian = torch.stack([(gradient(logits + h * e) - gradient(logits - h * e)) / (2 * h)
                           for e in torch.eye(len(logits))])
    return 0.5 * (hessian + hessian.T)


def stationary_weights(value_and_gradient, n_sources, newton_steps=8, h=1e-5, start=None):
    """s at a minimiser over p: L-BFGS from `start` (uniform by default), then Newton steps on the gradient
    (finite-difference Hessian; pinv because softmax is invariant to adding a constant to p) to ~1e-15."""
    logits = (torch.zeros(n_sources) if start is None else start.clone()).requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-30,
                            history_size=20, line_search_fn='strong_wolfe')

    def closure():
        value, grad = value_and_gradient(logits.detach())
        logits.grad = grad.clone()
        return value
    opt.step(closure)
    p = logits.detach().clone()
    for _ in range(newton_steps):
        hessian = logits_hessian(lambda q: value_and_gradient(q)[1], p, h)
        p = p - torch.linalg.pinv(hessian, rtol=1e-10) @ value_and_gradient(p)[1]
    return torch.softmax(p, 0), value_and_gradient(p)[1].norm().item()


def one_step(prob, alpha, state, step_sizes, noise=None, lower_noise=None, central=False):
    """One iteration of bilevel.scalebio_step from state = (u, w, p) with plain gradient steps of the given
    sizes (η_u, η_w, η_p); returns the new state. SGD without momentum keeps no state, so this is a pure map.
    noise: one draw ξ shared by both copies, as train.py shares its batch; lower_noise: u's own draw instead."""
    u, w, p = (t.detach().clone().requires_grad_(True) for t in state)
    optimizers = [torch.optim.SGD([x], lr=lr) for x, lr in zip((u, w, p), step_sizes)]
    result = scalebio_step(p, alpha, objective(prob, [u], noise if lower_noise is None else lower_noise),
                           objective(prob, [w], noise), *optimizers, central_difference=central)
    return u.detach(), w.detach(), p.detach(), result['source_logits_grad']


def model_step_sizes(prob, alpha, scale=0.5):
    """One step size for u and w, as train.py uses one learning rate for both copies, scaled by 1/α: w's
    gradient ∇L_val + α·∇L_train is Lipschitz with 1 + α·L (L the largest curvature), u's with α·L.
    (The copies must move at the same speed: their lags along the common drift then cancel in
    ℓ(w) − ℓ(u), which p's gradient multiplies by α. With η_u = 1/(α·L) ≠ η_w the p step-size boundary
    fell like 1/α in a measurement; with equal steps it stays near 1.)"""
    curvature = torch.linalg.eigvalsh(prob['curvatures']).max().item()
    step = scale / (1 + alpha * curvature)
    return step, step


def fixed_point(prob, alpha, central=False):
    """(u, w, p) where the single loop stops: s = s_α, u = θ*(s_α) (central: v_α(s_α)), w = w_α(s_α); p centred."""
    s_alpha, _ = stationary_weights(lambda p: penalty_value_and_gradient(prob, p, alpha, central),
                                    len(prob['mixture']))
    p = torch.log(s_alpha)
    return (*inner_solutions(prob, s_alpha, alpha, central), p - p.mean())


def spectral_radius(prob, alpha, state, step_sizes, h=1e-6):
    """ρ of the iteration's Jacobian at `state`, by central differences of one_step. p + c·1 is a fixed
    direction (softmax ignores it; eigenvalue 1), so the Jacobian is taken on its complement {p ⊥ 1}."""
    n_u, n_p = len(state[0]), len(state[2])
    flat = torch.cat(state)
    centred = torch.eye(n_p) - 1.0 / n_p                      # projector onto p ⊥ 1
    basis_p = torch.linalg.qr(centred)[0][:, :n_p - 1]
    basis = torch.block_diag(torch.eye(2 * n_u), basis_p)      # columns span the invariant complement

    def step(z):
        return torch.cat(one_step(prob, alpha, (z[:n_u], z[n_u:2 * n_u], z[2 * n_u:]), step_sizes)[:3])
    columns = [(step(flat + h * b) - step(flat - h * b)) / (2 * h) for b in basis.T]
    jacobian = basis.T @ torch.stack(columns, dim=1)
    return torch.linalg.eigvals(jacobian).abs().max().item()


def update_from_equations(prob, alpha, step_sizes, z):
    """One iteration (u, w, p) → (u', w', p') written from README.md's three update lines with plain gradient
    steps, in closed form and without bilevel.py: the Jacobian of this map checks the loop that runs through
    scalebio_step (single_loop_checks)."""
    n, (eta_u, eta_w, eta_p) = len(prob['target']), step_sizes
    u, w, p = z[:n], z[n:2 * n], z[2 * n:]
    s, A, c = torch.softmax(p, 0), prob['curvatures'], prob['centres']

    def losses(theta):
        return 0.5 * torch.einsum('ij,ijk,ik->i', theta - c, A, theta - c)

    def train_gradient(theta):  # ∇_θ Σ_i s_i·ℓ_i(θ), the A_i symmetric
        return torch.einsum('i,ijk,ik->j', s, A, theta - c)
    d = losses(w) - losses(u)
    return torch.cat([u - eta_u * alpha * train_gradient(u),
                      w - eta_w * ((w - prob['target']) + alpha * train_gradient(w)),
                      p - eta_p * alpha * s * (d - (s * d).sum())])


def equations_spectral_radius(prob, alpha, state, step_sizes):
    """ρ of the Jacobian of update_from_equations at `state` (autograd), on the complement of p + c·1."""
    n_u, n_p = len(state[0]), len(state[2])
    basis_p = torch.linalg.qr(torch.eye(n_p) - 1.0 / n_p)[0][:, :n_p - 1]
    basis = torch.block_diag(torch.eye(2 * n_u), basis_p)
    jacobian = torch.autograd.functional.jacobian(lambda z: update_from_equations(prob, alpha, step_sizes, z),
                                                  torch.cat(state))
    return torch.linalg.eigvals(basis.T @ jacobian @ basis).abs().max().item()


def stability_boundary(prob, alpha, state, model_sizes, low=1e-4, high=1e3, iterations=24):
    """The p step size at which ρ of the iteration's Jacobian crosses 1 (bisection in log space): above
    it p moves too fast for u and w to follow and the loop oscillates or diverges."""
    for _ in range(iterations):
        middle = (low * high) ** 0.5
        if spectral_radius(prob, alpha, state, (*model_sizes, middle)) < 1:
            low = middle
        else:
            high = middle
    return low


def run_single_loop(prob, alpha, step_sizes, steps, target, tolerance=1e-12, central=False):
    """Iterates one_step from u = w = 0, p = 0; returns the final state and ‖z_t − target‖ per step
    (stopping early once below tolerance, or once the error has grown 1e6-fold)."""
    state = tuple(torch.zeros_like(t) for t in target)
    errors = []
    for _ in range(steps):
        state = one_step(prob, alpha, state, step_sizes, central=central)[:3]
        errors.append(torch.cat([a - b for a, b in zip(state, target)]).norm().item())
        if errors[-1] < tolerance or not errors[-1] < 1e6 * errors[0]:
            break
    return state, errors


def run_source_logits_update(prob, alpha, update='adam', lr=0.0, steps=1500, central=False, warmup_steps=30, lisa_blocks=1,
                      lisa_layers=0, lisa_interval=20, lisa_draw='shared', lisa_merge_frozen=False, sigma=0.0,
                      start=None, move_logits=True):
    """The single loop with p updated exactly as train.py does it (--source_logits_update=update: bilevel's optimizer,
    geometry and step size, lr 0 being the rule's own; the warmup + cosine schedule), u and w by plain
    gradient steps of one size.
    LISA as train.py runs it: θ is `lisa_blocks` blocks of coordinates, and lisa.py gives each copy its
    `lisa_layers` trainable blocks (the draw `lisa_draw`, switched every `lisa_interval` steps, the blocks that
    freeze merged if `lisa_merge_frozen`).
    sigma > 0: noisy per-source losses, one draw per step shared by both copies (train.py's shared batch).
    start: (u, w, p) to start from (default zeros); move_logits=False holds p there.
    Returns the final weights softmax(p) and p's gradient at every step."""
    gen = torch.Generator().manual_seed(0)
    u, w, p = start if start is not None else (torch.zeros(len(prob['target'])), torch.zeros(len(prob['target'])),
                                               torch.zeros(len(prob['mixture'])))
    copies = [[torch.nn.ParameterList([chunk.clone()]) for chunk in x.chunk(lisa_blocks)] for x in (u, w)]
    p = p.clone().requires_grad_(True)
    optimizer = make_source_logits_optimizer(p, update, lr)
    model_optimizers = [torch.optim.SGD([b[0] for b in blocks], lr=size)
                        for blocks, size in zip(copies, model_step_sizes(prob, alpha, 0.9))]
    gradients = []
    for t in range(steps):
        for group in optimizer.param_groups:  # as train.py's set_schedules
            group['lr'] = group['initial_lr'] * cosine_lr(t, steps, warmup_steps) if move_logits else 0.0
        set_lisa_blocks(list(zip(copies, model_optimizers)), lisa_layers, 0, t // lisa_interval, lisa_draw,
                        lisa_merge_frozen)
        noise = sigma * torch.randn(*prob['centres'].shape, generator=gen) if sigma else None
        result = scalebio_step(p, alpha, *[objective(prob, [b[0] for b in blocks], noise) for blocks in copies],
                               *model_optimizers, optimizer, central_difference=central)
        gradients.append(result['source_logits_grad'])
    return torch.softmax(p.detach(), 0), torch.stack(gradients)
