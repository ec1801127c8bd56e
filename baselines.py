"""
Baselines: what a user would pick instead of ScaleBiO, on the same batches and the same model, and stage two
of the paper's protocol. Each is one model trained by an online rule, in a step with the signature
of ScaleBiO's (steps.py): `step(run, step, alpha) -> dict`. None learns weights over sources, so each reports
the share of each step's training signal that each source received, averaged over the run.

    python train.py --method=fixed --weights=out/summary.json --out_dir=out-stage2  # stage two: learned weights
    python train.py --method=fixed --weights=val_only --out_dir=out-val    # train on the validation split alone
    python train.py --method=irdro --out_dir=out-irdro
    python train.py --method=rholoss --reference=out-val --out_dir=out-rho  # reference model: the run above

- irdro: instance-reweighted DRO (Chen et al. 2024, "Take the Bull by the Horns", arXiv 2402.14270): each
  example of a batch is weighted ∝ exp(loss/τ), the closed-form solution of max_w Σ_i w_i·ℓ_i − τ·KL(w‖uniform)
  over the simplex: hard examples count more, and τ → ∞ is plain uniform training.
- rholoss: reducible holdout loss selection (Mindermann et al. 2022, "Prioritized Training on Points that
  are Learnable, Worth Learning, and Not Yet Learnt", arXiv 2206.07137): a reference model trained on
  held-out data (here: the validation split) gives each example an irreducible loss; each step trains on
  the examples with the largest ℓ(x; θ) − ℓ(x; θ_ref) out of a larger candidate batch. Noise has a high
  irreducible loss, learnt examples a low current loss: both are skipped.
"""
import json
import math
import os

import torch
import torch.distributed as dist

from bilevel import check_finite, step_and_clear
from checkpoint import load_best_model
from data import read_bytes
from fsdp import gather_over_ranks, rank0_decides
from steps import clip_gradient, device_rows, model_objective, rank_rows, step_rows, train_batch, validation_rows


def irdro_row_weights(row_losses, temperature):
    """IR-DRO's weights for a batch of per-example losses: softmax(ℓ/τ), summing to 1."""
    return torch.softmax(row_losses / temperature, dim=0)


def rholoss_select(losses, irreducible_losses, n_select):
    """Indices (ascending) of the n_select examples with the largest reducible loss ℓ − ℓ_ref."""
    return torch.topk(losses - irreducible_losses, n_select).indices.sort().values


def _rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def irdro_backward(model, x, y, n_sources, temperature, autocast):
    """Forward and backward of Σ_j w_j·ℓ_j over the GLOBAL batch (this rank holds its share of every
    source's rows, as steps.rank_rows cuts them), w = irdro_row_weights. Returns the weight each source
    received in this step (its rows' w summed) and the per-source mean losses over the global batch."""
    rank, world_size = _rank_and_world()
    with autocast:
        _, row_loss = model(x, y)
    every_row = gather_over_ranks(row_loss.detach())  # (world_size, rows): the weights need all of them
    weights = irdro_row_weights(every_row.flatten(), temperature).view(world_size, -1)
    # FSDP averages gradients over ranks, hence the factor world_size: the result is Σ_j w_j·∇ℓ_j
    (world_size * (weights[rank].to(row_loss.dtype) * row_loss).sum()).backward()
    received = weights.view(world_size, n_sources, -1).sum(dim=(0, 2))
    return received, every_row.view(world_size, n_sources, -1).mean(dim=(0, 2))  # the same on every rank


@torch.no_grad()
def _row_losses(model, x, y, autocast):
    training = model.training
    model.eval()
    with autocast:
        _, row_loss = model(x, y)
    model.train(training)
    return row_loss


