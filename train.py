"""
ScaleBiO data reweighting: learn how much weight each training source deserves (bilevel.py), on a
nanoGPT-style GPT (model.py), with LISA layer freezing (lisa.py), on multi-source data (data.py).

One process, CPU or one GPU:
    python train.py                                  # built-in `denoise` task, under 2 minutes on a laptop CPU
    python train.py --data=noise_ladder
    python train.py --data=path/to/folder            # train_<source>.txt ..., val.txt, test.txt
Stage two of the paper's protocol (a fresh model trained with fixed weights; never on the validation split):
    python train.py --method=fixed --weights=out/summary.json --out_dir=out-stage2
    python train.py --method=fixed --weights=uniform --out_dir=out-uniform
Baselines on the same batches (baselines.py; compare.py runs every method on every built-in task):
    python train.py --method=irdro      # or rholoss --reference=<out_dir of a val_only run>, fixed --weights=val_only
Continue an interrupted run (same arguments):
    python train.py ... --resume=True
Several processes, both model copies sharded with FSDP2 (fsdp.py); the global batch stays the same:
    torchrun --standalone --nproc_per_node=8 train.py --model=gpt2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
Every field of TrainConfig below can be set as --field=value.

Writes to out_dir: log.jsonl (one JSON line every eval_interval steps), summary.json (at the end),
ckpt/ (everything needed to resume, one shard per rank) and best/ (the upper model with the best val loss).
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bilevel import (LOGITS_UPDATES, check_finite, cosine_lr, logits_lr, make_logits_optimizer, penalty_schedule,
                     scalebio_step, update_logits)
from baselines import irdro_step, load_reference, rholoss_step
from data import eval_batches, fixed_weights, load_data, load_tokenizer, rank_rows, train_batch, val_batch
from fsdp import (evaluate, full, full_state_dict, init_distributed, load_checkpoint, local_bytes, mean_over_ranks,
                  rank_bytes, read_meta, save_checkpoint, shard, warm_up)
from lisa import draw_active_blocks, set_active_blocks
from model import GPT, GPT2_SHAPES, GPTConfig, export_pretrained, make_optimizer, target_counts


@dataclass
class TrainConfig:
    # data
    data: str = 'denoise'           # 'denoise', 'noise_ladder', 'mixture', 'dilution' or a folder (data.py)
    tokenizer: str = 'bytes'        # or a local folder: tokenizer.json, or GPT-2's vocab.json + merges.txt
    seed: int = 0
    batch_per_source: int = 16      # training rows per source per step (stratified batches)
    val_batch: int = 32             # validation rows per step, for L_val
    micro_batch: int = 0            # rows per source per forward on each rank (gradient accumulation); 0: all
    # model, trained from scratch
    model: str = ''                 # a GPT-2 shape (gpt2, gpt2-medium, gpt2-large, gpt2-xl), or n_layer etc.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32
    dropout: float = 0.0
    bias: bool = True
    # method
    method: str = 'scalebio'        # 'scalebio' learns weights; 'fixed' uses given ones; baselines.py: 'irdro', 'rholoss'
    weights: str = 'uniform'        # fixed: 'uniform', 'val_only' (the val split alone) or a scalebio summary.json
    dro_temperature: float = 1.0    # irdro: τ in w ∝ exp(loss/τ) (the IR-DRO authors' default)
    reference: str = ''             # rholoss: the out_dir of a run whose best model gives irreducible losses
    rho_candidates: int = 4         # rholoss: each step selects a training batch out of this many times as many
    penalty_alpha: float = 10.0     # α (the authors: 10 for GPT-2, 100 for 8B-34B models)
    alpha_growth: float = 1.0       # τ: α is multiplied by τ every alpha_interval steps (1.0: constant α)
    alpha_interval: int = 0
    central_difference: bool = True  # u descends α·L_train − L_val: p's gradient has bias O(1/α²) (bilevel.py)
    # optimisation
    max_steps: int = 1500           # the horizon of the learning-rate schedule
    stop_at: int = 0                # stop (with a checkpoint) after this many steps; 0: run to max_steps
    lr: float = 1e-3                # AdamW for both model copies
    logits_update: str = 'mirror'   # p's update rule, one of bilevel.LOGITS_UPDATES (README, "p's update")
    logits_lr: float = 0.0          # its step size; 0: the rule's own (bilevel.LOGITS_UPDATES)
    weight_decay: float = 0.01      # model matrices only
    logits_weight_decay: float = 0.0  # explicit: the authors' code gets torch's 0.01 by accident
    warmup_steps: int = 30
    grad_clip: float = 1.0          # on each model's gradient norm; 0: off
    lisa_layers: int = 0            # blocks unfrozen at a time; 0 or >= n_layer: full fine-tuning (README)
    lisa_interval: int = 20         # steps between LISA switches
    # bookkeeping
    out_dir: str = 'out'
    eval_interval: int = 100
    eval_batches: int = 4           # batches of val_batch rows per split for evaluation
    ckpt_interval: int = 500
    resume: bool = False
    device: str = 'auto'            # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = 'float32'          # parameter dtype: float32, or float64 (exactness tests, CPU)
    amp: bool = True                # bf16 compute on CUDA (autocast, or FSDP's mixed precision); no effect on CPU
    compile: bool = False           # torch.compile each block (meant for CUDA)
    init_from: str = ''             # a local Hugging Face GPT-2 folder: both copies start from its weights
    export: bool = False            # at the end: out_dir/hf (the trained model, HF format), out_dir/mixture.json


# fields that may differ between a run and its resumption (not max_steps: the schedule's horizon)
RESUMABLE_CHANGES = {'resume', 'stop_at', 'out_dir', 'eval_interval', 'ckpt_interval', 'device'}


def override(cfg, argv):
    """Sets --field=value arguments on a dataclass, each parsed as the type of its default."""
    names = [f.name for f in dataclasses.fields(cfg)]
    for arg in argv:
        key, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            raise ValueError(f"argument '{arg}' is not of the form --field=value")
        if key not in names:
            raise ValueError(f"unknown config field '{key}'; valid fields: {', '.join(names)}")
        default = getattr(cfg, key)
        if isinstance(default, bool):
            if text.lower() not in ('true', 'false', '1', '0'):
                raise ValueError(f"--{key} expects True or False, got '{text}'")
            value = text.lower() in ('true', '1')
        else:
            try:
                value = type(default)(text)
            except ValueError:
                raise ValueError(f"--{key} expects {type(default).__name__}, got '{text}'") from None
        setattr(cfg, key, value)
    return cfg


def parse_config(argv):
    cfg = override(TrainConfig(), argv)
    for key, allowed in (('method', ('scalebio', 'fixed', 'irdro', 'rholoss')), ('dtype', ('float32', 'float64')),
                         ('logits_update', tuple(LOGITS_UPDATES)),
                         ('model', ('', *GPT2_SHAPES))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key} must be one of {', '.join(allowed).strip(', ')}, got '{getattr(cfg, key)}'")
    if cfg.method in ('irdro', 'rholoss') and cfg.micro_batch:
        raise ValueError(f"--micro_batch is not implemented for --method={cfg.method}")
    if cfg.export and not cfg.bias:
        raise ValueError("--export=True writes a Hugging Face GPT-2, which has biases: it needs --bias=True")
    if cfg.model:
        cfg.n_layer, cfg.n_head, cfg.n_embd = GPT2_SHAPES[cfg.model]
    for key in ('max_steps', 'lisa_interval', 'eval_interval', 'ckpt_interval', 'batch_per_source', 'val_batch',
                'eval_batches', 'block_size'):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(cfg, key)}")
    return cfg


def model_objective(model, x, y, val_x, val_y, n_sources, micro_steps, autocast):
    """The objective callable of bilevel.scalebio_step for one model on this rank's rows of the step's batch:
    backward of Σ_i coeff_i·ℓ_i(model) + val_coeff·L_val(model), in micro_steps accumulated pieces; returns
    (ℓ(model), L_val(model)) averaged over ranks, so that p's gradient is the same on every rank.
    (FSDP averages the model gradients over ranks itself; it knows nothing of p.)"""
    def objective(source_coeffs, val_coeff):
        T = x.size(-1)
        source_losses = val_loss = 0.0
        if val_coeff:  # L_val is a token mean over the GLOBAL validation batch: each rank divides its token
            # sum by the mean count per rank, and FSDP's average over ranks completes the global mean
            val_tokens = mean_over_ranks(target_counts(val_y, torch.float64).sum().to(x.device))
        for k in range(micro_steps):
            rows_x, rows_y = (t.view(n_sources, micro_steps, -1, T)[:, k].reshape(-1, T) for t in (x, y))
            n_train = rows_x.size(0)
            if val_coeff:  # one forward for training and validation rows
                rows_x = torch.cat([rows_x, val_x.view(micro_steps, -1, T)[k]])
                rows_y = torch.cat([rows_y, val_y.view(micro_steps, -1, T)[k]])
            with autocast:
                _, row_loss = model(rows_x, rows_y)
            piece = row_loss[:n_train].view(n_sources, -1).mean(dim=1) / micro_steps  # rows grouped by source
            total = (source_coeffs.to(piece.dtype) * piece).sum()
            if val_coeff:
                val_rows = row_loss[n_train:]
                val_piece = (val_rows * target_counts(rows_y[n_train:], val_rows.dtype)).sum() / val_tokens
                total = total + val_coeff * val_piece
                val_loss = val_loss + val_piece.detach()
            total.backward()
            source_losses = source_losses + piece.detach()
        return mean_over_ranks(source_losses), mean_over_ranks(val_loss) if val_coeff else None
    return objective


def optimizer_update(model, optimizer, grad_clip, grad_bytes):
    def update():
        grads = [p for p in model.parameters() if p.grad is not None]
        grad_bytes[model] = local_bytes(p.grad for p in grads)  # at their peak, for per_rank_state_bytes
        # clip_grad_norm_ with an infinite threshold only measures; a finite loss can still give a NaN gradient
        norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip if grad_clip > 0 else math.inf)
        check_finite(gradient_norm=full(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # never zeros: a frozen parameter with a zero grad still moves
    return update


def main(argv):
    cfg = parse_config(argv)
    rank, world_size, device, sharded = init_distributed(cfg.device)
    master = rank == 0  # only rank 0 prints, shows the progress bar and writes log.jsonl and summary.json
    say = print if master else (lambda *args, **kwargs: None)
    dtype = getattr(torch, cfg.dtype)
    bf16 = cfg.amp and device.startswith('cuda')
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if bf16 and not sharded else contextlib.nullcontext()
    torch.manual_seed(cfg.seed)
    ckpt_path, best_path = os.path.join(cfg.out_dir, 'ckpt'), os.path.join(cfg.out_dir, 'best')
    scalebio, val_only = cfg.method == 'scalebio', cfg.method == 'fixed' and cfg.weights == 'val_only'
    for key, rows in (('batch_per_source', cfg.batch_per_source), ('val_batch', cfg.val_batch)):
        if rows % world_size:
            raise ValueError(f"--{key}={rows} is the global count: it must divide among {world_size} processes")
    local_rows = cfg.batch_per_source // world_size
    micro_steps = local_rows // cfg.micro_batch if cfg.micro_batch else 1
    if local_rows % micro_steps or (cfg.val_batch // world_size) % micro_steps:
        raise ValueError(f"--micro_batch={cfg.micro_batch} must divide the {local_rows} rows per source and the "
                         f"{cfg.val_batch // world_size} validation rows each process gets into equal pieces")
    data = load_data(cfg.data, cfg.block_size, cfg.seed, load_tokenizer(cfg.tokenizer))
    sources, n_sources = data.sources, len(data.sources)
    if data.notes:  # examples truncated or dropped while loading
        say('\n'.join(data.notes))
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=data.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    # both copies start from the same weights (the authors load the same pretrained checkpoint twice)
    lower_model = GPT.from_pretrained(cfg.init_from) if cfg.init_from else GPT(model_config)
    model_config = lower_model.config
    if (model_config.vocab_size, min(model_config.block_size, cfg.block_size)) != (data.vocab_size, cfg.block_size):
        raise ValueError(f"--init_from: the model's vocabulary ({model_config.vocab_size}) must be the data's "
                         f"({data.vocab_size}), its context ({model_config.block_size}) at least {cfg.block_size}")
    cfg.n_layer, cfg.n_head, cfg.n_embd = model_config.n_layer, model_config.n_head, model_config.n_embd
    lower_model = lower_model.to(device=device, dtype=dtype)
    os.makedirs(cfg.out_dir, exist_ok=True)  # only once the inputs are known to be good
    say(f"number of parameters: {lower_model.num_params() / 1e6:.2f}M per copy; {world_size} process(es)")
    upper_model = copy.deepcopy(lower_model) if scalebio else None
    models = [lower_model, upper_model] if scalebio else [lower_model]
    for model in models:
        if cfg.compile:  # per block: LISA flips requires_grad, so each block has at most two compiled graphs
            for block in model.transformer.h:
                block.compile()
        if sharded:
            shard(model, bf16)
    optimizers = [make_optimizer(m, cfg.lr, cfg.weight_decay) for m in models]
    n_groups = 1 if val_only else n_sources  # the batch's equal groups of rows

    def step_batch(step):
        """This rank's rows of the step's global batch: batch_per_source rows from each source, or as many
        rows from the validation split alone (val_only)."""
        rows = val_batch(data, step, n_sources * cfg.batch_per_source, cfg.block_size, cfg.seed) if val_only \
            else train_batch(data, step, cfg.batch_per_source, cfg.block_size, cfg.seed)
        return [rank_rows(t, n_groups, rank, world_size).to(device) for t in rows]
    for model in models:
        warm_up(model, *step_batch(0))  # on every path, so runs stay equal
    # the source logits p: λ = softmax(p) starts uniform; replicated on every rank, not sharded
    source_logits = torch.zeros(n_sources, device=device, dtype=dtype, requires_grad=True)
    logits_rule = LOGITS_UPDATES[cfg.logits_update]
    logits_optimizer = make_logits_optimizer(source_logits, cfg.logits_update, cfg.logits_lr, cfg.logits_weight_decay)
    weights = None if scalebio else (torch.ones(1) if val_only else fixed_weights(cfg.weights, sources)).to(device)
    received_sum = torch.zeros(n_sources, device=device, dtype=dtype)  # baselines: the share each source got
    reference_model = load_reference(cfg.reference, model_config, cfg.data).to(device=device, dtype=dtype) \
        if cfg.method == 'rholoss' else None

    def lisa(step):
        """u and w draw their blocks independently, as in the authors' code (README, honest limits)."""
        for copy_index, (model, opt) in enumerate(zip(models, optimizers)):
            set_active_blocks(model.transformer.h, opt, draw_active_blocks(
                cfg.n_layer, cfg.lisa_layers, cfg.seed, step // cfg.lisa_interval, copy_index))

    def checkpoint_tensors(with_cuda_rng=device.startswith('cuda')):
        """p, its optimizer's state (Adam's moments; SGD keeps none) and the RNG state: replicated, so the
        checkpoint keeps one copy."""
        state = logits_optimizer.state[source_logits]
        if not state and logits_rule['optimizer'] == 'adam':  # before p's first step, or before a load fills them
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(source_logits),
                         exp_avg_sq=torch.zeros_like(source_logits))
        rng = {'cpu': torch.get_rng_state()}  # every rank is seeded alike, so one copy serves all
        if with_cuda_rng:
            rng['cuda'] = torch.cuda.get_rng_state()
        return {'source_logits': source_logits.data, 'logits_optimizer_state': state, 'received_sum': received_sum,
                'rng_state': rng}

    start_step, best_val_loss = 0, math.inf
    if cfg.resume:
        meta = read_meta(ckpt_path)
        changed = [k for k, v in meta['config'].items() if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v]
        if changed:
            raise ValueError("--resume=True with a different config: " + ', '.join(
                f"{k}={getattr(cfg, k)!r} (checkpoint: {meta['config'][k]!r})" for k in changed))
        start_step, best_val_loss = meta['step'], meta['best_val_loss']
        lisa(start_step - 1)  # the blocks that held optimizer state when the checkpoint was written
        tensors = checkpoint_tensors(with_cuda_rng=meta['cuda_rng'])
        load_checkpoint(ckpt_path, models, optimizers, tensors)
        torch.set_rng_state(tensors['rng_state']['cpu'])
        if meta['cuda_rng'] and device.startswith('cuda'):
            torch.cuda.set_rng_state(tensors['rng_state']['cuda'].cpu())
        say(f"resuming from {ckpt_path} at step {start_step}")

    def save(step):
        save_checkpoint(ckpt_path, models, optimizers, checkpoint_tensors(),
                        {'step': step, 'config': dataclasses.asdict(cfg), 'best_val_loss': best_val_loss,
                         'cuda_rng': device.startswith('cuda')})

    eval_sets = {split: [(x.to(device), y.to(device)) for x, y in eval_batches(
        data, split, cfg.eval_batches, cfg.val_batch, cfg.block_size, cfg.seed)] for split in ['val', 'test'] + sources}
    eval_model = upper_model if scalebio else lower_model  # the model whose val/test loss is reported

    def eval_losses(model, splits):  # val, test: token means; sources: per-example means
        return {sp: evaluate(model, eval_sets[sp], autocast, rank, world_size, sp in sources) for sp in splits}

    # SIGINT / SIGTERM: finish the current step, save a checkpoint, exit. A second signal acts at once.
    stop_signals, old_handlers = [], {}

    def request_stop(signum, frame):
        stop_signals.append(signum)
        signal.signal(signum, old_handlers[signum])
    for s in (signal.SIGINT, signal.SIGTERM):
        old_handlers[s] = signal.signal(s, request_stop)

    end_step = min(cfg.stop_at, cfg.max_steps) if cfg.stop_at > 0 else cfg.max_steps
    tokens_per_step = n_sources * cfg.batch_per_source * cfg.block_size * (2 if scalebio else 1) \
        + (cfg.val_batch * cfg.block_size * (2 if cfg.central_difference else 1) if scalebio else 0)
    train_time, log_path, grad_bytes = 0.0, os.path.join(cfg.out_dir, 'log.jsonl'), {}
    if master and os.path.exists(log_path):  # keep only what the checkpoint has seen: a killed run logs more
        with open(log_path) as f:
            kept = [line for line in f if cfg.resume and json.loads(line)['step'] <= start_step]
        with open(log_path, 'w') as f:
            f.writelines(kept)
    record = None
    progress = tqdm(range(start_step, end_step), initial=start_step, total=end_step, dynamic_ncols=True,
                    disable=not master)
    try:
        for step in progress:
            # all ranks must stop at the same step: the checkpoint is a collective
            stop = torch.tensor(float(bool(stop_signals)), device=device)
            if mean_over_ranks(stop) > 0 and step > 0:
                save(step)
                progress.close()
                signum = stop_signals[0] if stop_signals else signal.SIGTERM
                say(f"stopped by signal {signum} before step {step}; checkpoint {ckpt_path}; "
                    f"continue with --resume=True", file=sys.stderr)
                sys.exit(128 + signum)
            t0 = time.time()
            # learning rates and α, set on every param group every step (nanoGPT's get_lr style)
            alpha, lr_scale = penalty_schedule(step, cfg.penalty_alpha, cfg.alpha_growth, cfg.alpha_interval)
            lr_mult = cosine_lr(step, cfg.max_steps, cfg.warmup_steps)
            for opt in optimizers:
                for group in opt.param_groups:
                    group['lr'] = cfg.lr * lr_mult * lr_scale
            for group in logits_optimizer.param_groups:  # not scaled with α: see bilevel.penalty_schedule
                group['lr'] = logits_lr(cfg.logits_update, cfg.logits_lr, lr_mult)
            lisa(step)

            # the global batch of this step, the same for any number of processes; this rank's rows of it
            x, y = step_batch(step)
            try:
                if scalebio:
                    vx, vy = (rank_rows(t, 1, rank, world_size).to(device)
                              for t in val_batch(data, step, cfg.val_batch, cfg.block_size, cfg.seed))
                    result = scalebio_step(
                        source_logits, alpha,
                        lower_objective=model_objective(lower_model, x, y, *((vx, vy) if cfg.central_difference
                                                        else (None, None)), n_sources, micro_steps, autocast),
                        upper_objective=model_objective(upper_model, x, y, vx, vy, n_sources, micro_steps,
                                                        autocast),
                        update_lower=optimizer_update(lower_model, optimizers[0], cfg.grad_clip, grad_bytes),
                        update_upper=optimizer_update(upper_model, optimizers[1], cfg.grad_clip, grad_bytes),
                        update_logits=lambda: update_logits(logits_optimizer),
                        central_difference=cfg.central_difference, mirror=logits_rule['mirror'])
                else:
                    if cfg.method == 'fixed':  # one model descends the lower level's objective L_train(θ, λ)
                        received = torch.zeros(n_sources, device=device, dtype=dtype) if val_only else weights
                        losses, _ = model_objective(lower_model, x, y, None, None, n_groups, micro_steps,
                                                    autocast)(weights, 0.0)
                    elif cfg.method == 'irdro':
                        received, losses = irdro_step(lower_model, x, y, n_sources, cfg.dro_temperature, autocast)
                    else:  # rholoss: the global candidate batch, scored by the ranks together
                        cx, cy = (t.to(device) for t in train_batch(data, step, cfg.rho_candidates * cfg.batch_per_source,
                                                                    cfg.block_size, cfg.seed))
                        received, losses = rholoss_step(lower_model, reference_model, cx, cy, n_sources,
                                                        n_sources * cfg.batch_per_source, autocast)
                    check_finite(source_losses=losses)
                    optimizer_update(lower_model, optimizers[0], cfg.grad_clip, grad_bytes)()
                    received_sum += received.to(dtype)
            except FloatingPointError as e:
                raise FloatingPointError(f"non-finite loss or gradient at step {step}: {e}; stopped without saving, "
                                         f"the last good checkpoint is {ckpt_path}") from None
            train_time += time.time() - t0

            done = step + 1
            current = torch.softmax(source_logits.detach(), 0) if scalebio else received_sum / done
            if done % 10 == 0 and scalebio:
                progress.set_postfix_str(f"L_val(w)={result['val_loss'].item():.3f} " +
                                         ' '.join(f"{s}={w:.3f}" for s, w in zip(sources, current.tolist())))
            if done % cfg.eval_interval == 0 or done == end_step:
                held_out = eval_losses(eval_model, ['val', 'test'])
                record = {'step': done, 'val_loss': held_out['val'], 'test_loss': held_out['test'],
                          'weights': dict(zip(sources, current.tolist())),
                          'per_source_loss': eval_losses(eval_model, sources),
                          'penalty_alpha': alpha, 'lr': cfg.lr * lr_mult * lr_scale}
                if scalebio:
                    record['lower_per_source_loss'] = eval_losses(lower_model, sources)
                if master:
                    with open(log_path, 'a') as f:
                        f.write(json.dumps(record) + '\n')
                    progress.write(f"step {done}: val {record['val_loss']:.4f} test {record['test_loss']:.4f} "
                                   f"weights {' '.join(f'{w:.3f}' for w in current.tolist())}")
                if record['val_loss'] < best_val_loss:  # the same on every rank: all evaluate the same batches
                    best_val_loss = record['val_loss']
                    save_checkpoint(best_path, [eval_model], [], {}, {'step': done, 'val_loss': best_val_loss,
                                    'model_config': dataclasses.asdict(model_config), 'data': cfg.data,
                                    'tokenizer': cfg.tokenizer if cfg.tokenizer == 'bytes' else os.path.abspath(cfg.tokenizer)})
            if done % cfg.ckpt_interval == 0 or done == end_step:
                save(done)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    progress.close()

    if record is None:
        say(f"nothing to do: the checkpoint is already at step {start_step}")
        return None
    summary = {'sources': sources, 'weights': list(record['weights'].values()), 'steps': end_step,
               'val_loss': record['val_loss'], 'best_val_loss': best_val_loss, 'test_loss': record['test_loss'],
               'per_source_loss': record['per_source_loss'],
               'tokens_per_second': tokens_per_step * (end_step - start_step) / max(train_time, 1e-9),
               'world_size': world_size, 'per_rank_bytes': rank_bytes(models, optimizers, grad_bytes),
               'config': dataclasses.asdict(cfg)}
    summary['per_rank_state_bytes'] = sum(summary['per_rank_bytes'].values())
    if device.startswith('cuda'):
        summary['peak_memory_bytes'] = torch.cuda.max_memory_allocated()
    if master:
        with open(os.path.join(cfg.out_dir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        print(f"\n{'source':<16}{'weight':>10}{'loss (model)':>18}")
        for s, w in record['weights'].items():
            print(f"{s:<16}{w:>10.4f}{record['per_source_loss'][s]:>18.4f}")
        print(f"val loss {record['val_loss']:.4f} (best {best_val_loss:.4f}), test loss {record['test_loss']:.4f}; "
              f"wrote {cfg.out_dir}/summary.json")
    if cfg.export:  # the trained model for use elsewhere; the weights as a mixture for standard fine-tuning
        state = full_state_dict(eval_model)
        if master:
            export_pretrained(state, model_config, os.path.join(cfg.out_dir, 'hf'))
            with open(os.path.join(cfg.out_dir, 'mixture.json'), 'w') as f:
                json.dump({'sources': sources, 'weights': summary['weights'], 'how': "for N examples, draw "
                           "int(N * weight) from each source (the authors' second stage)"}, f, indent=2)
    return summary


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        # every rank sees the same data and the same averaged losses, so every rank fails the same way
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
        sys.exit(f"{rank}error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
