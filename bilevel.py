"""
The ScaleBiO step: fully first-order bilevel data reweighting.
Pan et al., "ScaleBiO: Scalable Bilevel Optimization for LLM Data Reweighting", arXiv 2406.19976.

The bilevel problem, over the weights λ = softmax(p) of S training sources:

    min_p  L_val(θ*(λ))      where   θ*(λ) = argmin_θ L_train(θ, λ),   L_train(θ, λ) = Σ_i λ_i·ℓ_i(θ)

and ℓ_i(θ) is the loss of θ on source i (by default its token losses summed over the mean token count of a
source: every token weighs alike, as in L_val). ScaleBiO never differentiates through argmin. It solves the
penalty (minimax) form, with two copies of the model, u (`lower_model`) and w (`upper_model`):

    min_{p, w} max_u   L_val(w) + α·(L_train(w, λ) − L_train(u, λ))

u tracks the lower-level solution θ*(λ); w minimises the validation loss while the penalty α keeps it near
the lower level's optimum. This is the value-function penalty of F2SA (Kwon et al. 2023, arXiv 2301.10945)
with x = p, y = w, z = u; as α grows its solution tends to the bilevel one with an O(1/α) bias.

One step is simultaneous (Jacobi) gradient descent-ascent, all three gradients taken at (u_k, w_k, p_k)
on ONE training batch shared by both copies:

    u ← u − η_u·∇_u α·L_train(u, λ)                       (the max over u, as a descent)
    w ← w − η_w·∇_w [L_val(w) + α·L_train(w, λ)]
    p ← p − η_p·Adam(∇_p α·(L_train(w, λ) − L_train(u, λ)))   (the authors' AdamW; every update rule of p:
                                                               SOURCE_LOGITS_UPDATES below)

Why the shared batch: the p-gradient's estimate α·(ℓ(w; ξ) − ℓ(u; ξ')) has variance O(1) in α when ξ = ξ'
(w − u = O(1/α), so the noise cancels to first order), but O(α²) when the two batches are independent.

Nothing in this file knows about GPTs: a model enters only as an `objective` callable, so theory/ drives
this same step on quadratic problems with plain gradient steps.
"""
import math

import torch


def source_logits_gradient(weights, upper_losses, lower_losses, penalty_alpha, mirror=False):
    """∇_p α·(L_train(w, λ) − L_train(u, λ)) with λ = softmax(p), from per-source losses alone.

    L_train(w, λ) − L_train(u, λ) = λᵀd with d_i = ℓ_i(w) − ℓ_i(u), and the softmax Jacobian is
        ∂λ_i/∂p_j = λ_i·(δ_ij − λ_j),   i.e.   J = diag(λ) − λλᵀ (symmetric),
    so  ∇_p = α·J·d = α·λ ⊙ (d − λᵀd).  No second-order term: the losses are numbers here, not graphs.
    A source on which w (which also sees the validation data) does better than u (which sees only the
    training mixture) has d_i < 0 and gains weight.
    mirror=True returns α·(d − λᵀd), the gradient in λ, for mirror descent (SOURCE_LOGITS_UPDATES['mirror']).
    """
    d = upper_losses - lower_losses
    centred = penalty_alpha * (d - (weights * d).sum())
    return centred if mirror else weights * centred


def check_finite(**values):
    """Raises FloatingPointError naming every value that is NaN or inf (call before any update is applied).
    One device-to-host read for all of them: on a GPU each read waits for every kernel queued before it."""
    values = {name: v.detach().reshape(-1) for name, v in values.items() if v is not None}
    if values and not torch.isfinite(torch.cat([v.double() for v in values.values()])).all():
        raise FloatingPointError(', '.join(f"{name} = {v.tolist()}" for name, v in values.items()
                                           if not torch.isfinite(v).all()))


