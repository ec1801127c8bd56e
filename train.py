"""
ScaleBiO data reweighting: learn how much weight each training source deserves (bilevel.py), on a
nanoGPT-style GPT (model.py), with LISA layer freezing (lisa.py), on multi-source data (data.py).

One process, CPU or one GPU:
    python train.py                                  # built-in `denoise` task, about 2 minutes on 2 CPU cores
    python train.py --data=noise_ladder
    python train.py --data=path/to/folder            # train_<source>.txt ..., val.txt, test.txt
Stage two of the paper's protocol (a fresh model trained with fixed weights; never on the validation split):
    python train.py --method=fixed --weights=out/summary.json --out_dir=out-stage2
    python train.py --method=fixed --weights=uniform --out_dir=out-uniform
Baselines on the same batches (baselines.py; tools/compare.py runs every method on every built-in task):
    python train.py --method=irdro      # or rholoss --reference=<out_dir of a val_only run>, fixed --weights=val_only
Continue an interrupted run (same arguments):
    python train.py ... --resume=True
Several processes, both model copies sharded with FSDP2 (fsdp.py); the global batch stays the same:
    torchrun --standalone --nproc_per_node=8 train.py --model=gpt2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
Every field of config.TrainConfig can be set as --field=value.

Writes to out_dir: log.jsonl (one JSON line every eval_interval steps), summary.json (at the end), ckpt/
(everything needed to resume, one shard per rank) and best/ (the upper model at its best val loss; --save_best).
"""
import contextlib
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import time


def interrupted_while_starting(signum, frame):  # at once: an exception raised inside torch's import may be caught
    print("error: interrupted while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == '__main__':  # Ctrl-C while torch loads, for seconds: one line, and nothing has been written yet
    signal.signal(signal.SIGINT, interrupted_while_starting)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a hung process waits, even inside torch

import torch
from tqdm import tqdm

from baselines import fixed_step, fixed_weights, irdro_step, load_reference, rholoss_step
from bilevel import cosine_lr, make_source_logits_optimizer, penalty_schedule
from checkpoint import (check_data_unchanged, check_resumable, data_fingerprint, load_checkpoint, read_meta,
                        replicated_state, save_checkpoint)
from config import MODEL_PRESETS, changed_step_sizes, input_paths, micro_steps, parse_config
from data import load_data, loading_report
from tokenizer import load_tokenizer, tokenizer_files
from fsdp import (copy_shards, end_distributed, fill, gradient_bytes, init_distributed, peer_error, rank0_decides,
                  rank_bytes, reshard, shard, warm_up)
from lisa import set_lisa_blocks
from hf import export_pretrained, pretrained_tensors, read_config
from model import GPTConfig, initial_weights, make_model, make_optimizer, target_counts
from outdir import (OVERWRITTEN, append_log, drop_overwritten, finished_summary, logged_record, own_out_dir,
                    publish_folder, set_aside, signals_stop_at_next_step, trim_log, write_whole)
from plan import check_run_memory
from steps import (Run, device_rows, evaluation_batches, guard_lower_copy, mean_over_ranks, proportional_rows,
                   rank_rows, scalebio_train_step, tokens_per_step, validation_rows)


# --method: the step the loop calls, each step(run, step, alpha) -> {'weights', 'loss'}
METHOD_STEPS = {'scalebio': scalebio_train_step, 'fixed': fixed_step, 'irdro': irdro_step, 'rholoss': rholoss_step}


def main(argv):
    cfg = parse_config(argv)
    # the process group under torchrun, and the out_dir, which belongs to this run until it ends
    processes = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        with own_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite) as previous_run:
            return train(cfg, processes, previous_run)
    except RuntimeError as e:
        raise peer_error(e, cfg.dist_timeout) from None


