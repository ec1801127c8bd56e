"""plan.py's counted bytes are checked against real runs in tests/test_distributed.py (1, 2 and 4 processes)."""
import re

import pytest
import torch

from tools import bench
from config import MODEL_PRESETS
from model import GPTConfig, make_model
from plan import (LEVERS, RESERVE, activation_plan, block_bytes_per_token, check_plan, check_run_memory,
                  largest_micro_batch, memory_plan, run_plan, state_plan)


def test_a_run_whose_state_alone_exceeds_the_gpu_is_refused_in_one_line():
    plan = state_plan(GPTConfig(**MODEL_PRESETS['llama3-8b']), world_size=1, lisa_layers=2)
    assert check_plan(plan, 141 * 2**30, 'cuda:0') == sum(plan.values())
    with pytest.raises(ValueError, match=r"cuda:0: .* need 93\.1 GiB per GPU, more than its 80\.0 GiB"):
        check_plan(plan, 80 * 2**30, 'cuda:0')


def test_a_plan_over_the_gpu_only_in_its_estimated_terms_warns_and_runs(capsys):
    from config import TrainConfig
    cfg = TrainConfig()  # train.py's levers, as build_models passes them
    plan = memory_plan(GPTConfig(**MODEL_PRESETS['llama3-8b']), 1, 2, tokens=1024, targets=1024,
                       **{lever: getattr(cfg, lever) for lever in LEVERS})
    state = sum(plan[name] for name in ('parameters', 'gradients', 'optimizer_state'))
    assert check_plan(plan, 100 * 2**30, 'cuda:0') == state < 100 * 2**30 < sum(plan.values())
    assert re.search(r"warning: cuda:0: the plan needs 1\d\d\.\d GiB per GPU .* --checkpoint_blocks=True",
                     capsys.readouterr().err)


def test_bench_plan_shards_over_gpus_and_lisa_shrinks_gradients_and_moments_only():
    one, eight, full = (bench.main(['--plan=True', '--model=yi-34b', f'--lisa_layers={layers}', f'--world_size={n}'])['state']
                        for layers, n in [(2, 1), (2, 8), (0, 8)])
    for name in one:
        assert eight[name] == pytest.approx(one[name] / 8, rel=1e-3)
    assert full['parameters'] == eight['parameters']
    assert full['gradients'] > 10 * eight['gradients']
    assert full['optimizer_state'] == 2 * full['gradients']


