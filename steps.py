"""
One ScaleBiO step on two GPT copies, and the rows it sees. scalebio_train_step (train.py's loop calls it) takes
this rank's rows of the step's batches; scalebio_gpt_step wires the copies, their optimizers and p into
bilevel.scalebio_step, which knows nothing of GPTs; model_objective is the callback it runs for each copy. The
baselines' steps (baselines.py) have the same signature, `step(run, step, alpha) -> dict`, so train.py's loop
calls whichever --method names.

ScaleBiO's batches are STRATIFIED: every training batch holds `batch_per_source` rows from EACH source, so
every source's mean loss exists at every step. (The authors' code counts sources per micro-batch, so a rare
source is often absent and silently gets zero weight.) Stage two draws as many rows in all, each source's in
proportion to its weight (proportional_rows). The rows of step t are a pure function of
(seed, split, t), not of a generator's running state: a resumed run, or a run split over any number of
processes, sees exactly the same global batch at every step.

A `Run` holds what a step needs: the config, the model copies, their optimizers and p. train.py builds one
for a training run; tools/bench.py builds one to time the same step.
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bilevel import check_finite, scalebio_step, step_and_clear
from config import TrainConfig
from model import target_counts

# the second entry of every random key, so that different splits never share a random stream
TRAIN_KEY, VAL_KEY, EVAL_KEY = 0, 1, 2


@dataclass
class Run:
    """What a step reads and updates; the fields after received_sum are train.py's own bookkeeping."""
    cfg: TrainConfig
    models: list                        # [lower_model u, upper_model w] for ScaleBiO; [model] for a baseline
    optimizers: list = None             # AdamW, one per model copy
    source_logits: torch.Tensor = None  # p, λ = softmax(p); replicated on every rank, not sharded
    source_logits_optimizer: torch.optim.Optimizer = None
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()  # bf16 on one GPU; FSDP does its own
    micro_steps: int = 1                # forwards per copy per step (gradient accumulation)
    data: object = None                 # data.SourceData
    device: str = 'cpu'
    rank: int = 0
    world_size: int = 1
    fixed_weights: torch.Tensor = None  # fixed: the loss weights of the sources
    rows_per_source: list = None        # fixed, --sampling=proportional: each step's rows from each source
    reference_model: torch.nn.Module = None  # rholoss: the model whose losses are irreducible
    received_sum: torch.Tensor = None   # baselines: the share of each step each source received, summed
    # train.py's bookkeeping
    grad_bytes: int = 0                 # the most gradient bytes alive at once, all copies (train.count_gradient_bytes)
    model_config: object = None         # model.GPTConfig of both copies
    eval_sets: dict = None              # split -> fixed evaluation batches
    data_fingerprint: dict = None       # rank 0: the data's files, sizes and SHA-256s (checkpoint.data_fingerprint)
    best_val_loss: float = math.inf
    lower_val_start: float = None       # the lower copy's val loss at step 0 (central difference), for the guard
    lower_val_rises: int = 0            # evaluations in a row at which it was above the guard's margin
    train_time: float = 0.0             # seconds spent in steps (not evaluation or checkpoints)


# ----------------------------------------------------------------------------------------------
# the step

def scalebio_train_step(run, step, alpha):
    """ScaleBiO's step of train.py's loop: this rank's rows of the step's batches, then scalebio_gpt_step.
    Returns λ = softmax(p) after the update, and L_val(w) for the progress bar."""
    x, y = step_rows(run, step)
    val_x, val_y = validation_rows(run, step, run.cfg.val_batch)
    result = scalebio_gpt_step(run, x, y, val_x, val_y, alpha)
    return {'weights': torch.softmax(run.source_logits.detach(), 0), 'loss': result['val_loss']}


def scalebio_gpt_step(run, x, y, val_x, val_y, alpha):
    """bilevel.scalebio_step on the run's two GPT copies and p, with this rank's rows of one training batch
    (shared by both copies) and of one validation batch. Returns scalebio_step's dict."""
    cfg, (lower_model, upper_model), n_sources = run.cfg, run.models, run.source_logits.numel()
    lower_optimizer, upper_optimizer = run.optimizers
    lower_val = (val_x, val_y) if cfg.central_difference else (None, None)  # u descends α·L_train − L_val
    # both copies' gradients carry the factor α, so the threshold scales with it, as the authors clip at α (their
    # second release, --clip_model): a fixed threshold would clip more of the ordinary steps the larger α is
    max_norm = cfg.grad_clip * alpha
    # --lower_first: u steps before w's forward, so one copy's gradients exist at a time. The same numbers (w's
    # objective never reads u), but a non-finite loss of w is found after u has stepped
    lower_objective = model_objective(run, lower_model, x, y, *lower_val, n_sources, max_norm, 'lower',
                                      update_now=lower_optimizer if cfg.lower_first else None)
    upper_objective = model_objective(run, upper_model, x, y, val_x, val_y, n_sources, max_norm, 'upper')
    return scalebio_step(run.source_logits, alpha, lower_objective, upper_objective,
                         lower_optimizer, upper_optimizer, run.source_logits_optimizer, cfg.central_difference)


