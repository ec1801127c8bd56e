"""
Every setting of a run, and how a command line sets it: each field of TrainConfig below is `--field=value`,
parsed as the type of its default (nanoGPT's configurator, without exec). tools/sample.py, tools/bench.py and
tools/compare.py
parse their own dataclasses with the same `override`.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from bilevel import SOURCE_LOGITS_UPDATES
from data import BUILTIN_TASKS
from lisa import LISA_DRAWS
from tokenizer import tokenizer_files

# --model=NAME: shapes used without weights (or with --init_from's own config.json instead)
MODEL_PRESETS = {
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768), 'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280), 'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    'llama3.2-1b': dict(family='llama', n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192,
                        head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    'llama3-8b': dict(family='llama', n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, mlp_hidden=14336,
                      vocab_size=128256, rope_theta=500000.0, tie_embeddings=False),
    # https://huggingface.co/EleutherAI/pythia-160m/blob/main/config.json, .../gpt-neox-20b/blob/main/config.json
    'pythia-160m': dict(family='gpt_neox', n_layer=12, n_head=12, n_embd=768, vocab_size=50304, rotary_pct=0.25,
                        parallel_residual=True, tie_embeddings=False),
    'gpt-neox-20b': dict(family='gpt_neox', n_layer=44, n_head=64, n_embd=6144, vocab_size=50432, rotary_pct=0.25,
                         parallel_residual=True, tie_embeddings=False, gelu='tanh'),  # its gelu_fast
    # https://huggingface.co/01-ai/Yi-34B/blob/main/config.json
    'yi-34b': dict(family='llama', n_layer=60, n_head=56, n_kv_head=8, n_embd=7168, mlp_hidden=20480,
                   vocab_size=64000, rope_theta=5000000.0, tie_embeddings=False),
}

METHODS = ('scalebio', 'fixed', 'irdro', 'rholoss')  # the steps: steps.py (scalebio), baselines.py (the rest)


@dataclass
class TrainConfig:
    # ScaleBiO (bilevel.py): the penalty α, and p, the source logits (λ = softmax(p))
    penalty_alpha: float = 10.0     # α (the authors: 10 for GPT-2, 100 for 8B-34B models)
    source_logits_update: str = 'adam'  # p's update, a key of bilevel.SOURCE_LOGITS_UPDATES: 'adam' (the authors':
                                    # AdamW, betas 0.9, 0.999) or 'mirror' (ours: exponentiated gradient)
    source_logits_lr: float = 0.0   # p's base step size; 0: the rule's own (adam: the authors' 1e-2; mirror 0.1)
    source_logits_weight_decay: float = 0.0  # p's weight decay, towards uniform weights
    central_difference: bool = False  # an option of ours: u descends α·L_train − L_val, p's gradient has bias O(1/α²)
                                    # instead of the forward difference's O(1/α) (bilevel.py; steps.guard_lower_copy)
    alpha_growth: float = 1.0       # τ: α is multiplied by τ every alpha_interval steps (1.0: constant α)
    alpha_interval: int = 0
    # data (data.py)
    data: str = 'denoise'           # 'denoise', 'noise_ladder', 'mixture', 'dilution', 'lengths' or a folder (data.py)
    tokenizer: str = 'bytes'        # or a local folder: tokenizer.json, or GPT-2's vocab.json + merges.txt
    seed: int = 0
    batch_per_source: int = 16      # training rows per source per step (stratified; stage two: S times as many in all)
    val_batch: int = 32             # validation rows per step, for L_val
    source_loss: str = 'token'      # a source's loss: 'token' (every token weighs alike across sources, as in L_val:
                                    # steps.model_objective) or 'example' (the mean of its rows' token means)
    # model (model.py), trained from scratch unless --init_from
    model: str = ''                 # a shape of MODEL_PRESETS above (gpt2 ... gpt2-xl, pythia-160m, llama3-8b, ...),
                                    # or n_layer etc.; --init_from's config.json overrides both
    n_layer: int = 0                # blocks; 0: the preset's, or 4 (with --model: its width at this depth)
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32
    dropout: float = 0.0
    bias: bool = True
    init_from: str = ''             # a local Hugging Face folder, GPT-2, GPT-NeoX or Llama (hf.py): both copies start from it
    # optimisation of the model copies u and w, and the schedule all three share
    max_steps: int = 1500           # the horizon of the learning-rate schedule
    stop_at: int = 0                # stop (with a checkpoint) after this many steps; 0: run to max_steps
    lr: float = 1e-3                # AdamW for both model copies
    weight_decay: float = 0.01      # model matrices only
    warmup_steps: int = 30          # linear warmup of u, w and p (the authors' second release: 3% of the steps)
    grad_clip: float = 1.0          # each model's gradient norm clipped at this (ScaleBiO: × α, as the authors); 0: off
    # LISA (lisa.py)
    lisa_layers: int = 0            # blocks unfrozen at a time, fewer than the model's; 0: full fine-tuning (lisa.py)
    lisa_interval: int = 20         # steps between LISA draws (the authors' and LMFlow's K = 20)
    lisa_draw: str = 'shared'       # 'shared': u and w train the same blocks; 'independent': the authors' (lisa.py)
    lisa_merge_frozen: bool = False  # an option: a block that freezes takes the mean of u's and w's values (lisa.py)
    # other methods on the same batches: stage two ('fixed') and baselines.py
    method: str = 'scalebio'        # 'scalebio' learns weights; 'fixed' uses given ones; baselines.py: 'irdro', 'rholoss'
    weights: str = 'uniform'        # fixed: 'uniform', 'val_only' (the val split alone) or a scalebio summary.json
    sampling: str = 'proportional'  # fixed: rows per source in proportion to the weights (steps.proportional_rows), or
                                    # 'stratified': batch_per_source rows of each source, their losses weighted
    dro_temperature: float = 1.0    # irdro: τ in w ∝ exp(loss/τ) (the IR-DRO authors' default)
    reference: str = ''             # rholoss: the out_dir of a run whose best model gives irreducible losses
    rho_candidates: int = 4         # rholoss: each step selects a training batch out of this many times as many
    # files: out_dir's logs, checkpoints and exports
    out_dir: str = 'out'             # one run's folder: a second run there needs --resume=True or --overwrite=True
    overwrite: bool = False         # a fresh run in a used out_dir: the previous run's files go (at its first checkpoint)
    resume: bool = False
    eval_interval: int = 100
    eval_batches: int = 4           # batches of val_batch rows per split for evaluation
    ckpt_interval: int = 500
    save_best: bool = True          # out_dir/best: the upper model at each new best val loss (tools/sample.py, RHO-LOSS's
                                    # reference read it); False for large models: a whole model written each time
    export: bool = False            # at the end: out_dir/hf (the trained model, HF format), out_dir/mixture.json
    # how the same step runs: devices, precision, memory
    device: str = 'auto'            # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = 'float32'          # parameter dtype: float32, or float64 (exactness tests, CPU)
    amp: bool = True                # bf16 compute on CUDA (autocast, or FSDP's mixed precision); no effect on CPU
    compile: bool = False           # torch.compile each block (meant for CUDA)
    micro_batch: int = 0            # rows per source per forward on each rank (gradient accumulation); 0: all
    checkpoint_blocks: bool = False  # activation checkpointing per block: less memory, one more forward (model.py)
    logits_at_targets: bool = True  # the head and cross-entropy only at positions with a target (model.py)
    crop_padding: bool = True       # each forward's rows cut to the longest one's last target (steps.crop_to_targets)
    lower_first: bool = False       # u steps before w's forward: one copy's gradients at a time (steps.py)
    cpu_offload: bool = False       # FSDP2 keeps parameters, gradients and AdamW state in host memory (CUDA, torchrun)
    check_memory: bool = True       # CUDA: refuse a run whose counted state alone exceeds the GPU (plan.py)
    dist_timeout: float = 10.0      # minutes a collective may wait for its peers before every rank stops


# fields that may differ between a run and its resumption (not max_steps: the schedule's horizon); micro_batch
# splits the same step into more forwards (a smaller GPU; train.py picks one on CUDA when the batch does not fit)
RESUMABLE_CHANGES = {'resume', 'stop_at', 'out_dir', 'overwrite', 'eval_interval', 'ckpt_interval', 'device',
                     'save_best', 'check_memory', 'dist_timeout', 'micro_batch'}

# every value is checked against these rules before anything runs (parse_config); micro_steps checks what
# depends on the number of processes, and train.py that the out_dir can be written and is not in use
CHOICES = {'method': METHODS, 'dtype': ('float32', 'float64'), 'source_logits_update': tuple(SOURCE_LOGITS_UPDATES),
           'model': ('', *MODEL_PRESETS), 'lisa_draw': LISA_DRAWS, 'source_loss': ('example', 'token'),
           'sampling': ('stratified', 'proportional')}
RULES = [  # (fields, the rule, what the error says)
    (('max_steps', 'lisa_interval', 'eval_interval', 'ckpt_interval', 'batch_per_source', 'val_batch',
      'eval_batches', 'block_size', 'n_head', 'n_embd', 'penalty_alpha', 'alpha_growth',
      'rho_candidates', 'dro_temperature', 'dist_timeout'), lambda v: v > 0, "must be positive"),
    (('micro_batch', 'stop_at', 'lisa_layers', 'alpha_interval', 'lr', 'source_logits_lr', 'weight_decay',
      'source_logits_weight_decay', 'grad_clip', 'warmup_steps', 'seed', 'n_layer'), lambda v: v >= 0,
     "must be 0 or positive"),  # 0 has a meaning for each: off, all, or none
    (('dropout',), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (('dist_timeout',), lambda v: 0.1 <= v <= 10_000, "must be between 0.1 and 10000 (minutes)"),
    (('seed',), lambda v: v < 2**63, "must be below 2**63 (torch's generator takes 64 bits)"),
    (('batch_per_source', 'val_batch', 'micro_batch', 'eval_batches', 'block_size', 'n_layer', 'n_head', 'n_embd',
      'lisa_layers', 'rho_candidates'), lambda v: v <= 2**20, "must be at most 2**20 = 1048576"),  # sizes
]
PATHS = ('data', 'tokenizer', 'weights', 'reference', 'out_dir', 'init_from')  # '~' is expanded in each
SCALEBIO_ONLY = ('penalty_alpha', 'source_logits_update', 'source_logits_lr', 'source_logits_weight_decay',
                 'central_difference', 'alpha_growth', 'alpha_interval', 'lower_first')
# fields a run uses only in some settings: set to anything but their default elsewhere, they are an error, never
# silently ignored. (fields, the setting that uses them, its name for the error)
USED_ONLY = [
    (('weights',), lambda cfg: cfg.method == 'fixed', "--method=fixed"),
    (('sampling',), lambda cfg: cfg.method == 'fixed' and cfg.weights != 'val_only',
     "--method=fixed and weights over the sources (--weights=val_only trains on the validation split alone)"),
    (SCALEBIO_ONLY, lambda cfg: cfg.method == 'scalebio', "--method=scalebio (a baseline trains one model, learns no p)"),
    (('amp', 'check_memory'), lambda cfg: cfg.device != 'cpu', "CUDA (--device=cpu computes in --dtype, plans nothing)"),
    (('dro_temperature',), lambda cfg: cfg.method == 'irdro', "--method=irdro"),
    (('reference', 'rho_candidates'), lambda cfg: cfg.method == 'rholoss', "--method=rholoss"),
    (('model', 'n_layer', 'n_head', 'n_embd', 'bias'), lambda cfg: not cfg.init_from,
     "a model built from scratch (with --init_from, its config.json gives the shape)"),
    (('n_head', 'n_embd'), lambda cfg: not cfg.model, "a model without --model (the preset gives its width)"),
    (('lisa_interval',), lambda cfg: cfg.lisa_layers > 0, "LISA (--lisa_layers > 0)"),
    (('lisa_draw', 'lisa_merge_frozen'), lambda cfg: cfg.lisa_layers > 0 and cfg.method == 'scalebio',
     "LISA on ScaleBiO's two copies (--lisa_layers > 0, --method=scalebio)"),
    (('alpha_interval',), lambda cfg: cfg.alpha_growth != 1.0, "a growing α (--alpha_growth other than 1)"),
    (('alpha_growth',), lambda cfg: cfg.alpha_interval > 0, "a growing α (--alpha_interval > 0)"),
]


FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (float, 'float')]
# the values that size a step: each fits its dtype, yet one too large (or a temperature too small) ends in a NaN
STEP_SIZES = ('lr', 'weight_decay', 'penalty_alpha', 'alpha_growth', 'source_logits_lr', 'source_logits_weight_decay',
              'dro_temperature')


def changed_step_sizes(cfg):
    """--field=value of each of STEP_SIZES set to other than its default (what a non-finite loss names)."""
    default = TrainConfig()
    return ', '.join(f'--{k}={getattr(cfg, k):g}' for k in STEP_SIZES if getattr(cfg, k) != getattr(default, k))


def input_paths(cfg):
    """{'--field': path} of every file or folder a run reads besides its own out_dir/ckpt."""
    paths = {'--data': cfg.data if cfg.data not in BUILTIN_TASKS else '',
             '--tokenizer': cfg.tokenizer if cfg.tokenizer != 'bytes' else '', '--init_from': cfg.init_from,
             '--reference': os.path.join(cfg.reference, 'best') if cfg.reference else '',
             '--weights': cfg.weights if cfg.method == 'fixed' and cfg.weights not in ('uniform', 'val_only') else ''}
    return {field: path for field, path in paths.items() if path}


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
    """TrainConfig from command-line arguments, every value checked; it is not changed afterwards."""
    cfg = override(TrainConfig(), argv)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key} must be one of {', '.join(allowed).strip(', ')}, got '{getattr(cfg, key)}'")
    for keys, rule, requirement in RULES:  # a NaN fails every rule
        for key in keys:
            if not rule(getattr(cfg, key)) or getattr(cfg, key) in (math.inf, -math.inf):
                raise ValueError(f"--{key} {requirement}, got {getattr(cfg, key)}")
    finfo = torch.finfo(getattr(torch, cfg.dtype))
    for key in FLOAT_FIELDS:  # a value the parameters' dtype cannot hold would overflow at the first step, or be
        if not (abs(getattr(cfg, key)) <= finfo.max and not 0 < abs(getattr(cfg, key)) < finfo.tiny):  # flushed to 0
            raise ValueError(f"--{key}={getattr(cfg, key)} does not fit --dtype={cfg.dtype} (at most "
                             f"{finfo.max:.3g}, and 0 or at least {finfo.tiny:.3g}: train.py flushes smaller ones to 0)")
    if cfg.alpha_interval and cfg.alpha_growth != 1.0:  # α's last growth, and u's and w's steps ÷ its factor
        log_growth = (cfg.max_steps - 1) // cfg.alpha_interval * math.log(cfg.alpha_growth)
        if not abs(log_growth) < math.log(finfo.max) or \
                not math.log(finfo.tiny) <= math.log(cfg.penalty_alpha) + log_growth <= math.log(finfo.max):
            raise ValueError(f"--alpha_growth={cfg.alpha_growth} every {cfg.alpha_interval} steps takes α from "
                             f"--penalty_alpha={cfg.penalty_alpha} out of what --dtype={cfg.dtype} holds by step "
                             f"{cfg.max_steps}")
    defaults = TrainConfig()
    for keys, used, setting in USED_ONLY:
        for key in keys:
            if getattr(cfg, key) != getattr(defaults, key) and not used(cfg):
                raise ValueError(f"--{key}={getattr(cfg, key)} is used only with {setting}: this run would ignore it")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head} (each head gets "
                         f"n_embd / n_head dimensions)")
    if cfg.lisa_merge_frozen and cfg.lisa_draw != 'shared':
        raise ValueError("--lisa_merge_frozen=True merges the blocks both copies trained: it needs --lisa_draw=shared")
    if cfg.method in ('irdro', 'rholoss') and cfg.micro_batch:
        raise ValueError(f"--micro_batch is not implemented for --method={cfg.method}")
    check_device(cfg.device)
    for key in PATHS:
        setattr(cfg, key, os.path.expanduser(getattr(cfg, key)))
    cfg.out_dir = os.path.normpath(cfg.out_dir) if cfg.out_dir else ''  # 'a/new/../b' is a/b, and makes no a/new
    for field, path in input_paths(cfg).items():  # a run's files (log, ckpt, summary) go in a folder of their own
        if cfg.out_dir and os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(cfg.out_dir):
            raise ValueError(f"--out_dir={cfg.out_dir} is the {field} folder: the run's files would lie among its "
                             f"files; use another --out_dir")
    if cfg.init_from and cfg.tokenizer == 'bytes' and tokenizer_files(cfg.init_from):  # bytes would index its rows
        raise ValueError(f"--init_from={cfg.init_from} holds {', '.join(tokenizer_files(cfg.init_from))}: its model "
                         f"reads that tokenizer's ids, not raw bytes; add --tokenizer={cfg.init_from}")
    return cfg


def check_device(device):
    """--device names a device this process has: every process checks it, so under torchrun none falls back."""
    kind, _, index = device.partition(':')
    if device in ('auto', 'cpu') or (kind == 'cuda' and (index == '' or index.isdigit())):
        if kind == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"--device={device}, but this machine has no CUDA device that torch can use "
                             f"(--device=cpu, or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device={device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:<index>, got '{device}'")


def micro_steps(cfg, world_size):
    """Forwards per step and copy: --micro_batch rows per source each, out of each rank's share of the batch."""
    for key, rows in (('batch_per_source', cfg.batch_per_source), ('val_batch', cfg.val_batch)):
        if rows % world_size:
            raise ValueError(f"--{key}={rows} is the global count: it must divide among {world_size} processes")
    local_rows, local_val_rows = cfg.batch_per_source // world_size, cfg.val_batch // world_size
    if not cfg.micro_batch:
        return 1
    if local_rows % cfg.micro_batch:
        raise ValueError(f"--micro_batch={cfg.micro_batch} must divide the {local_rows} rows per source that each "
                         f"process gets (--batch_per_source={cfg.batch_per_source} over {world_size} process(es))")
    steps = local_rows // cfg.micro_batch
    if local_val_rows % steps:
        raise ValueError(f"--micro_batch={cfg.micro_batch} makes {steps} forwards per step, which must divide the "
                         f"{local_val_rows} validation rows each process gets (--val_batch={cfg.val_batch})")
    return steps