def saved_bytes(model, x, y):
    """Bytes of the tensors autograd saves in the forward, each storage once, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


@pytest.mark.parametrize('family', ['gpt2', 'gpt_neox', 'llama'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('trainable, target_fraction, checkpoint_blocks',
                         [(4, 1.0, False), (1, 0.5, False), (2, 0.25, True)])
def test_planned_activations_are_within_15_percent_of_what_autograd_saves(family, dtype, trainable, target_fraction,
                                                                          checkpoint_blocks):
    """Shapes other than the ones the per-block formula was fitted to (other widths, MLP and key/value ratios)."""
    shape = {'gpt2': {}, 'gpt_neox': dict(family='gpt_neox', rotary_pct=0.25, parallel_residual=True, tie_embeddings=False),
             'llama': dict(family='llama', n_kv_head=2, mlp_hidden=344, bias=False, tie_embeddings=False)}[family]
    config = GPTConfig(block_size=96, vocab_size=512, n_layer=4, n_head=6, n_embd=96, **shape)
    torch.manual_seed(0)
    model = make_model(config).to(dtype)
    model.checkpoint_blocks = checkpoint_blocks
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i < trainable)
    x = torch.randint(0, 512, (3, 96))
    y = x.clone()
    y[:, :int(96 * (1 - target_fraction))] = -1  # a prompt
    tokens, targets = x.numel(), int((y != -1).sum())
    planned = activation_plan(config, tokens, targets, trainable, dtype.itemsize, checkpoint_blocks)
    forward = planned['activations'] + targets * config.vocab_size * 4  # the saved log-softmax; its gradient comes later
    if checkpoint_blocks:  # the block recomputed in the backward is not saved by the forward
        forward -= tokens * block_bytes_per_token(config, dtype.itemsize, True)
    measured = saved_bytes(model, x, y)
    assert abs(forward / measured - 1) < 0.15, (forward, measured)


def test_the_lever_table_plans_each_combination_and_each_lever_saves_what_it_should():
    result = bench.main(['--plan=True', '--model=llama3-8b', '--lisa_layers=2', '--world_size=1', '--gpu_gib=141',
                         '--block_size=1024', '--target_fraction=0.5'])
    rows = result['levers']
    assert len(rows) == 16
    plain = next(r for r in rows if not any(r[lever] for lever in LEVERS))
    assert {k: plain[k] for k in result['state']} == result['state']  # the exact terms, as the state plan counts them
    for lever, term in [('checkpoint_blocks', 'activations'), ('logits_at_targets', 'logits'),
                        ('lower_first', 'gradients'), ('cpu_offload', 'optimizer_state')]:
        alone = next(r for r in rows if r[lever] and not any(r[o] for o in LEVERS if o != lever))
        assert alone[term] < plain[term] and alone['total'] < plain['total'], lever


def test_the_deepest_fitting_model_is_the_last_depth_whose_plan_fits():
    import dataclasses
    from plan import deepest_fitting
    config, gpu_bytes = GPTConfig(**MODEL_PRESETS['llama3-8b']), 139 * 2**30
    kw = dict(world_size=1, lisa_layers=2, tokens=1024, targets=1024, checkpoint_blocks=True, lower_first=True)
    n_layer, n_params = deepest_fitting(config, gpu_bytes, **kw)
    assert n_layer >= config.n_layer  # LLaMA-3-8B itself fits one 139 GiB GPU
    for depth, fits in [(n_layer, True), (n_layer + 1, False)]:
        assert (sum(memory_plan(dataclasses.replace(config, n_layer=depth), **kw).values()) + RESERVE <= gpu_bytes) == fits
    assert deepest_fitting(config, 2**30, **kw) is None


def test_the_run_plan_has_the_rows_train_py_runs_and_a_too_large_batch_is_split_into_the_largest_micro_batch_that_fits(
        monkeypatch, capsys):
    """Every source's rows and the validation rows in each copy's forward (3 sources: 16·3 + 32 rows on one GPU,
    a quarter of them per forward with --micro_batch=4), plus the reserve; on CUDA, --micro_batch=0 becomes the
    largest that fits, in one line."""
    import dataclasses
    from config import TrainConfig
    config, cfg = GPTConfig(**MODEL_PRESETS['llama3-8b']), TrainConfig(block_size=1024, lisa_layers=2)
    args = (config, 3, 1, 2, 4, True, True)  # sources, processes, copies, float32 state, bf16 compute, sharded
    for micro_batch, rows in [(0, 80), (4, 20)]:
        plan = run_plan(dataclasses.replace(cfg, micro_batch=micro_batch), *args)
        expected = memory_plan(config, 1, 2, 4, 2, tokens=rows * 1024, targets=rows * 1024, compute_size=2,
                               **{lever: getattr(cfg, lever) for lever in LEVERS})
        assert plan == {**expected, 'reserve': RESERVE}
    gpu_bytes = sum(run_plan(dataclasses.replace(cfg, micro_batch=4), *args).values())
    assert sum(run_plan(dataclasses.replace(cfg, micro_batch=8), *args).values()) > gpu_bytes
    assert largest_micro_batch(cfg, gpu_bytes, *args) == 4
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: type('GPU', (), {'total_memory': gpu_bytes}))
    assert check_run_memory(cfg, *args, 'cuda:0', 0) == 4
    assert "--micro_batch=0 puts each rank's whole batch in one forward, more than the GPU holds: --micro_batch=4" \
        in capsys.readouterr().out
    assert check_run_memory(dataclasses.replace(cfg, micro_batch=16), *args, 'cuda:0', 0) == 16  # the user's: kept
    assert "warning: --device=cuda:0: the plan needs" in capsys.readouterr().err
    assert check_run_memory(dataclasses.replace(cfg, method='irdro'), *args, 'cuda:0', 0) == 0  # takes no micro_batch
    assert "no --micro_batch fits" in capsys.readouterr().err
    assert largest_micro_batch(cfg, 2**30, *args) is None