def model_objective(run, model, x, y, val_x, val_y, n_groups, max_norm, name='model', update_now=None):
    """bilevel.scalebio_step's objective for one model on this rank's host rows x, y (n_groups equal groups, one
    per source) and val_x, val_y: backward in run.micro_steps pieces, the gradient clipped at max_norm; ℓ and L_val
    averaged over ranks (FSDP averages the gradients itself; p's gradient must agree on every rank). ℓ_i, with
    --source_loss=token, is source i's token sum over the global batch's tokens per source, so every token weighs
    λ_i alike; with 'example', the mean of its rows' token means. update_now: an optimizer applied as soon as the
    values are checked (--lower_first; scalebio_step then finds no gradient left to apply)."""
    micro_steps, token_mean, device = run.micro_steps, run.cfg.source_loss == 'token', run.device

    def objective(source_coeffs, val_coeff):
        T = x.size(-1)
        source_losses = val_loss = 0.0
        if val_coeff:  # L_val is a token mean over the GLOBAL validation batch: each rank divides its token
            # sum by the mean count per rank, and FSDP's average over ranks completes the global mean
            val_tokens = mean_over_ranks(target_counts(val_y, torch.float64).sum().to(device))
        if token_mean:  # a source's token sum over the GLOBAL batch's tokens per source (not over its own)
            source_tokens = mean_over_ranks(target_counts(y, torch.float64).sum().to(device)) / n_groups
        for k in range(micro_steps):
            rows_x, rows_y = (t.view(n_groups, micro_steps, -1, T)[:, k].reshape(-1, T) for t in (x, y))
            n_train = rows_x.size(0)
            counts = target_counts(rows_y, torch.float64).view(n_groups, -1).to(device) if token_mean else None
            if val_coeff:  # one forward for training and validation rows
                rows_x = torch.cat([rows_x, val_x.view(micro_steps, -1, T)[k]])
                rows_y = torch.cat([rows_y, val_y.view(micro_steps, -1, T)[k]])
            rows_x, rows_y = device_rows(run, rows_x, rows_y)
            with run.autocast:
                _, row_loss = model(rows_x, rows_y)
            rows = row_loss[:n_train].view(n_groups, -1)  # rows grouped by source
            piece = (rows * (counts / source_tokens).to(rows.dtype)).sum(dim=1) if token_mean \
                else rows.mean(dim=1) / micro_steps
            total = (source_coeffs.to(piece.dtype) * piece).sum()
            if val_coeff:
                val_rows = row_loss[n_train:]
                val_piece = (val_rows * target_counts(rows_y[n_train:], val_rows.dtype)).sum() / val_tokens
                total = total + val_coeff * val_piece
                val_loss = val_loss + val_piece.detach()
            total.backward()
            source_losses = source_losses + piece.detach()
        source_losses, val_loss = mean_over_ranks(source_losses), mean_over_ranks(val_loss) if val_coeff else None
        checks = {f'{name}_gradient_norm': clip_gradient(model, max_norm)}
        if update_now is not None:
            check_finite(**{f'{name}_losses': source_losses, f'{name}_val_loss': val_loss}, **checks)
            step_and_clear(update_now)
        return source_losses, val_loss, checks
    return objective


def clip_gradient(model, max_norm):
    """Clips the model's gradient norm to max_norm (0: only measures it) and returns the norm, for the caller to
    check with the losses (a finite loss can still give a NaN gradient: clipping by a NaN norm makes every
    gradient NaN). No host read here: the checks of a step are read back once (bilevel.check_finite)."""
    grads = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded gradients give a sharded norm


def device_rows(run, x, y):
    """Host rows x, y for one forward, cropped to the longest row's last target (--crop_padding, crop_to_targets)
    and moved to the run's device."""
    if run.cfg.crop_padding:  # compiled blocks: lengths in multiples of 64, so at most block_size / 64 graphs
        x, y = crop_to_targets(x, y, 64 if run.cfg.compile else 1)
    return x.to(run.device), y.to(run.device)


