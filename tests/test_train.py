import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
from checkpoint import read_meta
from steps import proportional_rows
from hf import export_pretrained, from_pretrained
from model import GPT, GPTConfig, make_model
from plan import state_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny float64 run with LISA switching every 3 steps: float32 runs drift apart by ~1e-4 (Adam amplifies rounding)
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=4', '--val_batch=8',
        '--eval_batches=1', '--eval_interval=5', '--lisa_layers=1', '--lisa_interval=3', '--warmup_steps=3',
        '--dtype=float64', '--device=cpu']


SHAPE = ('--n_layer', '--n_head', '--n_embd')  # a model from scratch; --init_from's config.json gives its own


def run(out_dir, *args):
    """train.main on TINY and args, TINY's values that args make unused left out (config.USED_ONLY)."""
    unused = SHAPE if any(a.startswith('--init_from') for a in args) else ()
    unused += ('--lisa_interval',) if '--lisa_layers=0' in args else ()
    return train.main([a for a in TINY if not a.startswith(unused)] + [f'--out_dir={out_dir}', *args])


def final_state(out_dir):
    """(p, the models' state dicts, step) of out_dir's checkpoint, read without any process group."""
    path = os.path.join(out_dir, 'ckpt')
    dcp_to_torch_save(path, os.path.join(out_dir, 'ckpt_full.pt'))
    ckpt = torch.load(os.path.join(out_dir, 'ckpt_full.pt'), weights_only=False)
    with open(os.path.join(path, 'meta.json')) as f:
        step = json.load(f)['step']
    return ckpt['tensors']['source_logits'], ckpt['models'], step


def assert_same_state(a, b, atol=0):
    """Bit for bit by default: a resumed run repeats the uninterrupted one exactly (same machine, same threads)."""
    assert a[2] == b[2]
    assert torch.allclose(a[0], b[0], atol=atol, rtol=0)
    for model_a, model_b in zip(a[1], b[1]):
        for k in model_a:
            assert torch.allclose(model_a[k], model_b[k], atol=atol, rtol=0), k


@pytest.mark.parametrize("source_logits_update", ['mirror', 'adam'])  # adam: p's Adam moments resume too
def test_resume_equals_the_uninterrupted_run(tmp_path, source_logits_update):
    update = f'--source_logits_update={source_logits_update}'
    whole = run(tmp_path / 'whole', '--max_steps=20', update)
    run(tmp_path / 'parts', '--max_steps=20', '--stop_at=10', update)
    assert final_state(tmp_path / 'parts')[2] == 10
    resumed = run(tmp_path / 'parts', '--max_steps=20', '--resume=True', update)
    assert resumed['weights'] == pytest.approx(whole['weights'], abs=1e-6)
    assert_same_state(final_state(tmp_path / 'parts'), final_state(tmp_path / 'whole'))
    assert max(whole['weights']) - min(whole['weights']) > 1e-3  # the weights did move
    for key in ['sources', 'weights', 'steps', 'val_loss', 'best_val_loss', 'test_loss', 'per_source_loss',
                'tokens_per_second', 'config']:
        assert key in whole
    log = [json.loads(line) for line in open(tmp_path / 'parts' / 'log.jsonl')]
    assert [r['step'] for r in log] == [5, 10, 15, 20]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_leaves_a_checkpoint_the_run_resumes_from(tmp_path, signum):
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--max_steps=100000',
                             '--ckpt_interval=100000'], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / 'log.jsonl').exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert 'continue with --resume=True' in stderr
    stopped_at = final_state(out)[2]
    assert stopped_at >= 5
    # resumed, it ends where an uninterrupted run with the same schedule ends
    args = ['--max_steps=100000', f'--stop_at={stopped_at + 4}']
    run(out, *args, '--resume=True')
    run(tmp_path / 'whole', *args)
    assert_same_state(final_state(out), final_state(tmp_path / 'whole'))