def scalebio_step(source_logits, penalty_alpha, lower_objective, upper_objective,
                  lower_optimizer, upper_optimizer, source_logits_optimizer, central_difference=False):
    """One ScaleBiO iteration: the three update lines at the top of this file, all gradients at (u_k, w_k, p_k).

    lower_objective, upper_objective(source_coeffs, val_coeff): for one model copy on the step's shared batch,
        backward of Σ_i source_coeffs[i]·ℓ_i + val_coeff·L_val, the gradient left in the model; returns ℓ (S,),
        L_val (None when val_coeff == 0) and a dict of further values that must be finite (a gradient norm).
    The optimizers are applied to the gradients left behind; p's (make_source_logits_optimizer) says whether its
        gradient is taken in λ, for mirror descent.
    central_difference (ours): p's gradient above is a forward difference in σ = 1/α (arXiv 2509.02937), bias
        O(1/α); the central one has bias O(1/α²): u descends α·L_train − L_val and p's gradient is
        (α/2)·J·(ℓ(w) − ℓ(u)). It needs α·L_train − L_val bounded below, which a language model need not be.
    Raises FloatingPointError before any update if a value is not finite (one host read for all of them).
    """
    weights = torch.softmax(source_logits.detach(), dim=0)
    # ∇_u α·L_train(u, λ)  [central: − L_val(u)]
    lower_losses, lower_val_loss, lower_checks = lower_objective(penalty_alpha * weights,
                                                                 -1.0 if central_difference else 0.0)
    # ∇_w L_val(w) + α·L_train(w, λ)
    upper_losses, val_loss, upper_checks = upper_objective(penalty_alpha * weights, 1.0)
    check_finite(lower_losses=lower_losses, lower_val_loss=lower_val_loss, **lower_checks,
                 upper_losses=upper_losses, val_loss=val_loss, **upper_checks)
    # ∇_p α·(L_train(w, λ) − L_train(u, λ)), in closed form from the losses and set by hand: no backward for p
    source_logits_grad = source_logits_gradient(weights, upper_losses, lower_losses,
                                                penalty_alpha / 2 if central_difference else penalty_alpha,
                                                mirror=source_logits_optimizer.param_groups[0].get('mirror', False))
    source_logits.grad = source_logits_grad.to(source_logits.dtype)
    for optimizer in (lower_optimizer, upper_optimizer, source_logits_optimizer):  # the three update lines
        step_and_clear(optimizer)
    return dict(weights=weights, lower_losses=lower_losses, upper_losses=upper_losses,
                val_loss=val_loss, source_logits_grad=source_logits_grad)


# p's update rules, chosen by --source_logits_update: the optimizer, its step size unless --source_logits_lr gives
# one, and whether the step is taken on the gradient in λ (mirror descent, see source_logits_gradient). Both follow the warmup +
# cosine schedule of u and w, as in the authors' code: p's gradient is measured by u and w, and a p that keeps
# moving once they have stopped runs to a vertex of the simplex.
SOURCE_LOGITS_UPDATES = {
    # the authors' update: torch's AdamW with its default betas (0.9, 0.999), rate 1e-2 (both releases). Their
    # weight decay on p is torch's default 0.01 by accident (p's optimizer is built before weight decay is set)
    # and pulls p towards uniform weights; here it is --source_logits_weight_decay, 0 by default
    'adam': dict(optimizer='adam', lr=1e-2, mirror=False),
    # an option of ours: a plain step on the gradient in λ, p ← p − η·α·(d − λᵀd), is λ ← λ ⊙ exp(−η·α·d) / Z,
    # mirror descent on the simplex with the entropy (exponentiated gradient, Kivinen & Warmuth 1997; DoReMi's
    # domain-weight update, arXiv 2305.10429). It lacks ∇_p's factor λ_i, so a source near weight 0 still feels its
    # gradient and can come back, where steps on p stall at a vertex. Its step grows with α, so its rate must
    # shrink as α grows (docs/results.md)
    'mirror': dict(optimizer='sgd', lr=0.1, mirror=True),
}


def make_source_logits_optimizer(source_logits, update='adam', lr=0.0, weight_decay=0.0):
    """p's optimizer for SOURCE_LOGITS_UPDATES[update] at the base step size lr (0: the rule's own). Its param
    group keeps the base as 'initial_lr' (as torch's schedulers do: each step's size is initial_lr × the
    schedule, train.py's set_schedules) and 'mirror', which scalebio_step reads."""
    rule = SOURCE_LOGITS_UPDATES[update]
    lr = lr or rule['lr']
    if rule['optimizer'] == 'adam':  # decoupled weight decay, as the authors' torch.optim.AdamW
        optimizer = torch.optim.AdamW([source_logits], lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD([source_logits], lr=lr, weight_decay=weight_decay)
    optimizer.param_groups[0].update(initial_lr=lr, mirror=rule['mirror'])
    return optimizer


def step_and_clear(optimizer):
    """An update of scalebio_step: the optimizer applied to the gradient left behind, then the gradient
    dropped (set to None, never zeroed: AdamW still moves a parameter whose gradient is a zero tensor)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def penalty_schedule(step, penalty_alpha, alpha_growth=1.0, alpha_interval=0):
    """α at `step`, and the factor for u's and w's step sizes. Constant α by default (all of the authors' released
    runs); optionally α × τ every alpha_interval steps with u's and w's steps ÷ τ (the authors' τ schedule: their
    gradients scale with α). p's step is not divided, unlike the authors': its gradient estimates the
    hypergradient, O(1) in α, and on theory/'s quadratics dividing it stalls p after a few growths."""
    if alpha_interval <= 0 or alpha_growth == 1.0:
        return penalty_alpha, 1.0
    growth = alpha_growth ** (step // alpha_interval)
    return penalty_alpha * growth, 1.0 / growth


def cosine_lr(step, max_steps, warmup_steps, min_ratio=0.0):
    """Multiplier of the base learning rate: linear warmup, then cosine decay to min_ratio at max_steps.
    One shape for u, w and p, as in the authors' code (which decays to 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