def crop_to_targets(x, y, multiple=1):
    """Rows x, y (B, T) cut after the last position where any row has a target, the length rounded up to `multiple`.
    No row's loss changes (attention is causal; a cut position has no target), and padded instruction rows cost the
    longest row, not block_size (as the ScaleBiO and LMFlow trainers pad to the longest). On the host: no sync."""
    has_target = (y != -1).any(dim=0).nonzero()
    length = int(has_target[-1]) + 1 if len(has_target) else 1
    length = min(x.size(1), -(-length // multiple) * multiple)
    return x[:, :length], y[:, :length]


def mean_over_ranks(tensor):
    """The mean of a tensor over ranks, in place (gloo has no AVG reduction, hence SUM then divide): each rank
    holds its rows' losses, and their mean is the global batch's."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


# the central difference's lower copy descends α·L_train − L_val, which a language model can drive down without
# bound by raising its validation loss; the guard stops a run whose u does that, before the loss doubles
LOWER_GUARD_MARGIN = 0.25


def guard_lower_copy(run, lower_val, done):
    """Raises ValueError when u's validation loss is above its step-0 value by more than LOWER_GUARD_MARGIN
    (relative) at two evaluations in a row. Every rank evaluates the same batches, so all stop together."""
    limit = run.lower_val_start * (1 + LOWER_GUARD_MARGIN)
    run.lower_val_rises = run.lower_val_rises + 1 if lower_val > limit else 0
    if run.lower_val_rises >= 2:
        raise ValueError(f"the lower copy's validation loss rose from {run.lower_val_start:.4f} at step 0 to "
                         f"{lower_val:.4f} at step {done}, above {limit:.4f} at two evaluations in a row: under the "
                         f"central difference it descends α·L_train − L_val, which is unbounded below here; run with "
                         f"--central_difference=False (or a larger --penalty_alpha)")


def tokens_per_step(cfg, n_sources):
    """Tokens through forward and backward per step: ScaleBiO's two copies see the training batch, w (and, with
    the central difference, u) the validation batch."""
    if cfg.method != 'scalebio':
        return n_sources * cfg.batch_per_source * cfg.block_size
    return 2 * n_sources * cfg.batch_per_source * cfg.block_size \
        + cfg.val_batch * cfg.block_size * (2 if cfg.central_difference else 1)


# ----------------------------------------------------------------------------------------------
# the rows of a step: pure functions of (seed, split, step), the same global batch for any number of processes

def step_rows(run, step, rows_per_source=None):
    """This rank's host rows of the step's training batch: batch_per_source rows from each source, each rank taking
    its share of every source's; or rows_per_source[i] from source i, each rank an equal share of the whole."""
    cfg, n_groups = run.cfg, 1 if rows_per_source else len(run.data.sources)
    rows = train_batch(run.data, step, rows_per_source or cfg.batch_per_source, cfg.block_size, cfg.seed)
    return [rank_rows(t, n_groups, run.rank, run.world_size) for t in rows]


def validation_rows(run, step, n_rows):
    """This rank's rows of the step's validation batch of n_rows rows (validation_batch), on the host."""
    cfg = run.cfg
    rows = validation_batch(run.data, step, n_rows, cfg.block_size, cfg.seed)
    return [rank_rows(t, 1, run.rank, run.world_size) for t in rows]


def train_batch(data, step, rows_per_source, block_size, seed):
    """The global training batch of `step`, source after source: rows_per_source[i] rows from source i, or, for
    an int B, B rows from each (the stratified batch: rows [i*B, (i+1)*B) come from source i)."""
    rng = np.random.default_rng([seed, TRAIN_KEY, step])
    counts = [rows_per_source] * len(data.train) if isinstance(rows_per_source, int) else rows_per_source
    xs, ys = zip(*(_rows(tokens, n, block_size, rng) for tokens, n in zip(data.train, counts)))
    return torch.cat(xs), torch.cat(ys)


def validation_batch(data, step, n_rows, block_size, seed):
    """The validation batch of `step`, for the upper-level objective L_val."""
    return _rows(data.val, n_rows, block_size, np.random.default_rng([seed, VAL_KEY, step]))


def rank_rows(batch, n_groups, rank, world_size):
    """This process's slice of a global batch made of n_groups equal groups of rows (the sources): the same
    share of every group, so per-source means averaged over processes are means over the global batch."""
    return batch.view(n_groups, world_size, -1, batch.size(-1))[:, rank].reshape(-1, batch.size(-1))


def _rows(tokens, n_rows, block_size, rng):
    """n_rows random rows -> inputs x and next-token targets y, (n_rows, T): windows of block_size+1
    tokens of a stream, or whole examples."""
    if tokens.ndim == 3:
        examples = torch.from_numpy(tokens[rng.integers(0, len(tokens), n_rows)])
        return examples[:, 0], examples[:, 1]
    starts = rng.integers(0, len(tokens) - block_size, n_rows)
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def proportional_rows(weights, n_rows):
    """Rows per source out of n_rows, in proportion to the weights λ (on the simplex; stage two as the paper runs
    it): each source gets ⌊λ_i·n⌋, and the rows left over go to the largest remainders (Hamilton's method), ties
    to the earlier source. Equal weights give every source n / S rows, the stratified batch. The counts are the
    same at every step, so each source's share is λ_i rounded to a multiple of 1/n, never more than 1/n off."""
    exact = [float(w) * n_rows for w in weights]
    counts = [math.floor(x + 1e-9) for x in exact]  # 1e-9: 1/3·48 may be 15.999999999999998
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:n_rows - sum(counts)]:
        counts[i] += 1
    return counts


def evaluation_batches(data, split, n_batches, n_rows, block_size, seed):
    """A fixed list of batches for evaluation: split is 'val', 'test' or a source's name."""
    tokens = {'val': data.val, 'test': data.test, **dict(zip(data.sources, data.train))}[split]
    split_index = (['val', 'test'] + data.sources).index(split)
    return [_rows(tokens, n_rows, block_size, np.random.default_rng([seed, EVAL_KEY, split_index, k]))
            for k in range(n_batches)]