def train(cfg, processes, previous_run):
    # the data, both model copies, their optimizers and p, on every rank
    run = build_run(cfg, processes)
    # --overwrite=True: the previous run's files go aside (out_dir/overwritten) until this run's first checkpoint,
    # now that this run's inputs are known to be good and none is among them
    set_aside(cfg.out_dir, previous_run, input_paths(cfg))
    # continue from the last checkpoint, or start afresh
    end_step = min(cfg.stop_at, cfg.max_steps) if cfg.stop_at > 0 else cfg.max_steps
    start_step = resume_from_checkpoint(run, end_step) if cfg.resume else 0
    record = None
    progress = tqdm(range(start_step, end_step), initial=start_step, total=end_step, dynamic_ncols=True,
                    disable=run.rank != 0)
    with signals_stop_at_next_step() as stop_signals:
        for step in progress:
            # a signal stops every rank at the same step, with a checkpoint
            stop_if_signalled(run, step, stop_signals, progress)
            # α and the learning rates of u, w and p for this step
            alpha, lr = set_schedules(run, step)
            # LISA: the blocks each copy trains during this interval (off by default: every block trains)
            if cfg.lisa_layers:
                draw_lisa_blocks(run, step)
            # one step of the method: ScaleBiO's (steps.py) or a baseline's (baselines.py)
            result = take_step(run, step, alpha)
            done = step + 1
            if done % 10 == 0:  # one host read, every 10 steps: on a GPU each read waits for the queued work
                loss, *weights = torch.cat([result['loss'].view(1), result['weights'].to(result['loss'])]).tolist()
                progress.set_postfix_str(f"loss={loss:.3f} " + ' '.join(
                    f"{s}={w:.3f}" for s, w in zip(run.data.sources, weights)))
            # held-out losses to log.jsonl, the best upper model to best/
            if done % cfg.eval_interval == 0 or done == end_step:
                record = evaluate_and_log(run, done, result['weights'], alpha, lr, progress)
            # everything needed to resume
            if done % cfg.ckpt_interval == 0 or done == end_step:
                save(run, done)
    progress.close()
    if record is None and finished_summary(cfg.out_dir) is None:  # resumed at the final step, killed before its
        record = rank0_decides(lambda: logged_record(cfg.out_dir, end_step))  # summary (or with it damaged)
    # summary.json, and with --export the trained model and the mixture for use elsewhere
    return finish(run, record, start_step, end_step)


# ----------------------------------------------------------------------------------------------
# building the run

