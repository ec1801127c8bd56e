"""Several processes on CPU (gloo) through torchrun must compute what one process computes."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
from hf import export_pretrained, from_pretrained
from model import GPT, GPTConfig, make_model
from plan import state_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float64: Adam's early sign-like steps amplify float32 rounding, so float32 runs drift apart by ~1e-4
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_per_source=4', '--val_batch=8',
        '--eval_batches=1', '--eval_interval=10', '--lisa_layers=1', '--lisa_interval=3', '--warmup_steps=3',
        '--dtype=float64', '--device=cpu', '--max_steps=30']


def torchrun(n_processes, *args, check=True):
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={n_processes}', 'train.py', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(out_dir):
    with open(os.path.join(out_dir, 'summary.json')) as f:
        return json.load(f)


def assert_same_run(a, b):
    assert max(abs(x - y) for x, y in zip(a['weights'], b['weights'])) <= 1e-6
    assert abs(a['val_loss'] - b['val_loss']) <= 1e-6 * abs(a['val_loss'])


def assert_planned(run):
    """plan.py's bytes for rank 0 are what it allocated (summary.json's per_rank_bytes), exactly."""
    config, cfg = GPTConfig(**run['model_config']), run['config']
    copies = 2 if cfg['method'] == 'scalebio' else 1
    assert state_plan(config, run['world_size'], cfg['lisa_layers'], 8, copies, cfg['lower_first']) == run['per_rank_bytes']


def model_states(out_dir):
    """Both copies' full parameters from out_dir's sharded checkpoint, read in one process."""
    dcp_to_torch_save(os.path.join(out_dir, 'ckpt'), os.path.join(out_dir, 'full.pt'))
    return torch.load(os.path.join(out_dir, 'full.pt'), weights_only=False)['models']


def test_two_and_four_processes_learn_what_one_learns_and_each_holds_its_share(tmp_path):
    one = train.main(TINY + [f'--out_dir={tmp_path}/1'])
    assert max(one['weights']) - min(one['weights']) > 1e-2  # the weights moved
    assert_planned(one)
    # 2 processes also split their rows into 2 accumulated micro-batches
    for n, extra in ((2, ['--micro_batch=1']), (4, [])):
        torchrun(n, *TINY, *extra, f'--out_dir={tmp_path}/{n}')
        many = summary(tmp_path / str(n))
        assert many['world_size'] == n
        assert_same_run(many, one)
        assert many['per_rank_state_bytes'] == pytest.approx(one['per_rank_state_bytes'] / n, rel=0.1)
        assert_planned(many)
        for copy_one, copy_many in zip(model_states(tmp_path / '1'), model_states(tmp_path / str(n))):
            for name, tensor in copy_one.items():
                assert torch.allclose(tensor, copy_many[name], atol=1e-10, rtol=0), name


def test_a_checkpoint_written_at_one_world_size_resumes_at_another(tmp_path):
    whole = train.main(TINY + [f'--out_dir={tmp_path}/whole'])
    torchrun(2, *TINY, f'--out_dir={tmp_path}/2to1', '--stop_at=14')
    train.main(TINY + [f'--out_dir={tmp_path}/2to1', '--resume=True'])
    assert_same_run(summary(tmp_path / '2to1'), whole)
    train.main(TINY + [f'--out_dir={tmp_path}/1to2', '--stop_at=14'])
    torchrun(2, *TINY, f'--out_dir={tmp_path}/1to2', '--resume=True')
    assert_same_run(summary(tmp_path / '1to2'), whole)


def test_lisa_under_fsdp_keeps_optimizer_state_for_the_drawn_blocks_only(tmp_path):
    shape = ['--n_layer=8', '--max_steps=5']
    torchrun(2, *TINY, *shape, '--lisa_layers=2', '--lisa_interval=2', f'--out_dir={tmp_path}/lisa')
    no_lisa = [a for a in TINY if not a.startswith('--lisa_interval')]  # a LISA setting a run without LISA refuses
    torchrun(2, *no_lisa, *shape, '--lisa_layers=0', f'--out_dir={tmp_path}/full')
    lisa, full = (summary(tmp_path / d)['per_rank_bytes']['optimizer_state'] for d in ('lisa', 'full'))
    for d in ('lisa', 'full'):
        assert_planned(summary(tmp_path / d))
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=8, n_head=2, n_embd=16))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    bound = (model.num_params() - 6 * block) / model.num_params()  # non-block (tied embedding once) + 2 blocks
    assert lisa / full <= bound * 1.001
    assert lisa / full > 0.9 * bound


def test_micro_batches_accumulate_to_the_same_run(tmp_path):
    whole = train.main(TINY + [f'--out_dir={tmp_path}/whole', '--max_steps=10'])
    pieces = train.main(TINY + [f'--out_dir={tmp_path}/pieces', '--max_steps=10', '--micro_batch=2'])
    assert pieces['weights'] == pytest.approx(whole['weights'], abs=1e-10)
    for split in 'val_loss', 'test_loss':  # evaluated in as many pieces as the step's forwards
        assert pieces[split] == pytest.approx(whole[split], abs=1e-10)


def test_evaluation_holds_no_more_rows_per_forward_than_a_step(tmp_path):
    """--micro_batch bounds evaluation's forwards too (plan.run_plan counts on it): the validation rows in as many
    pieces as a step takes."""
    cfg = train.parse_config(TINY + ['--micro_batch=2', f'--out_dir={tmp_path}'])
    run = train.build_run(cfg, train.init_distributed(cfg.device))
    rows = []
    run.models[1].register_forward_pre_hook(lambda model, args: rows.append(args[0].size(0)))
    train.evaluate(run, run.models[1], 'val')
    assert run.micro_steps == 2 and rows == [cfg.val_batch // 2] * (2 * cfg.eval_batches)


def test_token_weighted_source_losses_match_across_micro_batches_and_processes(tmp_path):
    """--source_loss=token on `mixture`, whose letters' rows hold 2 to 7 targets: each source's token count is global."""
    args = TINY + ['--data=mixture', '--source_loss=token', '--max_steps=10']
    whole = train.main(args + [f'--out_dir={tmp_path}/whole'])
    by_example = train.main(TINY + ['--data=mixture', '--max_steps=10', '--source_loss=example',
                                    f'--out_dir={tmp_path}/example'])
    assert max(abs(a - b) for a, b in zip(whole['weights'], by_example['weights'])) > 1e-6  # a different loss
    pieces = train.main(args + [f'--out_dir={tmp_path}/pieces', '--micro_batch=2'])
    assert pieces['weights'] == pytest.approx(whole['weights'], abs=1e-10)
    torchrun(2, *args, '--micro_batch=1', f'--out_dir={tmp_path}/2')
    assert_same_run(summary(tmp_path / '2'), whole)


@pytest.mark.parametrize('args, message', [
    (['--batch_per_source=3'], "error: --batch_per_source=3 is the global count: it must divide among 2 processes"),
    pytest.param(['--device=cuda'], "error: --device=cuda, but this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_an_error_ends_every_rank_and_names_the_problem(tmp_path, args, message):
    proc = torchrun(2, *TINY, *args, f'--out_dir={tmp_path}/out', check=False)
    assert proc.returncode != 0
    # torchrun stops the other workers (SIGTERM) once one exits with an error, so a rank still importing when
    # another fails ends without reaching the check: each rank prints the message or was stopped
    printed = [rank for rank in (0, 1) if f"[rank {rank}] {message}" in proc.stderr]
    assert printed and (len(printed) == 2 or 'SIGTERM' in proc.stderr)
    assert not (tmp_path / 'out').exists()


def launch_and_find_workers(tmp_path, *args):
    """torchrun with 2 processes, once training has logged: (the launcher, {rank: pid})."""
    launcher = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 'train.py', *TINY, '--max_steps=100000', f'--out_dir={tmp_path}', *args], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'log.jsonl').exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = {}
    for child in open(f'/proc/{launcher.pid}/task/{launcher.pid}/children').read().split():
        environ = open(f'/proc/{child}/environ', 'rb').read().split(b'\0')
        workers[next(int(v[5:]) for v in environ if v.startswith(b'RANK='))] = int(child)
    return launcher, workers


def test_a_killed_rank_ends_the_other_with_one_line(tmp_path):
    launcher, workers = launch_and_find_workers(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    try:
        _, stderr = launcher.communicate(timeout=25)
    except subprocess.TimeoutExpired:  # rank 0 waits on (torchrun kills it 30 s after its SIGTERM): where?
        os.kill(workers[0], signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=120)
        pytest.fail(f"rank 0 did not end within 25 s of rank 1; its stack:\n{stderr[-8000:]}")
    errors = [line for line in stderr.splitlines() if 'error:' in line]
    assert launcher.returncode != 0 and 'train.py", line' not in stderr  # no traceback from a rank (torchrun's own is its)
    # the collective is named where torch.distributed's call is on the stack; a wait inside FSDP2's own
    # collectives may have none (fsdp.peer_error), and which one rank 0 is in when rank 1 dies is chance
    assert len(errors) == 1 and re.fullmatch(r"\[rank 0\] error: another process ended during "
                                             r"(the collective \w+|a collective)", errors[0]), stderr[-2000:]


def test_a_hung_peer_ends_every_live_rank_within_the_timeout_with_one_line(tmp_path):
    """Rank 1 stopped (SIGSTOP) in the middle of training: rank 0 waits --dist_timeout (6 s here), then exits
    with one line. The stopped rank is then killed here, as torchrun would 30 s after its SIGTERM, which a
    stopped process does not act on. As with a killed rank, the collective is named only when rank 0 waits
    inside torch.distributed's call rather than FSDP2's own."""
    launcher, workers = launch_and_find_workers(tmp_path, '--dist_timeout=0.1')
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.time()
    while os.path.exists(f'/proc/{workers[0]}') and open(f'/proc/{workers[0]}/stat').read().split()[2] != 'Z':
        time.sleep(0.2)
    assert time.time() - stopped < 6 + 10  # rank 0 is gone (a zombie until torchrun reaps it)
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and 'train.py", line' not in stderr
    errors = [line for line in stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and re.fullmatch(r"\[rank 0\] error: (the collective \w+|a collective) waited more than "
                                             r"--dist_timeout=0.1 minutes for another process: one is hung, or far "
                                             r"slower than this one", errors[0]), stderr[-2000:]


def test_bf16_mixed_precision_lisa_switches_need_and_get_the_warm_up():
    def launch(mode):
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               'tests/fsdp_bf16_lisa.py', mode], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
    without, with_warm_up = launch('none'), launch('warm_up')
    assert without.returncode != 0 and 'grad_dtype' in without.stderr  # the pitfall is real here
    assert with_warm_up.returncode == 0 and with_warm_up.stdout.count('all switches trained') == 2, \
        with_warm_up.stderr[-2000:]
    assert with_warm_up.stdout.count('the warm-up built no autograd graph') == 2
    assert with_warm_up.stdout.count('the warm-up left every parameter sharded') == 2


def test_compiled_blocks_do_not_recompile_at_every_lisa_switch(tmp_path):
    """torch.compile guards on requires_grad; compiling per block bounds the graphs (frozen or not, batch
    shapes), so 10 LISA switches must not cost 10 recompilations."""
    proc = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path}', '--max_steps=40', '--lisa_layers=2',
                           '--lisa_interval=4', '--compile=True', '--eval_interval=40', '--n_layer=4'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'TORCH_LOGS': 'recompiles'})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 < proc.stderr.count('Recompiling function forward') <= 6


def test_the_baselines_on_two_processes_match_one(tmp_path):
    """IR-DRO normalises its weights over the global batch, RHO-LOSS selects from the global candidates, a
    proportional stage two gives each rank an equal share of rows drawn unequally from the sources."""
    train.main(TINY + ['--method=fixed', '--weights=val_only', '--max_steps=10', f'--out_dir={tmp_path}/ref'])
    with open(tmp_path / 'weights.json', 'w') as f:  # 7, 4 and 1 rows of 12: ranks cut across sources
        json.dump({'sources': ['clean', 'noisy', 'irrelevant'], 'weights': [0.6, 0.3, 0.1]}, f)
    for method in (['--method=irdro'], ['--method=rholoss', f'--reference={tmp_path}/ref'],
                   ['--method=fixed', f'--weights={tmp_path}/weights.json', '--sampling=proportional']):
        one = train.main(TINY + method + [f'--out_dir={tmp_path}/1', '--overwrite=True'])
        torchrun(2, *TINY, *method, f'--out_dir={tmp_path}/2', '--overwrite=True')
        assert_same_run(summary(tmp_path / '2'), one)
        for name, tensor in model_states(tmp_path / '1')[0].items():
            assert torch.allclose(tensor, model_states(tmp_path / '2')[0][name], atol=1e-10, rtol=0), name


def test_a_llama_from_a_hugging_face_folder_trains_alike_on_one_two_and_four_processes(tmp_path):
    """Each process builds both copies on the meta device and reads the folder's tensors into its shards."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=32, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / 'llama', max_shard_size='20KB')
    args = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd'))] + [f'--init_from={tmp_path}/llama']
    one = train.main(args + [f'--out_dir={tmp_path}/1'])
    assert max(one['weights']) - min(one['weights']) > 1e-3  # 30 ScaleBiO steps, LISA on: the weights moved
    from tools import sample  # the best upper model completes a prompt
    assert len(sample.main([f'--out_dir={tmp_path}/1', '--temperature=0', '--num_samples=1', '--max_new_tokens=3'])) == 1
    torchrun(2, *args, f'--out_dir={tmp_path}/2to4', '--stop_at=14', '--export=True')  # 2 processes, resumed on 4
    torchrun(4, *args, f'--out_dir={tmp_path}/2to4', '--resume=True', '--export=True')
    assert_same_run(summary(tmp_path / '2to4'), one)
    assert_planned(one)
    assert_planned(summary(tmp_path / '2to4'))
    for copy_one, copy_many in zip(model_states(tmp_path / '1'), model_states(tmp_path / '2to4')):
        assert any('self_attn.q_proj' in name for name in copy_one)
        for name, tensor in copy_one.items():
            assert torch.allclose(tensor, copy_many[name], atol=1e-10, rtol=0), name
    exported = from_pretrained(str(tmp_path / '2to4' / 'hf')).state_dict()  # gathered tensor by tensor, float32
    for name, tensor in copy_many.items():
        assert torch.equal(exported[name], tensor.float()), name


