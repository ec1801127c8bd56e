"""
What a ScaleBiO step costs, against plain fine-tuning and against the floor the algorithm cannot beat.

    python -m tools.bench                       # a toy shape whose steps take 0.1-1 s on 2 CPU cores
    python -m tools.bench --model=gpt2          # the GPT-2 124M shape (50257-token vocabulary)
    python -m tools.bench --device=cuda --compile=True --model=gpt2
    python -m tools.bench --plan=True --model=llama3-8b --world_size=8 --gpu_gib=45  # memory per GPU, nothing allocated
    python -m tools.bench --workload=instruction --block_size=512 --micro_batch=1     # padded rows, cropped or not

Three variants, timed interleaved in one run (warm-up first, then the median of `repeats` steps each):
  sft       one model, AdamW, one forward/backward on the training batch
  scalebio  bilevel.scalebio_step: u and w forward/backward on the same training batch and on val_batch
            (train.py's default, the authors' forward difference: w only; --central_difference=True: both)
  lisa      the same step with LISA (lisa_layers of n_layer blocks unfrozen, the same ones in both copies)
The floor: a ScaleBiO step runs 2·B_train + B_val tokens (central difference: 2·(B_train + B_val)) through
forward and backward where fine-tuning runs B_train, so scalebio/sft cannot beat that over B_train.
Memory, counted from the tensors allocated: parameters + Adam moments (of u, w and p) after the step, gradients at their
peak (just before the step), again after a LISA switch; peak memory per variant (CUDA: max allocated; CPU:
the peak RSS of a fresh process that runs only that variant, since RSS never goes down within a process).
--workload=instruction: rows of instruction-data length (log-normal, mean 115 tokens, 95th percentile 300,
capped at block_size; Alpaca-style records), the first half of each row a prompt without targets, right-padded
to block_size; two more variants, ScaleBiO with --crop_padding=False (every forward block_size long) and with
--logits_at_targets=False (the head at every position). Useful tokens are the rows' own, not padding.
The last line printed is one JSON object with the ratios.
"""
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bilevel import make_source_logits_optimizer, step_and_clear
from config import MODEL_PRESETS, micro_steps, override, parse_config
from fsdp import local_bytes, optimizer_state_bytes, record_gradient_peak
from lisa import set_lisa_blocks
from model import GPTConfig, make_model, make_optimizer
from plan import deepest_fitting, print_lever_table, rows_per_forward, state_plan
from steps import Run, model_objective, scalebio_gpt_step


@dataclass
class BenchConfig:
    model: str = ''            # a config.MODEL_PRESETS shape (GPT-2's: vocabulary 50257) or the toy shape below (bytes)
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 0        # 0: the --model preset's (GPT-2's 50257), or the 256 bytes of the toy shape
    n_sources: int = 3
    batch_per_source: int = 8
    val_batch: int = 32        # train.py's default
    lisa_layers: int = 2
    lisa_interval: int = 5     # so the timed steps include switches
    penalty_alpha: float = 10.0
    central_difference: bool = False  # train.py's default
    grad_clip: float = 1.0     # train.py's default, for every variant
    source_loss: str = 'token'  # train.py's default: every token weighs alike across sources
    workload: str = 'random'   # 'random': every position of every row is a target; 'instruction': padded rows
    micro_batch: int = 0       # rows per source per forward (train.py's --micro_batch); 0: all at once
    warmup: int = 3
    repeats: int = 10
    device: str = 'auto'
    compile: bool = False
    peak_rss: bool = True      # peak memory of one fresh process per variant (RSS; CUDA: max allocated)
    only: str = ''             # internal: run one variant and print its peak RSS
    plan: bool = False         # only print the memory plan of the ScaleBiO + LISA step per GPU (plan.py)
    world_size: int = 1        # plan: processes (GPUs) the copies are sharded over (torchrun: FSDP2, bf16 compute)
    gpu_gib: float = 79.6      # plan: one GPU's memory as torch reports it, GiB (80 GB H100 79.6; A40 with ECC 45)
    target_fraction: float = 1.0  # plan: the share of positions with a target (instruction data: the response's)


def model_config(cfg):
    """A --model preset (GPT-2's shapes with its 50257-token vocabulary) or the toy shape (bytes, 256)."""
    shape = MODEL_PRESETS[cfg.model] if cfg.model else dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    vocab_size = cfg.vocab_size or shape.get('vocab_size', 50257 if cfg.model else 256)
    return GPTConfig(**{'block_size': cfg.block_size, **shape, 'vocab_size': vocab_size})