def build_run(cfg, processes):
    rank, world_size, device, sharded = processes
    # a source whose weight falls to ~1e-40 gives float32 subnormal products in every backward, which x86 CPUs
    # compute in microcode, an order of magnitude slower. Flushed to zero instead, they change nothing that a
    # float32 sum of normal numbers can hold
    torch.set_flush_denormal(True)
    if cfg.cpu_offload and not (sharded and device.startswith('cuda')):
        raise ValueError("--cpu_offload=True moves FSDP2's shards between host and GPU: it needs CUDA and torchrun "
                         "(torchrun --standalone --nproc_per_node 1 train.py ... for one GPU)")
    dtype = getattr(torch, cfg.dtype)
    bf16 = cfg.amp and device.startswith('cuda')
    torch.manual_seed(cfg.seed)
    micro_steps(cfg, world_size)  # --micro_batch against the processes, before the data loads
    data = load_data(cfg.data, cfg.block_size, cfg.seed, load_tokenizer(cfg.tokenizer))
    if rank == 0:  # the rows each split of examples keeps, what it cut or skipped; characters the tokenizer loses
        print(loading_report(data, cfg.tokenizer), end='')
    # what the run trains on, down to the bytes: every checkpoint records it, and a resume checks it
    tokenizer = {f'tokenizer/{name}': path for name, path in tokenizer_files(cfg.tokenizer).items()}
    reference = os.path.join(cfg.reference, 'best') if cfg.method == 'rholoss' and cfg.reference else ''
    reference_files = {f'reference/{name}': os.path.join(reference, name) for name in sorted(os.listdir(reference))} \
        if os.path.isdir(reference) else {}
    weights = fixed_weights(cfg.weights, data.sources, data.digests) \
        if cfg.method == 'fixed' and cfg.weights != 'val_only' else None  # the file's bytes hashed as they are parsed
    weights_file = {'weights.json': cfg.weights} if cfg.method == 'fixed' and os.path.isfile(cfg.weights) else {}
    fingerprint = data_fingerprint({**data.files, **tokenizer, **reference_files, **weights_file},
                                   read=data.digests) if rank == 0 else None
    models, model_config = build_models(cfg, data, device, dtype, sharded, bf16, rank, world_size)
    # p: λ = softmax(p) starts uniform
    source_logits = torch.zeros(len(data.sources), device=device, dtype=dtype, requires_grad=True)
    run = Run(cfg, models, optimizers=[make_optimizer(m, cfg.lr, cfg.weight_decay) for m in models], source_logits=source_logits,
              source_logits_optimizer=make_source_logits_optimizer(source_logits, cfg.source_logits_update,
                                                                   cfg.source_logits_lr, cfg.source_logits_weight_decay),
              autocast=torch.autocast('cuda', dtype=torch.bfloat16) if bf16 and not sharded else contextlib.nullcontext(),
              micro_steps=micro_steps(cfg, world_size), data=data, device=device, rank=rank, world_size=world_size,
              received_sum=torch.zeros(len(data.sources), device=device, dtype=dtype), model_config=model_config,
              data_fingerprint=fingerprint)
    for model in models if sharded else []:  # on a validation row: no method sees a source it must not
        warm_up(model, validation_rows(run, 0, world_size)[0].to(device))
    if weights is not None:
        run.fixed_weights = weights.to(device)
        run.rows_per_source = proportional_rows(run.fixed_weights.tolist(), len(data.sources) * cfg.batch_per_source) \
            if cfg.sampling == 'proportional' else None
    run.reference_model = load_reference(cfg.reference, model_config, cfg.data, cfg.seed, fingerprint).to(
        device=device, dtype=dtype) if cfg.method == 'rholoss' else None
    run.eval_sets = {split: evaluation_batches(  # on the host, cropped and moved per batch as training rows are
        data, split, cfg.eval_batches, cfg.val_batch, cfg.block_size, cfg.seed) for split in ['val', 'test'] + data.sources}
    if not cfg.lisa_layers:  # the summary's gradient bytes per rank; with LISA, counted at each draw
        run.grad_bytes = gradient_bytes(run.optimizers, cfg.lower_first)
    if cfg.method == 'scalebio' and cfg.central_difference:  # the guard's reference (guard_lower_copy)
        run.lower_val_start = evaluate(run, models[0], 'val')
    return run


def model_config_for(cfg, data):
    """The model's shape: --init_from's config.json, a --model preset (at --n_layer blocks if set), or --n_layer etc."""
    if cfg.init_from:  # GPT-2 and GPT-NeoX train with --dropout (config.json's is the original training's)
        config = read_config(cfg.init_from)
        config = dataclasses.replace(config, dropout=cfg.dropout) if config.family in ('gpt2', 'gpt_neox') else config
    else:
        shape = MODEL_PRESETS.get(cfg.model) or dict(n_layer=4, n_head=cfg.n_head, n_embd=cfg.n_embd)
        config = GPTConfig(**{'block_size': cfg.block_size, 'vocab_size': data.vocab_size, 'dropout': cfg.dropout,
                              'bias': cfg.bias, **shape, **({'n_layer': cfg.n_layer} if cfg.n_layer else {})})
    where = f"--init_from={cfg.init_from}: the model's" if cfg.init_from else f"--model={cfg.model}: its"
    if config.vocab_size < data.vocab_size or config.block_size < cfg.block_size:  # the first that fails
        raise ValueError(f"{where} vocabulary ({config.vocab_size}) must hold the tokenizer's ({data.vocab_size})"
                         if config.vocab_size < data.vocab_size else f"{where} context ({config.block_size}) must "
                         f"be at least --block_size={cfg.block_size}")
    if 0 < config.sliding_window < cfg.block_size:
        raise ValueError(f"{where} attention window ({config.sliding_window}) is shorter than --block_size="
                         f"{cfg.block_size}: sliding-window attention is not implemented; lower --block_size")
    if cfg.lisa_layers >= config.n_layer:  # every block would train: that is --lisa_layers=0
        raise ValueError(f"--lisa_layers={cfg.lisa_layers} must be fewer than the model's {config.n_layer} blocks "
                         f"(--lisa_layers=0 trains every block)")
    if config.family not in ('gpt2', 'gpt_neox') and cfg.dropout:
        raise ValueError(f"--dropout={cfg.dropout}: the Llama family is built without dropout, as its checkpoints are")
    if cfg.export and config.family in ('gpt2', 'gpt_neox') and not config.bias:
        raise ValueError(f"--export=True writes a Hugging Face {config.family}, which has biases: it needs --bias=True")
    return config