def test_torchruns_sigterm_after_an_error_does_not_cut_off_the_errors_line(tmp_path):
    """torchrun sends SIGTERM to every rank once one ends. A rank whose collective failed as the other ended is
    already unwinding out of the loop when it arrives: SIGTERM's default action would end it before its line."""
    script = f"""
import os, signal, sys
import train
def step(*args):
    raise RuntimeError('Connection closed by peer')
def peer_error(error, timeout):  # outside the loop, before train.cli's line: torchrun's SIGTERM arrives
    os.kill(os.getpid(), signal.SIGTERM)
    return ConnectionError('another process ended during a collective')
train.take_step, train.peer_error = step, peer_error
sys.exit(train.cli({TINY + [f'--out_dir={tmp_path}/out']!r}))
"""
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "error: another process ended during a collective", (proc.returncode, proc.stderr[-2000:])


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL: no handler runs, the lock dies with the process, and the last checkpoint (perhaps only ckpt.old, if
    the kill fell between its renames) resumes to the uninterrupted run's state."""
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--max_steps=100000',
                             '--ckpt_interval=5'], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'ckpt.old').exists() and time.time() < deadline:  # two checkpoints written
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    step = read_meta(str(out / 'ckpt'))['step']
    args = ['--max_steps=100000', f'--stop_at={step + 4}', '--ckpt_interval=5']
    run(out, *args, '--resume=True')
    run(tmp_path / 'whole', *args)
    assert_same_state(final_state(out), final_state(tmp_path / 'whole'))


@pytest.mark.parametrize('lower_first', [False, True])
def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, lower_first):
    """The upper copy's loss turns NaN (its forward is the second of a step): with --lower_first, u has stepped
    in memory by then, and the run still stops without saving."""
    forward, calls = GPT.forward, []

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        calls.append(1)
        return logits, (loss * float('nan') if loss is not None and len(calls) > 12 and len(calls) % 2 == 0 else loss)
    monkeypatch.setattr(GPT, 'forward', poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d+: upper_losses.*nan"):
        run(tmp_path, '--max_steps=20', '--ckpt_interval=2', f'--lower_first={lower_first}')
    logits, models, step = final_state(tmp_path)
    assert step >= 2 and torch.isfinite(logits).all()
    assert all(torch.isfinite(t).all() for m in models for t in m.values())


def test_fixed_weights_stage_two_reads_a_summary_and_trains_with_those_weights(tmp_path):
    learned = run(tmp_path / 'learn', '--max_steps=4')
    fixed = run(tmp_path / 'fixed', '--max_steps=4', '--method=fixed', f'--weights={tmp_path}/learn/summary.json',
                '--sampling=stratified')
    assert fixed['weights'] == pytest.approx(learned['weights'])  # the loss weights
    sampled = run(tmp_path / 'sampled', '--max_steps=4', '--method=fixed', f'--weights={tmp_path}/learn/summary.json')
    assert sampled['weights'] == pytest.approx([n / 12 for n in proportional_rows(learned['weights'], 12)])  # row shares
    # all weight on 'irrelevant' (random letters) against uniform: better on letters, worse on additions
    with open(tmp_path / 'letters.json', 'w') as f:
        json.dump({'sources': ['clean', 'noisy', 'irrelevant'], 'weights': [0.0, 0.0, 1.0]}, f)
    letters = run(tmp_path / 'letters', '--max_steps=40', '--lr=1e-2', '--method=fixed',
                  f'--weights={tmp_path}/letters.json')
    uniform = run(tmp_path / 'uniform', '--max_steps=40', '--lr=1e-2', '--method=fixed')
    assert uniform['weights'] == pytest.approx([1 / 3] * 3)
    assert letters['per_source_loss']['irrelevant'] < uniform['per_source_loss']['irrelevant']
    assert letters['per_source_loss']['clean'] > uniform['per_source_loss']['clean']
    assert letters['test_loss'] > uniform['test_loss']
    with pytest.raises(ValueError, match="has sources"):
        run(tmp_path / 'bad', '--max_steps=2', '--method=fixed', '--data=noise_ladder',
            f'--weights={tmp_path}/learn/summary.json')


def test_resume_with_a_different_config_is_an_error(tmp_path):
    run(tmp_path, '--max_steps=4')
    with pytest.raises(ValueError, match="different config: penalty_alpha=3.0"):
        run(tmp_path, '--max_steps=4', '--penalty_alpha=3', '--resume=True')


@pytest.mark.parametrize("args, message", [  # tests/test_errors.py runs the rest in-process, through train.cli
    (['--nonsense=1'], "error: unknown config field 'nonsense'; valid fields: penalty_alpha, source_logits_update,"),
    (['--data=/no/such/folder'], "error: --data=/no/such/folder is neither a built-in task"),
    (['--micro_batch=32'], "error: --micro_batch=32 must divide the 16 rows per source that each process gets"),
])
def test_bad_input_is_one_clear_error_line(tmp_path, args, message):
    out_dir = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'train.py', *args, f'--out_dir={out_dir}'], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message)
    assert not out_dir.exists()  # nothing half-written