def row_lengths(cfg, rows, gen):
    """Tokens per row: block_size for the random workload; for the instruction workload log-normal with mean
    exp(μ + σ²/2) = 115 and 95th percentile exp(μ + 1.645σ) = 300, capped at block_size."""
    if cfg.workload == 'random':
        return torch.full((rows,), cfg.block_size)
    lengths = torch.empty(rows).log_normal_(4.458, 0.757, generator=gen).round().long()
    return lengths.clamp(2, cfg.block_size)


def build(cfg, device, lisa_layers, crop_padding=True, logits_at_targets=True):
    """The models, optimizers and one step function of a variant, as train.py builds them. The step returns the
    useful tokens (not padding) it pushed through forward and backward."""
    torch.manual_seed(0)
    model_cfg = model_config(cfg)
    vocab = model_cfg.vocab_size
    models = [make_model(model_cfg).to(device) for _ in range(1 if lisa_layers is None else 2)]
    for m in models:
        m.logits_at_targets = logits_at_targets
    if cfg.compile:
        for m in models:
            for block in m.blocks:
                block.compile()
    # p's update is train.py's (its Adam moments count in state())
    train_cfg = parse_config([f'--{key}={value}' for key, value in dict(
        penalty_alpha=cfg.penalty_alpha, central_difference=cfg.central_difference, grad_clip=cfg.grad_clip,
        source_loss=cfg.source_loss, compile=cfg.compile, crop_padding=crop_padding,
        lisa_layers=lisa_layers or 0).items()])
    source_logits = torch.zeros(cfg.n_sources, device=device, requires_grad=True)
    run = Run(train_cfg, models, optimizers=[make_optimizer(m, 1e-4, 0.01) for m in models], source_logits=source_logits,
              source_logits_optimizer=make_source_logits_optimizer(source_logits, train_cfg.source_logits_update),
              device=device,
              autocast=torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else torch.enable_grad(),
              fixed_weights=torch.full((cfg.n_sources,), 1.0 / cfg.n_sources, device=device),
              micro_steps=cfg.batch_per_source // cfg.micro_batch if cfg.micro_batch else 1)
    record_gradient_peak(run)
    gen = torch.Generator().manual_seed(0)

    def batch(rows):
        """Host rows, as train.py's (steps.model_objective crops and moves them), and their useful tokens."""
        tokens = torch.randint(0, vocab, (rows, cfg.block_size + 1), generator=gen)
        lengths = row_lengths(cfg, rows, gen)
        positions = torch.arange(cfg.block_size)
        padding = positions >= lengths[:, None]
        prompt = positions < lengths[:, None] // 2 if cfg.workload == 'instruction' else torch.zeros_like(padding)
        return (tokens[:, :-1].masked_fill(padding, 0), tokens[:, 1:].masked_fill(padding | prompt, -1),
                int(lengths.sum()))

    def step(i):
        x, y, useful = batch(cfg.n_sources * cfg.batch_per_source)
        if lisa_layers is None:  # plain fine-tuning: the lower level's objective with uniform weights
            model_objective(run, models[0], x, y, None, None, cfg.n_sources, cfg.grad_clip)(run.fixed_weights, 0.0)
            step_and_clear(run.optimizers[0])
            return useful
        set_lisa_blocks([(m.blocks, opt) for m, opt in zip(run.models, run.optimizers)], lisa_layers, 0,
                        i // cfg.lisa_interval)
        val_x, val_y, val_useful = batch(cfg.val_batch)
        scalebio_gpt_step(run, x, y, val_x, val_y, cfg.penalty_alpha)
        return 2 * useful + val_useful * (2 if cfg.central_difference else 1)

    def state():
        """(parameters + moments, gradients at their peak), bytes, both copies and p."""
        optimizers = [*run.optimizers, run.source_logits_optimizer]
        return (sum(local_bytes(m.parameters()) for m in models) + sum(optimizer_state_bytes(o) for o in optimizers),
                run.grad_bytes)
    return models, step, state


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def peak_rss_bytes():
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so it starts afresh
    at exec; getrusage's ru_maxrss is kept across exec and would report the parent's peak (the fallback)."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_flops(device, n=8192):
    """The measured bf16 matmul throughput: the honest denominator of the model-FLOPs utilisation."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0)


def time_variants(cfg, device, built):
    """Warm-up steps, then `repeats` steps of every variant, interleaved so that a slow moment of the machine hits
    every variant. Returns the state before the timed steps, and each variant's step times and useful tokens."""
    for name, (_, step, _) in built.items():
        for i in range(cfg.warmup):
            step(i)
    first_state = {name: s() for name, (_, _, s) in built.items()}  # before any LISA switch if warmup < interval
    times, useful = {name: [] for name in built}, {name: [] for name in built}
    for r in range(cfg.repeats):
        for name, (_, step, _) in built.items():
            sync(device)
            t0 = time.perf_counter()
            useful[name].append(step(cfg.warmup + r))
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return first_state, times, useful


def memory_plan_main(cfg, shape):
    """--plan=True: plan.py's table for every lever combination and the deepest model of this width that fits.
    Float32 parameters, as train.py keeps them; bf16 compute, as under torchrun's FSDP2; the rows per forward
    train.py runs with the same batch_per_source, val_batch, n_sources and micro_batch."""
    state = state_plan(shape, cfg.world_size, cfg.lisa_layers)
    tokens = rows_per_forward(cfg.batch_per_source, cfg.val_batch, cfg.n_sources, cfg.world_size,
                              micro_steps(cfg, cfg.world_size)) * cfg.block_size
    rows = dict(world_size=cfg.world_size, lisa_layers=cfg.lisa_layers, tokens=tokens,
                targets=int(cfg.target_fraction * tokens))
    levers = print_lever_table(shape, cfg.gpu_gib * 2**30, **rows)
    deepest = deepest_fitting(shape, cfg.gpu_gib * 2**30, **rows, checkpoint_blocks=True, lower_first=True)
    offloaded = deepest_fitting(shape, cfg.gpu_gib * 2**30, **rows, checkpoint_blocks=True, cpu_offload=True)
    for levers_used, fitting in (('checkpointing and --lower_first', deepest), ('checkpointing and offload', offloaded)):
        if fitting:
            print(f"the deepest model of this width that fits, with {levers_used}: {fitting[0]} blocks"
                  f"{' or more' if fitting[0] == 999 else ''}, {fitting[1] / 1e9:.2f}B parameters per copy")
    print(json.dumps({'per_rank_bytes': state, 'world_size': cfg.world_size, 'lisa_layers': cfg.lisa_layers,
                      'tokens_per_forward': tokens, 'levers': levers, 'deepest_fitting': deepest,
                      'deepest_fitting_offload': offloaded}))
    return {'state': state, 'levers': levers, 'deepest_fitting': deepest, 'deepest_fitting_offload': offloaded}


def check_bench_config(cfg):
    """The fields train.py also has, checked as train.py checks them; the bench's own, each in its range."""
    shared = ['model', 'block_size', 'batch_per_source', 'val_batch', 'lisa_layers', 'penalty_alpha',
              'central_difference', 'grad_clip', 'source_loss', 'micro_batch', 'device', 'compile']
    train_cfg = parse_config([f'--{key}={getattr(cfg, key)}' for key in shared + ['lisa_interval'] * bool(cfg.lisa_layers)
                              + ([] if cfg.model else ['n_layer', 'n_head', 'n_embd'])])  # a preset's shape is its own
    n_layer = MODEL_PRESETS[cfg.model]['n_layer'] if cfg.model else cfg.n_layer
    for key, ok, requirement in (('lisa_layers', (not cfg.plan) <= cfg.lisa_layers < n_layer, f'fewer than the {n_layer} '
                                  f'blocks, and (but for --plan) 1 or more'), ('n_sources', cfg.n_sources >= 1, '1 or more'),
                                 ('vocab_size', cfg.vocab_size >= 0, '0 (the shape\'s own) or more'),
                                 ('warmup', cfg.warmup >= 0, '0 or more'), ('repeats', cfg.repeats >= 1, '1 or more'),
                                 ('workload', cfg.workload in ('random', 'instruction'), 'random or instruction'),
                                 ('world_size', cfg.world_size >= 1, '1 or more'), ('gpu_gib', cfg.gpu_gib > 0, 'above 0'),
                                 ('target_fraction', 0 < cfg.target_fraction <= 1, 'above 0, at most 1'),
                                 ('only', cfg.only in ('', 'sft', 'scalebio', 'lisa', 'uncropped', 'all_logits'),
                                  'internal')):
        if not ok:
            raise ValueError(f"--{key} must be {requirement}, got {getattr(cfg, key)!r}")
    micro_steps(train_cfg, cfg.world_size if cfg.plan else 1)


def main(argv):
    cfg = override(BenchConfig(), argv)
    check_bench_config(cfg)
    shape = model_config(cfg)
    device = cfg.device if cfg.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    # variant: (LISA's active blocks, --crop_padding, --logits_at_targets); None: one model, no LISA; 0: LISA off
    variants = {'sft': (None, True, True), 'scalebio': (0, True, True), 'lisa': (cfg.lisa_layers, True, True)}
    if cfg.workload == 'instruction':
        variants.update(uncropped=(0, False, True), all_logits=(0, True, False))
    if cfg.plan:
        return memory_plan_main(cfg, shape)

    if cfg.only:  # a fresh process for one variant's peak memory, run past a LISA switch
        _, step, _ = build(cfg, device, *variants[cfg.only])
        for i in range(cfg.lisa_interval + 2):
            step(i)
        print(json.dumps({'peak_rss_bytes': peak_rss_bytes(), 'peak_cuda_bytes':
                          torch.cuda.max_memory_allocated() if device.startswith('cuda') else None}))
        return

    built = {name: build(cfg, device, *variant) for name, variant in variants.items()}
    n_params = built['sft'][0][0].num_params()
    first_state, times, useful = time_variants(cfg, device, built)
    state = {name: s() for name, (_, _, s) in built.items()}  # after the switches of the timed steps
    switches = (cfg.warmup + cfg.repeats - 1) // cfg.lisa_interval

    rows_train = cfg.n_sources * cfg.batch_per_source
    val_rows = cfg.val_batch * (2 if cfg.central_difference else 1)
    floor_ratio = (2 * rows_train + val_rows) / rows_train
    median = {name: float(np.median(t)) for name, t in times.items()}
    tokens_per_second = {name: float(np.median(np.array(useful[name]) / np.array(times[name]))) for name in built}
    # FLOPs per token: 2 per parameter forward, 2 for input gradients, 2 for weight gradients (skipped by
    # LISA's frozen blocks), plus attention, 12·n_layer·n_embd·block_size (as nanoGPT's estimate_mfu)
    block = sum(p.numel() for p in built['sft'][0][0].blocks[0].parameters())
    attention = 12 * shape.n_layer * shape.n_embd * cfg.block_size
    flops_per_token = {'sft': 6 * n_params + attention, 'scalebio': 6 * n_params + attention,
                       'lisa': 6 * n_params - 2 * (shape.n_layer - cfg.lisa_layers) * block + attention,
                       'uncropped': 6 * n_params + attention, 'all_logits': 6 * n_params + attention}
    peak = matmul_peak_flops(device) if device.startswith('cuda') else None
    active_fraction = (n_params - (shape.n_layer - cfg.lisa_layers) * block) / n_params
    result = {'device': device, 'workload': cfg.workload, 'n_params': n_params, 'floor_ratio': floor_ratio,
              'scalebio_over_sft': median['scalebio'] / median['sft'], 'lisa_over_sft': median['lisa'] / median['sft'],
              'lisa_over_scalebio': median['lisa'] / median['scalebio'],
              'state_bytes': {name: sum(s) for name, s in state.items()},
              'parameter_and_moment_bytes': {name: s[0] for name, s in state.items()},
              'gradient_bytes': {name: s[1] for name, s in state.items()},
              'lisa_state_over_sft_state': sum(state['lisa']) / sum(state['sft']),
              'lisa_switches_timed': switches,
              'lisa_state_bytes_before_and_after_switches': [sum(first_state['lisa']), sum(state['lisa'])],
              # full fine-tuning keeps 4 numbers per parameter; two copies with LISA keep 2·(1 + 3·active),
              # and p's Adam two moments per source
              'predicted_lisa_state_over_sft_state': (2 * (1 + 3 * active_fraction) * n_params + 2 * cfg.n_sources)
              / (4 * n_params),
              'seconds_per_step': median,
              'spread': {name: float(np.percentile(t, 75) - np.percentile(t, 25)) for name, t in times.items()},
              'tokens_per_second': tokens_per_second}  # useful tokens (not padding) per second, median over steps
    if 'uncropped' in built:
        result['cropped_over_uncropped'] = tokens_per_second['scalebio'] / tokens_per_second['uncropped']
        result['logits_at_targets_over_all'] = tokens_per_second['scalebio'] / tokens_per_second['all_logits']
    if peak:  # useful FLOPs: a padded position's are spent, not counted
        result['mfu'] = {name: flops_per_token[name] * tokens_per_second[name] / peak for name in built}
        result['matmul_peak_flops'] = peak
    if cfg.peak_rss:  # peak memory per variant: a fresh process each (CUDA: max allocated; CPU: peak RSS)
        peaks = {name: json.loads(subprocess.run([sys.executable, '-m', 'tools.bench', *argv, f'--only={name}'],
                                                 capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                 for name in built}
        result['peak_rss_bytes'] = {name: p['peak_rss_bytes'] for name, p in peaks.items()}
        if device.startswith('cuda'):
            result['peak_cuda_bytes'] = {name: p['peak_cuda_bytes'] for name, p in peaks.items()}

    print(f"{'variant':<10}{'s/step':>10}{'spread':>10}{'tokens/s':>12}{'state MiB':>10}{'grads MiB':>10}")
    for name in built:
        print(f"{name:<10}{median[name]:>10.4f}{result['spread'][name]:>10.4f}{result['tokens_per_second'][name]:>12.0f}"
              f"{sum(state[name]) / 2**20:>10.2f}{state[name][1] / 2**20:>10.2f}")
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
