"""
LISA: Layerwise Importance Sampling (Pan et al. 2024, arXiv 2403.17919, Algorithm 1), written by hand.

Embeddings, the final norm and the head always train. Every `interval` steps, exactly `n_active` of the
transformer blocks are drawn uniformly without replacement and unfrozen; all other blocks are frozen, so
their weight gradients are never computed and they hold no optimizer state. Memory then scales with the
active fraction instead of the model.

Two details the reference implementations (LMFlow's LISA trainer, the ScaleBiO authors' code) get wrong:
- They never drop the AdamW moments of blocks that go inactive, so over a run the state creeps back up to
  the size of full fine-tuning. Here a block that goes inactive loses its state at the switch; a block
  drawn again at the next switch keeps its state; a block that becomes active starts fresh.
- A frozen parameter must have grad=None, not a zero tensor: AdamW still moves a parameter with a zero
  gradient, through its momentum and weight decay. Clear gradients with zero_grad(set_to_none=True).

ScaleBiO has two model copies, and which blocks each trains is a choice that moves the learned weights:
set_lisa_blocks (at the end) gives both the same draw by default. p's update is the same with LISA as without.
Usage, once per step, before the forward pass (it is idempotent between switches):
    set_lisa_blocks([(u.blocks, u_optimizer), (w.blocks, w_optimizer)], n_active, seed, step // interval)
"""
import numpy as np
import torch


def draw_active_blocks(n_layer, n_active, seed, switch_index, copy_index=0):
    """The blocks that train during LISA interval `switch_index`, sorted.

    A pure function of its arguments, not of a generator's running state, so a resumed run and every
    process of a distributed run draw the same blocks without saving or broadcasting anything.
    `copy_index` gives each model copy a draw of its own (set_lisa_blocks' independent draws).
    n_active = 0 or >= n_layer turns LISA off: every block trains.
    """
    if n_active <= 0 or n_active >= n_layer:
        return list(range(n_layer))
    rng = np.random.default_rng([seed, copy_index, switch_index])
    return sorted(rng.choice(n_layer, size=n_active, replace=False).tolist())


def set_active_blocks(blocks, optimizer, active):
    """Unfreezes blocks[i] for i in `active`, freezes the others and drops their optimizer state.

    The optimizer holds every parameter of the model from the start; torch's Adam/AdamW skip parameters
    whose grad is None and create state lazily, so an unfrozen block's state starts fresh at its first step.
    """
    for i, block in enumerate(blocks):
        for param in block.parameters():
            param.requires_grad_(i in active)
            if i not in active:
                param.grad = None
                optimizer.state.pop(param, None)
    return active


LISA_DRAWS = ('shared', 'independent')


def set_lisa_blocks(copies, n_active, seed, switch_index, draw='shared', merge_frozen=False):
    """LISA for ScaleBiO's model copies, `copies` = [(blocks, optimizer), ...] (u, then w).

    draw='shared' (the default, our one deviation from the authors): every copy trains the same blocks. p's
    gradient is α·J·(ℓ(w) − ℓ(u)), and w − u must be the O(1/α) response to the validation term alone. Both
    copies take the same kind of step on the same batch, so whatever else moves them (the batch's noise, the
    common drift of training) moves them alike and cancels in ℓ(w) − ℓ(u), as the shared batch makes the noise
    cancel (bilevel.py) -- but only if they move the same coordinates. draw='independent' (the authors' code)
    lets u train blocks A while w trains blocks B: w − u then carries O(1) differences that α multiplies: on
    theory/'s quadratics the loop ends 0.11-0.65 from the penalty's solution s_α at α = 100 (theory/README.md).
    A frozen block keeps its values in both copies, so a block-coordinate step leaves the fixed point of the
    penalty where it is.

    merge_frozen (an option, shared draw only): a block that freezes at this switch takes the mean of the copies'
    values in both, so that ℓ(w) − ℓ(u) reads only the blocks trained since the last switch. It moves the fixed
    point: on theory/'s quadratics the loop then ends away from s_α by a bias that a larger α does not remove
    (theory/README.md), and it overwrites w's fit to the validation data in every frozen block, in the
    exported model too.
    """
    if merge_frozen and draw == 'shared' and len(copies) == 2:
        active = draw_active_blocks(len(copies[0][0]), n_active, seed, switch_index)
        for i, (block_u, block_w) in enumerate(zip(copies[0][0], copies[1][0])):
            if i not in active and any(p.requires_grad for p in block_u.parameters()):  # trained until now
                with torch.no_grad():
                    for p_u, p_w in zip(block_u.parameters(), block_w.parameters()):
                        p_u.add_(p_w).mul_(0.5)
                        p_w.copy_(p_u)
    for copy_index, (blocks, optimizer) in enumerate(copies):
        set_active_blocks(blocks, optimizer, draw_active_blocks(len(blocks), n_active, seed, switch_index,
                                                                copy_index if draw == 'independent' else 0))