@pytest.mark.parametrize('n_processes', [2, 4])
def test_building_both_copies_takes_each_rank_its_shards_and_reads_its_share_of_the_checkpoint(tmp_path, n_processes):
    """Meta construction and a sharded load: at 2 ranks, host memory grows by both copies' bytes / 2 plus the
    largest tensor, +10%, not by the whole model (a 27.5M-parameter Llama, 110 MB per copy in float32); and each
    rank reads its rows of each tensor: its share of the checkpoint, plus the files' headers, plus 2 MiB for the
    files Python and torch read meanwhile (their own modules), not the whole checkpoint."""
    config = GPTConfig(family='llama', block_size=32, vocab_size=256, n_layer=8, n_head=8, n_embd=512,
                       mlp_hidden=1536, bias=False, tie_embeddings=False)
    model = make_model(config)
    export_pretrained(model, str(tmp_path / 'llama'), max_shard_bytes=20_000_000)  # shards and an index
    copies_bytes = 2 * sum(p.numel() * 4 for p in model.parameters())
    files = [tmp_path / 'llama' / name for name in os.listdir(tmp_path / 'llama')]
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], 'little') if f.suffix == '.safetensors' else f.stat().st_size
                  for f in files)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={n_processes}', 'tests/load_memory.py', f'--init_from={tmp_path}/llama',
                           f'--out_dir={tmp_path}/out', '--block_size=32', '--device=cpu'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / 'out' / f'memory_{rank}.json').read_text()) for rank in range(n_processes)]
    share = copies_bytes / 2 / n_processes
    for rank in ranks:
        assert share < rank['read'] <= share + headers + 2 * 2**20, (rank, share, headers)
        if n_processes == 2:  # the memory bound holds no allowance for what each process holds apart from the
            bound = 1.1 * (copies_bytes / 2 + rank['largest_tensor'])  # model; at 4 ranks that is a larger share
            assert copies_bytes / 2 < rank['growth'] <= bound, (rank, bound)  # the shards were really filled