def test_the_default_run_is_pinned(tmp_path):
    """The first 60 steps of `python train.py` in float64 (LISA off), to a relative 1e-12: a change that moves
    them on purpose updates these numbers in its own commit and says why."""
    summary = train.main([f'--out_dir={tmp_path}', '--dtype=float64', '--stop_at=60', '--eval_interval=60'])
    assert summary['weights'] == pytest.approx([0.4284246837288679, 0.42955681597645246, 0.14201850029467952],
                                               rel=1e-12)
    assert summary['val_loss'] == pytest.approx(2.5084461580209916, rel=1e-12)
    assert summary['test_loss'] == pytest.approx(2.5027537627200935, rel=1e-12)


def test_the_central_difference_with_mirror_descent_is_pinned(tmp_path):
    """Our two options together, pinned like the default: the same 60 steps as they ran when they were
    train.py's default (commit 22ed550, which clipped at 1.0 whatever α: 0.1·α here), so the options keep their
    behaviour."""
    summary = train.main([f'--out_dir={tmp_path}', '--dtype=float64', '--stop_at=60', '--eval_interval=60',
                          '--central_difference=True', '--source_logits_update=mirror', '--grad_clip=0.1'])
    assert summary['weights'] == pytest.approx([0.48870102580860963, 0.4877393139500004, 0.023559660241389894],
                                               rel=1e-12)
    assert summary['val_loss'] == pytest.approx(2.4837389537082455, rel=1e-12)
    assert summary['test_loss'] == pytest.approx(2.4746428516459096, rel=1e-12)


def test_scalebio_drops_the_irrelevant_source_early(tmp_path):
    """The method's direction, cheaply: the first 150 steps of the default run push 'irrelevant' down first. p's
    Adam moves a logit by at most about its rate, 1e-2, per step, so 150 steps can take a weight from 1/3 to
    about 0.1 at the most: below half its start is the bar."""
    summary = train.main([f'--out_dir={tmp_path}', '--stop_at=150', '--eval_interval=150'])
    weights = dict(zip(summary['sources'], summary['weights']))
    assert weights['irrelevant'] < 1 / 6 and weights['irrelevant'] == min(weights.values())


def test_export_writes_a_hugging_face_folder_and_a_mixture_that_init_from_reads(tmp_path):
    summary = run(tmp_path / 'first', '--max_steps=4', '--export=True')
    with open(tmp_path / 'first' / 'mixture.json') as f:
        mixture = json.load(f)
    assert mixture['sources'] == summary['sources'] and mixture['weights'] == summary['weights']
    exported = from_pretrained(str(tmp_path / 'first' / 'hf'))
    upper = final_state(tmp_path / 'first')[1][1]
    for name, tensor in exported.state_dict().items():
        assert torch.allclose(tensor.double(), upper[name], atol=1e-6), name  # the upper model, exported
    # both copies of a new run start from it (one step at learning rate 0 leaves them where they started)
    args = [a for a in TINY if a != '--dtype=float64' and not a.startswith(SHAPE)] + [f'--out_dir={tmp_path}/second', '--max_steps=1',
                                                            '--lr=0', f'--init_from={tmp_path}/first/hf']
    train.main(args)
    for copy in final_state(tmp_path / 'second')[1]:
        for name, tensor in exported.state_dict().items():
            assert torch.equal(tensor, copy[name]), name
    small = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    export_pretrained(small, str(tmp_path / 'small'))
    with pytest.raises(ValueError, match=r"model's vocabulary \(100\) must hold the tokenizer's \(256\)$"):
        train.main(args[:-1] + [f'--init_from={tmp_path}/small', '--overwrite=True'])
    export_pretrained(GPT(GPTConfig(block_size=8, vocab_size=256, n_layer=1, n_head=2, n_embd=16)), str(tmp_path / 'short'))
    with pytest.raises(ValueError, match=r"model's context \(8\) must be at least --block_size=16$"):
        train.main(args[:-1] + [f'--init_from={tmp_path}/short', '--overwrite=True'])


def test_sample_completes_a_prompt_with_the_best_upper_model(tmp_path):
    from tools import sample
    run(tmp_path, '--max_steps=5')
    greedy = sample.main([f'--out_dir={tmp_path}', '--temperature=0', '--num_samples=2', '--max_new_tokens=5'])
    assert len(greedy) == 2 and greedy[0] == greedy[1] and greedy[0]
    sampled = sample.main([f'--out_dir={tmp_path}', '--num_samples=3', '--max_new_tokens=8', '--top_k=5'])
    assert len(sampled) == 3
    with pytest.raises(FileNotFoundError, match="no .*best/meta.json"):
        sample.main([f'--out_dir={tmp_path}/nothing'])
    for bad in ('--prompt=', '--temperature=nan', '--temperature=-1', '--temperature=1e-20', '--device=foo'):
        with pytest.raises(ValueError, match=bad.split('=')[0]):
            sample.main([f'--out_dir={tmp_path}', bad])


