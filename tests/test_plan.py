"""plan.py's counted bytes are checked against real runs in tests/test_distributed.py (1, 2 and 4 processes)."""
import pytest

import bench
from model import MODEL_PRESETS, GPTConfig
from plan import check_plan, state_plan


def test_a_run_whose_state_alone_exceeds_the_gpu_is_refused_in_one_line():
    plan = state_plan(GPTConfig(**MODEL_PRESETS['llama3-8b']), world_size=1, lisa_layers=2)
    assert check_plan(plan, 141 * 2**30, 'cuda:0') == sum(plan.values())
    with pytest.raises(ValueError, match=r"cuda:0: .* need 93\.1 GiB per GPU, more than its 80\.0 GiB"):
        check_plan(plan, 80 * 2**30, 'cuda:0')


def test_bench_plan_shards_over_gpus_and_lisa_shrinks_gradients_and_moments_only():
    one = bench.main(['--plan=True', '--model=yi-34b', '--lisa_layers=2', '--world_size=1'])
    eight = bench.main(['--plan=True', '--model=yi-34b', '--lisa_layers=2', '--world_size=8'])
    full = bench.main(['--plan=True', '--model=yi-34b', '--lisa_layers=0', '--world_size=8'])
    for name in one:
        assert eight[name] == pytest.approx(one[name] / 8, rel=1e-3)
    assert full['parameters'] == eight['parameters']
    assert full['gradients'] > 10 * eight['gradients']
    assert full['optimizer_state'] == 2 * full['gradients']