def build_models(cfg, data, device, dtype, sharded, bf16, rank, world_size):
    """[lower_model, upper_model] (ScaleBiO) or [model], compiled and sharded as configured, and their config.

    Both copies are built on the meta device (shapes, no memory), sharded, and only then allocated, so each
    rank allocates only its shards; the lower copy is then filled one full tensor at a time (random weights
    drawn as a CPU construction draws them, or --init_from's), and the upper copy from the lower's shards."""
    model_config = model_config_for(cfg, data)
    with torch.device('meta'):
        models = [make_model(model_config).to(dtype) for _ in range(2 if cfg.method == 'scalebio' else 1)]
    if rank == 0:
        print(f"number of parameters: {models[0].num_params() / 1e6:.2f}M per copy; {world_size} process(es)")
    if device.startswith('cuda'):  # what each GPU will hold for the copies, before it holds anything
        cfg.micro_batch = check_run_memory(cfg, model_config, len(data.sources), world_size, len(models),
                                           dtype.itemsize, bf16, sharded, device, rank)
    for model in models:
        model.checkpoint_blocks, model.logits_at_targets = cfg.checkpoint_blocks, cfg.logits_at_targets
        if cfg.compile:  # per block: LISA flips requires_grad, so each block has at most two compiled graphs
            for block in model.blocks:
                block.compile()
        if sharded:
            shard(model, bf16, cfg.cpu_offload)
        model.to_empty(device='cpu' if cfg.cpu_offload else device)
    # both copies start from the same weights (the authors load the same pretrained checkpoint twice)
    fill(models[0], pretrained_tensors(cfg.init_from, model_config) if cfg.init_from else initial_weights(model_config))
    for model in models[1:]:
        copy_shards(model, models[0])
    return models, model_config


# ----------------------------------------------------------------------------------------------
# the loop's phases

def set_schedules(run, step):
    """α and the learning rates of this step, set on every param group (nanoGPT's get_lr style)."""
    cfg = run.cfg
    alpha, lr_scale = penalty_schedule(step, cfg.penalty_alpha, cfg.alpha_growth, cfg.alpha_interval)
    lr_mult = cosine_lr(step, cfg.max_steps, cfg.warmup_steps)
    lr = cfg.lr * lr_mult * lr_scale
    for opt in run.optimizers:
        for group in opt.param_groups:
            group['lr'] = lr
    for group in run.source_logits_optimizer.param_groups:  # not scaled with α: see bilevel.penalty_schedule
        group['lr'] = group['initial_lr'] * lr_mult
    return alpha, lr