def test_save_best_false_writes_no_best_model_and_the_same_summary(tmp_path):
    with_best = run(tmp_path / 'with', '--max_steps=10')
    without = run(tmp_path / 'without', '--max_steps=10', '--save_best=False')
    assert os.path.isdir(tmp_path / 'with' / 'best') and not os.path.exists(tmp_path / 'without' / 'best')
    assert (without['weights'], without['best_val_loss']) == (with_best['weights'], with_best['best_val_loss'])


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_activation_checkpointing_trains_the_same_run(tmp_path, family):
    """--checkpoint_blocks recomputes each block's activations in the backward: the same numbers, in float64
    (GPT-2 with dropout: the recomputation draws the same masks)."""
    if family == 'gpt2':
        shape = ['--dropout=0.1']
    else:
        llama = GPTConfig(family='llama', block_size=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                          mlp_hidden=32, bias=False, tie_embeddings=False)
        export_pretrained(make_model(llama), str(tmp_path / 'llama'))
        shape = [f'--init_from={tmp_path}/llama']
    runs = [run(tmp_path / str(on), '--max_steps=8', f'--checkpoint_blocks={on}', *shape) for on in (False, True)]
    assert runs[0]['weights'] == pytest.approx(runs[1]['weights'], abs=1e-10, rel=0)
    assert runs[0]['val_loss'] == pytest.approx(runs[1]['val_loss'], abs=1e-10, rel=0)
    assert max(runs[0]['weights']) - min(runs[0]['weights']) > 1e-4  # p moved


def test_logits_only_at_targets_train_the_same_run(tmp_path):
    """`mixture` masks the question of every row (-1 targets): the head runs on its answers only, same numbers."""
    runs = [run(tmp_path / str(on), '--data=mixture', '--max_steps=8', f'--logits_at_targets={on}') for on in (False, True)]
    assert runs[0]['weights'] == pytest.approx(runs[1]['weights'], abs=1e-10, rel=0)
    assert runs[0]['val_loss'] == pytest.approx(runs[1]['val_loss'], abs=1e-10, rel=0)
    assert max(runs[0]['weights']) - min(runs[0]['weights']) > 1e-4  # p moved


def test_lower_first_trains_the_same_run_with_one_copy_of_gradients_at_a_time(tmp_path):
    runs = [run(tmp_path / str(on), '--max_steps=8', f'--lower_first={on}') for on in (False, True)]
    assert runs[0]['weights'] == pytest.approx(runs[1]['weights'], abs=1e-10, rel=0)
    assert runs[0]['val_loss'] == pytest.approx(runs[1]['val_loss'], abs=1e-10, rel=0)
    both, one = (r['per_rank_bytes'] for r in runs)
    assert one['gradients'] * 2 == both['gradients'] and one['optimizer_state'] == both['optimizer_state']
    config = GPTConfig(**runs[1]['model_config'])
    assert state_plan(config, 1, 1, 8, 2, lower_first=True) == one


def test_cpu_offload_without_cuda_and_torchrun_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"--cpu_offload=True .* needs CUDA and torchrun"):
        run(tmp_path, '--max_steps=2', '--cpu_offload=True')


def test_the_guard_stops_a_lower_copy_that_climbs_its_validation_loss_before_it_doubles(tmp_path):
    """Under --central_difference=True a small α lets u, which descends α·L_train − L_val, raise its validation
    loss at will."""
    central = '--central_difference=True'
    with pytest.raises(ValueError, match=r"the lower copy's validation loss rose from .* --central_difference=False"):
        run(tmp_path, '--penalty_alpha=0.1', '--lr=1e-2', '--max_steps=200', '--eval_interval=5', central)
    with open(tmp_path / 'log.jsonl') as f:
        lower = [json.loads(line)['lower_val_loss'] for line in f]
    cfg = train.parse_config(TINY + [f'--out_dir={tmp_path}/again', '--penalty_alpha=0.1', central])
    start = train.build_run(cfg, train.init_distributed(cfg.device)).lower_val_start
    assert lower[-1] > 1.25 * start and lower[-2] > 1.25 * start  # two evaluations in a row
    assert max(lower) < 2 * start  # before the loss doubled
    summary = run(tmp_path / 'default', '--max_steps=30', '--eval_interval=5', central)  # silent at the default α
    assert summary['steps'] == 30