def rholoss_backward(model, reference_model, x, y, n_sources, n_select, autocast):
    """x, y: the step's GLOBAL candidate batch (n_sources equal groups of rows), the same on every rank.
    Each rank scores its share of the candidates (steps.rank_rows), the scores are gathered, so every rank
    selects the same n_select examples with the largest reducible loss, and each rank trains on an equal
    share of them (forward and backward of their mean loss). Returns the fraction of the selected examples
    that came from each source, and the mean loss per source of all candidates."""
    rank, world_size = _rank_and_world()
    mine_x, mine_y = (rank_rows(t, n_sources, rank, world_size) for t in (x, y))

    def in_global_order(row_losses):  # rank_rows gives each rank the same share of every source's rows
        return gather_over_ranks(row_losses).view(world_size, n_sources, -1).transpose(0, 1).flatten()
    losses = in_global_order(_row_losses(model, mine_x, mine_y, autocast))
    selected = rholoss_select(losses, in_global_order(_row_losses(reference_model, mine_x, mine_y, autocast)),
                              n_select)
    mine = selected.view(world_size, -1)[rank]
    with autocast:
        _, row_loss = model(x[mine], y[mine])
    row_loss.mean().backward()  # FSDP's average over ranks makes it the mean over all selected examples
    per_source = x.size(0) // n_sources
    received = torch.bincount(selected // per_source, minlength=n_sources).to(losses.dtype) / n_select
    return received, losses.view(n_sources, -1).mean(dim=1)


def fixed_weights(spec, sources, digests=None):
    """Source weights for --method=fixed: 'uniform', or the weights a scalebio run wrote to its summary.json (its
    [bytes, SHA-256] put in digests, as read_bytes does)."""
    if spec == 'uniform':
        return torch.full((len(sources),), 1.0 / len(sources), dtype=torch.float64)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--weights: no file {spec} (give 'uniform' or a summary.json)")
    try:
        summary = json.loads(read_bytes(spec, {} if digests is None else digests))
    except ValueError:  # not JSON, or not UTF-8
        summary = None
    if not isinstance(summary, dict) or 'weights' not in summary:
        raise ValueError(f"--weights={spec} is not a summary.json (give 'uniform' or a scalebio run's summary.json)")
    if summary.get('sources') != sources:
        raise ValueError(f"--weights: {spec} has sources {summary.get('sources')}, the data has {sources}")
    weights = summary['weights']
    if not (isinstance(weights, list) and len(weights) == len(sources)
            and all(type(w) in (int, float) and 0 <= w < math.inf for w in weights)  # true is not 1
            and abs(sum(weights) - 1) < 1e-3):
        raise ValueError(f"--weights: {spec} has weights {weights}: one per source, each 0 or more, summing to 1")
    return torch.tensor(weights, dtype=torch.float64) / sum(weights)  # exactly 1, as λ on the simplex


def fixed_step(run, step, alpha):
    """Stage two: one model descends the lower level's objective L_train(θ, λ) with the weights fixed, on the
    stratified batch with each source's loss weighted (--sampling=stratified), or on a batch drawn in proportion
    to the weights, every row alike (proportional: the same objective with the weights rounded to multiples of
    1/rows, and no rows of near-zero weight). --weights=val_only: the mean loss of as many rows of the validation
    split (no training source)."""
    cfg, n_sources, dtype = run.cfg, len(run.data.sources), run.received_sum.dtype
    coeffs = torch.ones(1, device=run.device, dtype=dtype)  # one group of rows: the batch's mean loss
    if cfg.weights == 'val_only':
        (x, y), n_groups = validation_rows(run, step, n_sources * cfg.batch_per_source), 1
        received = torch.zeros(n_sources, device=run.device, dtype=dtype)
    elif cfg.sampling == 'proportional':
        (x, y), n_groups = step_rows(run, step, run.rows_per_source), 1
        received = torch.tensor(run.rows_per_source, device=run.device, dtype=dtype) / sum(run.rows_per_source)
    else:
        (x, y), n_groups, received, coeffs = step_rows(run, step), n_sources, run.fixed_weights, run.fixed_weights
    losses, _, checks = model_objective(run, run.models[0], x, y, None, None, n_groups, run.cfg.grad_clip)(coeffs, 0.0)
    check_finite(source_losses=losses, **checks)
    step_and_clear(run.optimizers[0])
    return received_so_far(run, step, received, losses)


def irdro_step(run, step, alpha):
    """IR-DRO on the step's stratified batch: each row weighted by irdro_row_weights over the global batch."""
    x, y = device_rows(run, *step_rows(run, step))
    received, losses = irdro_backward(run.models[0], x, y, len(run.data.sources), run.cfg.dro_temperature,
                                      run.autocast)
    return clip_and_step(run, step, received, losses)


def rholoss_step(run, step, alpha):
    """The step's GLOBAL candidate batch, rho_candidates times the training batch, scored by the ranks together."""
    cfg, n_sources = run.cfg, len(run.data.sources)
    cx, cy = (t.to(run.device) for t in train_batch(run.data, step, cfg.rho_candidates * cfg.batch_per_source,
                                                    cfg.block_size, cfg.seed))
    received, losses = rholoss_backward(run.models[0], run.reference_model, cx, cy, n_sources,
                                        n_sources * cfg.batch_per_source, run.autocast)
    return clip_and_step(run, step, received, losses)


def clip_and_step(run, step, received, losses):
    check_finite(source_losses=losses, gradient_norm=clip_gradient(run.models[0], run.cfg.grad_clip))
    step_and_clear(run.optimizers[0])
    return received_so_far(run, step, received, losses)


def received_so_far(run, step, received, losses):
    """The step's dict: each source's share of the training signal averaged over steps 0..step, and the mean
    of the per-source losses for the progress bar."""
    run.received_sum += received.to(run.received_sum.dtype)
    return {'weights': run.received_sum / (step + 1), 'loss': losses.mean()}


def load_reference(run_dir, model_config, data, seed, fingerprint):
    """RHO-LOSS's reference model: the best model of a finished --method=fixed --weights=val_only run (its
    out_dir/best) on the same data, byte for byte, with the same tokenizer (fingerprint: this run's files, rank 0)."""
    if not run_dir:
        raise ValueError("--method=rholoss needs --reference=<out_dir of a --method=fixed --weights=val_only run>")
    model, meta = load_best_model(run_dir)
    if (model.config.vocab_size, model.config.block_size) != (model_config.vocab_size, model_config.block_size):
        raise ValueError(f"--reference={run_dir}: its model's vocabulary and context must be this run's")
    if os.path.realpath(meta.get('data', data)) != os.path.realpath(data):  # one folder, however spelled
        raise ValueError(f"--reference={run_dir} was trained on --data={meta['data']}, this run is on {data}")
    if meta.get('seed', seed) != seed:  # a built-in task's splits are drawn from the seed
        raise ValueError(f"--reference={run_dir} was trained with --seed={meta['seed']}, this run has --seed={seed}")
    if (meta.get('method'), meta.get('weights')) != ('fixed', 'val_only'):
        raise ValueError(f"--reference={run_dir} is not a --method=fixed --weights=val_only run (its best/meta.json: "
                         f"method {meta.get('method')}, weights {meta.get('weights')})")

    def same_files():  # the data and tokenizer files, as each run read them
        theirs, ours = ({k: v for k, v in (files or {}).items() if not k.startswith('reference/')}
                        for files in (meta.get('data_files'), fingerprint))
        changed = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        if changed:
            raise ValueError(f"--reference={run_dir} read other data or tokenizer files than this run: {changed[0]} "
                             f"differs; train the reference on this run's")
    rank0_decides(same_files)
    return model