def draw_lisa_blocks(run, step):
    """The blocks each model copy trains during this LISA interval; u and w share them by default (lisa.py)."""
    cfg = run.cfg
    set_lisa_blocks([(model.blocks, opt) for model, opt in zip(run.models, run.optimizers)], cfg.lisa_layers,
                    cfg.seed, step // cfg.lisa_interval, cfg.lisa_draw, cfg.lisa_merge_frozen)
    run.grad_bytes = max(run.grad_bytes, gradient_bytes(run.optimizers, cfg.lower_first))


def take_step(run, step, alpha):
    t0 = time.time()
    try:
        result = METHOD_STEPS[run.cfg.method](run, step, alpha)
    except FloatingPointError as e:
        ckpt = os.path.join(run.cfg.out_dir, 'ckpt')
        last = f"the last good checkpoint is {ckpt}" if os.path.isdir(ckpt) else "no checkpoint was written yet"
        if os.path.isdir(os.path.join(run.cfg.out_dir, OVERWRITTEN)):
            last += f"; the run --overwrite=True replaced is whole in {os.path.join(run.cfg.out_dir, OVERWRITTEN)}"
        raise FloatingPointError(f"non-finite loss or gradient at step {step}: {e}; stopped without saving, {last}; "
                                 f"step sizes set: {changed_step_sizes(run.cfg) or 'none, all defaults'}") from None
    run.train_time += time.time() - t0
    return result


@torch.no_grad()
def evaluate(run, model, split):
    """The model's loss on the split's fixed batches: a token mean (for a source with --source_loss=example, ℓ_i:
    the mean of its row means). Each rank takes its rows, in as many forwards as a step's, and the sums are
    averaged over ranks, so every rank's decisions on it (the best checkpoint) agree."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss over tokens, tokens
    by_row = split in run.data.sources and run.cfg.source_loss == 'example'  # a source's loss as ℓ_i in the step
    for batch in run.eval_sets[split]:
        for x, y in zip(*(rank_rows(rows, 1, run.rank, run.world_size).chunk(run.micro_steps) for rows in batch)):
            x, y = device_rows(run, x, y)
            with run.autocast:
                _, row_loss = model(x, y)
            counts = torch.ones_like(row_loss).double() if by_row else target_counts(y, torch.float64)
            sums += torch.stack([(row_loss.double() * counts).sum(), counts.sum()])
    model.train()
    reshard(model)
    sums = mean_over_ranks(sums)
    return (sums[0] / sums[1]).item()


def evaluate_and_log(run, done, weights, alpha, lr, progress):
    """The upper model's (a baseline's one model's) held-out losses, to log.jsonl; the best one to best/."""
    cfg, sources, eval_model = run.cfg, run.data.sources, run.models[-1]
    record = {'step': done, 'val_loss': evaluate(run, eval_model, 'val'), 'test_loss': evaluate(run, eval_model, 'test'),
              'weights': dict(zip(sources, weights.tolist())),
              'per_source_loss': {s: evaluate(run, eval_model, s) for s in sources}, 'penalty_alpha': alpha, 'lr': lr}
    if len(run.models) == 2:
        record['lower_per_source_loss'] = {s: evaluate(run, run.models[0], s) for s in sources}
    if run.lower_val_start is not None:
        record['lower_val_loss'] = evaluate(run, run.models[0], 'val')
    if run.rank == 0:
        append_log(cfg.out_dir, record)
        progress.write(f"step {done}: val {record['val_loss']:.4f} test {record['test_loss']:.4f} "
                       f"weights {' '.join(f'{w:.3f}' for w in weights.tolist())}")
    if run.lower_val_start is not None:
        guard_lower_copy(run, record['lower_val_loss'], done)
    if record['val_loss'] < run.best_val_loss:  # the same on every rank: all evaluate the same batches
        run.best_val_loss = record['val_loss']
        if not cfg.save_best:
            return record
        tokenizer = cfg.tokenizer if cfg.tokenizer == 'bytes' else os.path.abspath(cfg.tokenizer)
        save_checkpoint(os.path.join(cfg.out_dir, 'best'), [eval_model], [], {},
                        {'step': done, 'val_loss': run.best_val_loss, 'tokenizer': tokenizer, 'method': cfg.method,
                         'weights': cfg.weights, 'model_config': dataclasses.asdict(run.model_config), 'data': cfg.data,
                         'seed': cfg.seed, 'data_files': run.data_fingerprint})  # what RHO-LOSS's reference checks
    return record


# ----------------------------------------------------------------------------------------------
# checkpoints, resume and signals

def save(run, step):
    cuda = run.device.startswith('cuda')
    save_checkpoint(os.path.join(run.cfg.out_dir, 'ckpt'), run.models, run.optimizers, replicated_state(run, cuda),
                    {'step': step, 'config': dataclasses.asdict(run.cfg),
                     'model_config': dataclasses.asdict(run.model_config), 'best_val_loss': run.best_val_loss,
                     'lower_val_rises': run.lower_val_rises, 'cuda_rng': cuda, 'data_files': run.data_fingerprint},
                    keep_previous=True)
    drop_overwritten(run.cfg.out_dir)  # the run --overwrite=True replaced, kept until now


def resume_from_checkpoint(run, end_step):
    """Loads out_dir/ckpt in place and trims log.jsonl to it; returns its step. The config and the model's must be
    the checkpoint's, but for RESUMABLE_CHANGES, and so must the data, byte for byte."""
    meta = read_meta(os.path.join(run.cfg.out_dir, 'ckpt'))
    check_resumable(meta, run.cfg, end_step, dataclasses.asdict(run.model_config))
    rank0_decides(lambda: check_data_unchanged(meta['data_files'], run.data_fingerprint))
    run.best_val_loss = meta['best_val_loss']
    run.lower_val_rises = meta.get('lower_val_rises', 0)
    if run.cfg.lisa_layers:  # the blocks that held optimizer state when the checkpoint was written
        draw_lisa_blocks(run, meta['step'] - 1)
    tensors = replicated_state(run, with_cuda_rng=meta['cuda_rng'])
    load_checkpoint(meta, run.models, run.optimizers, tensors)
    torch.set_rng_state(tensors['rng_state']['cpu'])
    if meta['cuda_rng'] and run.device.startswith('cuda'):
        torch.cuda.set_rng_state(tensors['rng_state']['cuda'].cpu())
    if run.rank == 0:
        trim_log(run.cfg.out_dir, meta['step'])  # log.jsonl's records past the checkpoint are written again
        print(f"resuming from {meta['folder']} at step {meta['step']}")
    return meta['step']


def stop_if_signalled(run, step, stop_signals, progress):
    stop = bool(stop_signals)
    if run.world_size > 1:  # a collective and a host read: every rank stops at the same step
        stop = mean_over_ranks(torch.tensor(float(stop), device=run.device)) > 0
    if stop and step > 0:
        save(run, step)
        progress.close()
        signum = stop_signals[0] if stop_signals else signal.SIGTERM
        if run.rank == 0:
            print(f"stopped by signal {signum} before step {step}; checkpoint {os.path.join(run.cfg.out_dir, 'ckpt')}; "
                  f"continue with --resume=True", file=sys.stderr)
        sys.exit(128 + signum)


# ----------------------------------------------------------------------------------------------
# the end of the run

def finish(run, record, start_step, end_step):
    cfg, sources = run.cfg, run.data.sources
    summary_file = os.path.join(cfg.out_dir, 'summary.json')
    summary = finished_summary(cfg.out_dir) if start_step == end_step else None
    if summary is not None:  # resumed a finished run: nothing to do
        if run.rank == 0:
            print(f"nothing to do: the run is complete ({summary_file})")
        if cfg.export and not os.path.isfile(os.path.join(cfg.out_dir, 'mixture.json')):  # written last
            export(run, summary['weights'])
        return summary
    ran = end_step > start_step  # time and memory are measured over the steps this process ran
    summary = {'sources': sources, 'weights': list(record['weights'].values()), 'steps': end_step,
               'val_loss': record['val_loss'], 'best_val_loss': run.best_val_loss, 'test_loss': record['test_loss'],
               'per_source_loss': record['per_source_loss'], 'data_kept': run.data.kept,
               'tokens_per_second': tokens_per_step(cfg, len(sources)) * (end_step - start_step) / run.train_time
               if ran else None, 'world_size': run.world_size,
               'per_rank_bytes': rank_bytes(run.models, run.optimizers, run.grad_bytes) if ran else None,
               'config': dataclasses.asdict(cfg), 'model_config': dataclasses.asdict(run.model_config)}
    summary['per_rank_state_bytes'] = sum(summary['per_rank_bytes'].values()) if ran else None
    if run.device.startswith('cuda') and ran:
        summary['peak_memory_bytes'] = torch.cuda.max_memory_allocated()
    if run.rank == 0:
        write_whole(summary_file, lambda f: json.dump(summary, f, indent=2))
        print(f"\n{'source':<16}{'weight':>10}{'loss (model)':>18}")
        for s, w in record['weights'].items():
            print(f"{s:<16}{w:>10.4f}{record['per_source_loss'][s]:>18.4f}")
        print(f"val loss {record['val_loss']:.4f} (best {run.best_val_loss:.4f}), test loss {record['test_loss']:.4f}; "
              f"wrote {cfg.out_dir}/summary.json")
    if cfg.export:
        export(run, summary['weights'])
    return summary


def export(run, weights):
    """out_dir/hf: the trained model for use elsewhere, with the tokenizer's files and its BOS/EOS ids;
    out_dir/mixture.json: the weights as a mixture for standard fine-tuning."""
    cfg, folder = run.cfg, os.path.join(run.cfg.out_dir, 'hf')
    tokenizer = load_tokenizer(cfg.tokenizer)
    if any(run.data.digests.get(path) != digest for path, digest in tokenizer.digests.items()):  # as trained with
        raise ValueError(f"--tokenizer={cfg.tokenizer}: its files changed during the run; restore them to export")
    ids = {key: value for key, value in (('bos_token_id', tokenizer.begin_of_text),
                                          ('eos_token_id', tokenizer.end_of_text)) if value is not None}
    try:  # every rank takes part: it gathers tensor by tensor
        publish_folder(folder, lambda tmp: export_pretrained(run.models[-1], tmp, ids), tokenizer_files(cfg.tokenizer).values())
    except OSError as e:
        raise OSError(f"{e}; the checkpoint and summary.json are intact: --resume=True --export=True exports again") \
            from None
    if run.rank == 0:  # written last: its presence says the export is complete
        write_whole(os.path.join(cfg.out_dir, 'mixture.json'), lambda f: json.dump(
            {'sources': run.data.sources, 'weights': weights,
             'how': "for N examples, draw int(N * weight) from each source (the authors' second stage)"}, f, indent=2))


def cli(argv):
    """`python train.py ...`: a run that cannot go on ends with one line naming why (the field, the file, the
    collective), and exit status 1."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a KeyboardInterrupt, handled below
    try:
        main(argv)
        return 0
    except (ValueError, OSError, FloatingPointError, ImportError, MemoryError) as e:  # alike on every rank
        rank = f"[rank {os.environ['RANK']}] " if 'RANK' in os.environ and os.environ.get('WORLD_SIZE', '1') != '1' else ''
        print(f"{rank}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second SIGINT, or one before the loop began: no checkpoint is half-written
        print("error: interrupted; nothing in out_dir is half-written (a run with a checkpoint continues with "
              "--resume=True)", file=sys.stderr)
        return 130
    finally:  # once the line is out (after an error, signals_stop_at_next_step holds SIGTERM off until then)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == '__main__':
    try:
        code = cli(sys.argv[1:])
    finally:
        end_distributed()
    sys.exit(code)