@pytest.mark.parametrize('family, tied', [('llama', True), ('llama', False), ('gpt_neox', False)])
def test_units_as_torchtitan_cuts_them_and_nothing_stays_gathered_after_evaluation(tmp_path, family, tied):
    """An untied head and the embedding are units of their own (not the root's, gathered through the whole
    step); a tied one stays in the root. After evaluate, a forward with no backward, every parameter of both
    copies is a sharded DTensor again: the root and [final norm, head] included, which FSDP2 keeps gathered.
    And the collectives our own code issues in a step and an export, counted: with --cpu_offload each meets a
    host tensor, which is why the process group has gloo beside nccl (fsdp.init_distributed)."""
    config = GPTConfig(family=family, block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=16, mlp_hidden=32,
                       bias=family == 'gpt_neox', tie_embeddings=tied, rotary_pct=0.5 if family == 'gpt_neox' else 0.0)
    export_pretrained(make_model(config), str(tmp_path / 'model'))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'tests/fsdp_probe.py', f'--init_from={tmp_path}/model', f'--out_dir={tmp_path}/out',
                           *[a for a in TINY if a.startswith(('--block_size', '--batch', '--val', '--eval', '--device'))]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / 'out' / f'units_{rank}.json').read_text()) for rank in range(2)]
    names = {'llama': ('model.embed_tokens', 'model.layers', ['model.norm', 'lm_head']),
             'gpt_neox': ('transformer.wte', 'transformer.h', ['transformer.ln_f', 'lm_head'])}
    embedding, blocks, last = names[family]
    first, last = ([], []) if tied else ([embedding], last)  # [norm, head] is one unit of two modules
    for rank in ranks:
        assert rank['units'] == [['root'] + first + [f'{blocks}.0', f'{blocks}.1'] + last] * 2
        assert rank['gathered'] == [[], []]
        # besides FSDP2's gathers and reduce-scatters (on the GPU even with offload): the losses' means over
        # ranks (steps.model_objective; u, with the forward difference, its source tokens and losses; w those and
        # the validation tokens and loss), one gradient norm per copy (clip_gradient's, a sharded norm made
        # whole), and in the export one gather per parameter
        fsdp_own = {'c10d._allgather_base_', 'c10d._reduce_scatter_base_'}
        assert {op: n for op, n in rank['step'].items() if op not in fsdp_own} == \
            {'c10d.allreduce_': 2 + 4, 'c10d_functional.all_reduce': 2}
        assert rank['export'] == {'c10d_functional.all_gather_into_tensor': rank['parameters']}


def test_a_gpt_neox_from_a_hugging_face_folder_trains_alike_on_one_and_two_processes(tmp_path):
    """GPT-NeoX (Pythia's architecture) loads, trains and exports under torchrun: its untied embedding and
    [final norm, head] are FSDP2 units of their own, as Llama's."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=256, max_position_embeddings=32,
                                           rotary_pct=0.5)
    transformers.GPTNeoXForCausalLM(hf_config).save_pretrained(tmp_path / 'neox', max_shard_size='20KB')
    args = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd'))] + [f'--init_from={tmp_path}/neox']
    one = train.main(args + [f'--out_dir={tmp_path}/1'])
    assert max(one['weights']) - min(one['weights']) > 1e-3 and one['model_config']['family'] == 'gpt_neox'
    torchrun(2, *args, f'--out_dir={tmp_path}/2', '--export=True')
    two = summary(tmp_path / '2')
    assert_same_run(two, one)
    assert_planned(two)
    exported = from_pretrained(str(tmp_path / '2' / 'hf')).state_dict()  # gathered tensor by tensor, float32
    for name, tensor in model_states(tmp_path / '2')[1].items():
        assert torch.equal(exported[name], tensor.float()), name
