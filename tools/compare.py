"""
Does ScaleBiO earn its cost? Every method on the same built-in tasks, and ScaleBiO's weights against the
best weights found by brute force. Each number is a train.py run (in this process), seed by seed.

    python -m tools.compare --what=baselines              # docs/results.md: stage-two test loss and weights per method
    python -m tools.compare --what=oracle --data=mixture  # grid over the simplex of the useful sources (2 seeds)
    python -m tools.compare --what=updates --data=mixture --seeds=5  # p's candidate updates against the oracle's best point
    python -m tools.compare --what=defaults --seeds=3       # train.py's default at α = 10, 100 and its variants, stage two
    python -m tools.compare --what=lisa --seeds=3           # ScaleBiO's weights with LISA (train.py's rule) and without it
    python -m tools.compare --what=lisa --pretrained=True   # the same, every run starting from a base model
    python -m tools.compare --what=ablations --seeds=2      # one factor at a time around train.py's defaults

Stage two is the paper's protocol: a fresh model trained with fixed weights for the same steps and seed
(ScaleBiO: its learned weights; uniform; val_only). IR-DRO and RHO-LOSS are online rules: their own run
is their stage two. Wall times are relative to `--method=fixed --weights=uniform` on the same task.
Results are written to out_dir as JSON and printed as Markdown tables.
"""
import contextlib
import dataclasses
import io
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

import train
from config import SCALEBIO_ONLY, TrainConfig, override, parse_config
from data import load_data


@dataclass
class CompareConfig:
    what: str = 'baselines'         # 'baselines', 'oracle', 'updates', or a study of variants: 'lisa', 'ablations'
    data: str = 'mixture'           # oracle and updates: the task
    tasks: str = ''                 # baselines and the studies: the tasks ('': each one's own, BASELINE_TASKS, STUDIES)
    seeds: int = 2                  # baselines, oracle, and updates for train.py's default p update: seeds 0..seeds-1
    candidate_seeds: int = 2        # updates: seeds for every other candidate
    grid_step: float = 0.1          # oracle: spacing of the grid on the simplex
    updates: str = 'adam,mirror'    # updates: the candidates to run (keys of bilevel.SOURCE_LOGITS_UPDATES)
    variants: str = ''              # lisa, ablations: the study's variants to run ('': its default list)
    first_seed: int = 0             # studies: seeds first_seed ... first_seed + seeds - 1 (to split runs among processes)
    stage_two: bool = True          # studies: also stage two, one config for every variant, only the weights differing
    pretrained: bool = False        # lisa: every run starts from a base model (uniform weights, LISA off), as the
                                    # paper's runs start from a pretrained LLM; base_steps steps, and every run too
    base_steps: int = 1000
    train_args: str = ''            # more train.py arguments for every run, space-separated
    out_dir: str = 'compare'


TRAIN_ARGS = []  # CompareConfig.train_args, split
# train.py fields compare.py sets for each run itself: --train_args may not move a run's folder or inputs
SET_PER_RUN = ('out_dir', 'overwrite', 'resume', 'data', 'seed', 'method', 'weights', 'sampling', 'reference',
               'init_from', 'export')
BASELINE_TASKS = 'denoise,noise_ladder,mixture,dilution'
# per task: the sources the oracle's grid spans (the others get weight 0)
USEFUL_SOURCES = {'mixture': ['add', 'sub'], 'dilution': ['add', 'diluted']}
# compare.py --what=lisa: 8 layers; LISA off, or on with 2 of 8 blocks: train.py's rule (a shared draw every 20
# steps, p's update as without LISA), the authors' recipe (independent draws), or the option that merges frozen blocks
LISA_SHAPE = ['--n_layer=8', '--lisa_layers=2']
LISA_VARIANTS = {'off': ['--lisa_layers=0'], 'default': [], 'authors': ['--lisa_draw=independent'],
                 'merged': ['--lisa_merge_frozen=True']}
# compare.py --what=ablations: one factor at a time around train.py's defaults (α 10, each copy clipped at α,
# weight decay 0.01), against the authors' choices, and the central difference of ours
ABLATION_VARIANTS = {'default': [], **{f'alpha {a}': [f'--penalty_alpha={a}'] for a in (3, 30, 100)},
                     'central difference': ['--central_difference=True'], 'no clipping': ['--grad_clip=0'],
                     'weight decay 5e-4': ['--weight_decay=5e-4']}
# compare.py --what=defaults: train.py's default at the authors' two penalties, on every built-in task; α = 100
# with the copies' rate divided by 10, α·lr as at α = 10 (the authors pair α = 100 with small rates, 1e-5 to 1e-7);
# and α = 10 grown to 100 halfway, the copies' rate divided by the same 10 (the authors' τ schedule, one growth)
DEFAULT_VARIANTS = {'alpha 10': [], 'alpha 100': ['--penalty_alpha=100'],
                    'alpha 100 lr 1e-4': ['--penalty_alpha=100', '--lr=1e-4'],
                    'alpha 10 to 100': ['--alpha_growth=10', '--alpha_interval=750']}
# a study runs each variant on each task and seed, and measures it against the closed form and against the
# reference variant on the same seed; stage two runs the shape plus stage_two_args for every variant
STUDIES = {
    'lisa': dict(shape=LISA_SHAPE, variants=LISA_VARIANTS, default='off,default', reference='off',
                 tasks='mixture,dilution,lengths,denoise,noise_ladder', stage_two_args=['--lisa_layers=0']),
    'ablations': dict(shape=[], variants=ABLATION_VARIANTS, default=','.join(ABLATION_VARIANTS), reference='default',
                      tasks='mixture,dilution', stage_two_args=[]),
    'defaults': dict(shape=[], variants=DEFAULT_VARIANTS, default=','.join(DEFAULT_VARIANTS), reference='alpha 10',
                     tasks='mixture,dilution,lengths,denoise,noise_ladder', stage_two_args=[]),
}
# the best weights in closed form (data.py)
CLOSED_FORM = {'mixture': [0.7, 0.3, 0.0], 'dilution': [0.6, 0.4, 0.0], 'lengths': [0.7, 0.3, 0.0]}  # lengths: by tokens
# what stage two would get at the best weights: the closed form, or all on the clean source where val is clean
BEST_WEIGHTS = {**CLOSED_FORM, 'denoise': [1.0, 0.0, 0.0], 'noise_ladder': [1.0, 0.0, 0.0, 0.0, 0.0]}


def run(out_dir, *args):
    """One quiet train.py run: its summary.json, with the wall time in seconds added. A run already done
    with the same arguments, the same resulting config and the same input files (weights, reference model)
    is read back, so an interrupted comparison continues where it stopped."""
    pretrained = any(a.startswith('--init_from') for a in args)  # its shape is the base model's
    baseline = any(a.startswith('--method=') and a != '--method=scalebio' for a in args)  # stage two, for one
    argv = [f'--out_dir={out_dir}', '--eval_interval=500', '--ckpt_interval=100000', *args,
            *[a for a in TRAIN_ARGS if not (pretrained and a.startswith(('--n_layer', '--n_head', '--n_embd')))
              and not (baseline and a.split('=')[0][2:] in (*SCALEBIO_ONLY, 'lisa_draw', 'lisa_merge_frozen'))]]
    cfg = parse_config(argv)
    inputs = [os.path.join(cfg.reference, 'best', 'meta.json')] if cfg.reference else []
    inputs += [cfg.weights] if os.path.isfile(cfg.weights) else []
    key = {'argv': argv, 'config': dataclasses.asdict(cfg), 'inputs': [open(path).read() for path in inputs]}
    done = os.path.join(out_dir, 'compare_run.json')
    if os.path.isfile(done):
        with open(done) as f:
            previous = json.load(f)
        if previous['key'] == key:
            return previous['summary']
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = train.main(argv + ['--overwrite=True'])  # a run with other arguments may be there
    summary['wall_seconds'] = time.time() - start
    with open(done, 'w') as f:
        json.dump({'key': key, 'summary': summary}, f)
    return summary


def stage_two(out_dir, weights_file, *args):
    """Stage two at the weights of weights_file, with loss weights (--sampling=stratified): the oracle's, the
    updates' and the LISA study's figures in docs/ were measured so. The baselines table runs both."""
    return run(out_dir, '--method=fixed', f'--weights={weights_file}', '--sampling=stratified', *args)


def baselines(cfg):
    """Per task and seed: uniform, ScaleBiO's stage two (loss-weighted and sampled), val_only, IR-DRO, RHO-LOSS."""
    rows, tasks = [], (cfg.tasks or BASELINE_TASKS).split(',')
    for task, seed in itertools.product(tasks, range(cfg.seeds)):
        folder = os.path.join(cfg.out_dir, 'baselines', task, f'seed{seed}')
        data = [f'--data={task}', f'--seed={seed}']
        uniform = run(f'{folder}/uniform', *data, '--method=fixed')
        learned = run(f'{folder}/scalebio', *data)
        results = {'uniform': uniform,
                   'scalebio, loss-weighted': stage_two(f'{folder}/scalebio-stage2', f'{folder}/scalebio/summary.json',
                                                        *data),
                   'scalebio, sampled': stage_two(f'{folder}/scalebio-sampled', f'{folder}/scalebio/summary.json',
                                                  *data, '--sampling=proportional'),
                   'val_only': run(f'{folder}/val_only', *data, '--method=fixed', '--weights=val_only'),
                   'irdro': run(f'{folder}/irdro', *data, '--method=irdro')}
        results['rholoss'] = run(f'{folder}/rholoss', *data, '--method=rholoss', f'--reference={folder}/val_only')
        if task in BEST_WEIGHTS:
            sources = load_data(task, parse_config(TRAIN_ARGS).block_size, seed).sources
            best = weights_file(folder, sources, BEST_WEIGHTS[task])
            results['best weights, sampled'] = stage_two(f'{folder}/best', best, *data, '--sampling=proportional')
        for method, summary in results.items():
            learning = learned['wall_seconds'] if method.startswith('scalebio') else 0  # stage one's cost too
            rows.append({'task': task, 'seed': seed, 'method': method, 'test_loss': summary['test_loss'],
                         'weights': dict(zip(summary['sources'], summary['weights'])),
                         'learned_weights': learned['weights'] if method.startswith('scalebio') else None,
                         'time_vs_uniform': (summary['wall_seconds'] + learning) / uniform['wall_seconds']})
            print(json.dumps(rows[-1]), flush=True)
    print('\n| task | method | stage-two test loss, by seed | weight each source received (seed 0) | wall time / '
          'uniform |\n|---|---|---|---|---|')
    for task in tasks:
        for method in dict.fromkeys(r['method'] for r in rows):
            group = [r for r in rows if r['task'] == task and r['method'] == method]
            losses = ' / '.join(f"{r['test_loss']:.4f}" for r in group)
            weights = ', '.join(f'{s} {w:.3f}' for s, w in group[0]['weights'].items())
            time_ratio = np.mean([r['time_vs_uniform'] for r in group])
            print(f"| {task} | {method} | {losses} | {weights} | {time_ratio:.2f} |")
    with open(os.path.join(cfg.out_dir, 'baselines', 'results.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    return rows


def grid(n, step):
    """Points of the simplex over n sources with coordinates multiple of step."""
    k = round(1 / step)
    return [np.array(c) / k for c in itertools.product(range(k + 1), repeat=n) if sum(c) == k]


def weights_file(folder, sources, weights):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'weights.json')
    with open(path, 'w') as f:
        json.dump({'sources': sources, 'weights': list(map(float, weights))}, f)
    return path


def grid_point_run(cfg, sources, weights, seed):
    """The stage-two run of one grid point and seed (read back if done)."""
    folder = os.path.join(cfg.out_dir, 'oracle', cfg.data)
    name = '_'.join(str(round(w / cfg.grid_step)) for w in weights)  # grid coordinates
    return stage_two(f'{folder}/{name}/seed{seed}', weights_file(f'{folder}/{name}', sources, weights),
                     f'--data={cfg.data}', f'--seed={seed}')


def oracle(cfg):
    """Each grid point: stage-two runs with those fixed weights, one per seed, scored by the mean val loss."""
    folder = os.path.join(cfg.out_dir, 'oracle', cfg.data)
    sources = load_data(cfg.data, TrainConfig.block_size, 0).sources
    useful = USEFUL_SOURCES[cfg.data]
    points = []
    for point in grid(len(useful), cfg.grid_step):
        weights = np.array([point[useful.index(s)] if s in useful else 0.0 for s in sources])
        runs = [grid_point_run(cfg, sources, weights, seed) for seed in range(cfg.seeds)]
        points.append({'weights': dict(zip(sources, weights.tolist())),
                       'val_loss': [r['val_loss'] for r in runs], 'test_loss': [r['test_loss'] for r in runs]})
        print(json.dumps(points[-1]), flush=True)
    mean_val = [np.mean(p['val_loss']) for p in points]
    best, worst = points[int(np.argmin(mean_val))], points[int(np.argmax(mean_val))]
    # the landscape must not be flat: best and worst differ by more than the seeds disagree at one point
    seed_spread = max(max(p['val_loss']) - min(p['val_loss']) for p in points)
    result = {'task': cfg.data, 'points': points, 'best': best, 'worst': worst,
              'best_minus_worst': float(max(mean_val) - min(mean_val)), 'max_seed_spread': float(seed_spread)}
    with open(os.path.join(folder, 'oracle.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f"\n| weights | val loss (mean of {cfg.seeds} seeds) | test loss |\n|---|---|---|")
    for p in points:
        print(f"| {' / '.join(f'{w:.1f}' for w in p['weights'].values())} | {np.mean(p['val_loss']):.4f} | "
              f"{np.mean(p['test_loss']):.4f} |")
    print(f"best {best['weights']} (test {np.mean(best['test_loss']):.4f}); best − worst val "
          f"{result['best_minus_worst']:.4f} vs largest seed spread {seed_spread:.4f}")
    return result


def compare_logits_rules(cfg):
    """Each candidate p update: learned weights and their stage-two test loss, seed by seed, against the
    oracle's best grid point (run `--what=oracle` first), whose stage-two run is repeated on every seed."""
    oracle_file = os.path.join(cfg.out_dir, 'oracle', cfg.data, 'oracle.json')
    if not os.path.isfile(oracle_file):
        raise FileNotFoundError(f"no oracle at {oracle_file}: run `python -m tools.compare --what=oracle "
                                f"--data={cfg.data} --out_dir={cfg.out_dir}` first")
    with open(oracle_file) as f:
        best = json.load(f)['best']
    target = np.array(list(best['weights'].values()))
    # test losses are compared seed by seed: two seeds' models differ by more than 1% at the same weights
    oracle_test = [grid_point_run(cfg, list(best['weights']), target, seed)['test_loss']
                   for seed in range(max(cfg.seeds, cfg.candidate_seeds))]
    folder = os.path.join(cfg.out_dir, 'updates', cfg.data)
    rows = []
    for update in cfg.updates.split(','):
        label = ' '.join([update, *TRAIN_ARGS])  # e.g. "mirror --central_difference=True"
        learned, tested = [], []
        for seed in range(cfg.seeds if update == parse_config([]).source_logits_update else cfg.candidate_seeds):
            run_dir = f"{folder}/{label.replace(' --', '+').replace('=', '_')}/seed{seed}"
            summary = run(run_dir, f'--data={cfg.data}', f'--seed={seed}', f'--source_logits_update={update}')
            learned.append(summary['weights'])
            tested.append(stage_two(f'{run_dir}-stage2', f'{run_dir}/summary.json', f'--data={cfg.data}',
                                    f'--seed={seed}')['test_loss'])
        learned = np.array(learned)
        rows.append({'update': label, 'weights': learned.tolist(),
                     'distance_to_oracle': float(np.abs(learned - target).max()),
                     'seed_spread': float((learned.max(0) - learned.min(0)).max()),
                     'test_loss_vs_oracle': float(np.mean(np.array(tested) / oracle_test[:len(tested)]) - 1)})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(folder, f"updates{'+'.join(TRAIN_ARGS)}.json"), 'w') as f:
        json.dump({'oracle_best': best, 'rows': rows}, f, indent=2)
    print("\n| p update | mean weights | max |λ − oracle| | seed spread | stage-two test loss vs oracle |\n"
          "|---|---|---|---|---|")
    for r in rows:
        mean = ' / '.join(f'{w:.3f}' for w in np.mean(r['weights'], axis=0))
        print(f"| {r['update']} | {mean} | {r['distance_to_oracle']:.3f} | {r['seed_spread']:.3f} | "
              f"{100 * r['test_loss_vs_oracle']:+.2f}% |")
    return rows


def study(cfg):
    """A study of STUDIES[cfg.what]: ScaleBiO's learned weights for each variant, seed by seed, with their
    distance to the closed form and to the same seed's reference variant (LISA off; train.py's defaults), and
    (stage_two) the test loss of stage two: one config for every variant, only the weights differing."""
    spec, rows = STUDIES[cfg.what], []
    shape, reference = spec['shape'], spec['reference']
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):  # seeds outermost: every task for a seed first
        for task in (cfg.tasks or spec['tasks']).split(','):
            folder = os.path.join(cfg.out_dir, cfg.what, task)
            start, run_shape = [], shape
            if cfg.pretrained:  # one base model per task, whatever the seed: the 'pretrained LLM' of every run
                folder = os.path.join(cfg.out_dir, f'{cfg.what}-pretrained', task)
                steps = f'--max_steps={cfg.base_steps}'
                run(f'{folder}/base', f'--data={task}', '--method=fixed', *shape, '--lisa_layers=0', steps,
                    '--export=True')
                start = [f'--init_from={folder}/base/hf', steps]
                run_shape = [a for a in shape if not a.startswith(('--n_layer', '--n_head', '--n_embd'))]  # the base's
            run_dirs = {name: f"{folder}/{name.replace(' ', '_')}/seed{seed}"
                        for name in (cfg.variants or spec['default']).split(',')}
            learned = {name: run(run_dir, f'--data={task}', f'--seed={seed}', *run_shape, *start,
                                 *spec['variants'][name])
                       for name, run_dir in run_dirs.items()}
            for name, summary in learned.items():
                weights = np.array(summary['weights'])
                row = {'task': task, 'seed': seed, 'variant': name, 'weights': weights.tolist(),
                       'to_reference': float(np.abs(weights - learned[reference]['weights']).max())
                       if reference in learned else None,
                       'to_closed_form': float(np.abs(weights - CLOSED_FORM[task]).max()) if task in CLOSED_FORM else None,
                       'wall_seconds': summary['wall_seconds']}
                if cfg.stage_two:
                    row['uniform_stage_two_test_loss'] = stage_two(f'{folder}/uniform/seed{seed}', 'uniform',
                                                                   f'--data={task}', f'--seed={seed}', *run_shape,
                                                                   *start, *spec['stage_two_args'])['test_loss']
                    row['stage_two_test_loss'] = stage_two(f'{run_dirs[name]}-stage2', f'{run_dirs[name]}/summary.json',
                                                           f'--data={task}', f'--seed={seed}', *run_shape,
                                                           *start, *spec['stage_two_args'])['test_loss']
                rows.append(row)
                print(json.dumps(row), flush=True)
    tasks = (cfg.tasks or spec['tasks']).replace(',', '-')  # one file per tasks and seeds, as processes split them
    results = os.path.join(cfg.out_dir, f'{cfg.what}-pretrained' if cfg.pretrained else cfg.what,
                           f'{cfg.what}_{tasks}_seeds{cfg.first_seed}-{cfg.first_seed + cfg.seeds - 1}.json')
    with open(results, 'w') as f:
        json.dump({'shape': shape, 'reference': reference, 'rows': rows}, f, indent=2)
    print(f"\n| task | seed | variant | weights | max |λ − closed form| | max |λ − {reference}| | stage-two test loss | "
          "uniform's | wall time |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        number = lambda x, f: '' if x is None else format(x, f)
        print(f"| {r['task']} | {r['seed']} | {r['variant']} | {' / '.join(f'{w:.3f}' for w in r['weights'])} | "
              f"{number(r['to_closed_form'], '.3f')} | {number(r['to_reference'], '.3f')} | "
              f"{number(r.get('stage_two_test_loss'), '.4f')} | {number(r.get('uniform_stage_two_test_loss'), '.4f')} | "
              f"{r['wall_seconds']:.0f} s |")
    return rows


def main(argv):
    cfg = override(CompareConfig(), argv)
    TRAIN_ARGS[:] = cfg.train_args.split()
    for key in ('seeds', 'candidate_seeds', 'base_steps'):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be 1 or more, got {getattr(cfg, key)}")
    if cfg.first_seed < 0:
        raise ValueError(f"--first_seed must be 0 or more, got {cfg.first_seed}")
    if not (0.01 <= cfg.grid_step <= 1 and abs(1 / cfg.grid_step - round(1 / cfg.grid_step)) < 1e-6 / cfg.grid_step):
        raise ValueError(f"--grid_step must be 1/k for a whole k from 1 to 100 (0.1, 0.25, 0.5), got {cfg.grid_step}")
    for arg in TRAIN_ARGS:
        key = arg.removeprefix('--').split('=')[0]
        if key in SET_PER_RUN:
            raise ValueError(f"--train_args: --{key} is set by compare.py for each run (its folders lie under "
                             f"--out_dir; tasks, seeds and methods are compare.py's own fields)")
    if cfg.what not in ('baselines', 'oracle', 'updates', *STUDIES):
        raise ValueError(f"--what must be baselines, oracle, updates, {', '.join(STUDIES)}, got '{cfg.what}'")
    known = STUDIES[cfg.what]['variants'] if cfg.what in STUDIES else {}
    unknown = set(cfg.variants.split(',')) - set(known) if cfg.variants else set()
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    if cfg.what in ('oracle', 'updates') and cfg.data not in USEFUL_SOURCES:
        raise ValueError(f"--data={cfg.data}: the oracle's grid is defined for {', '.join(USEFUL_SOURCES)}")
    return {'baselines': baselines, 'oracle': oracle, 'updates': compare_logits_rules}.get(cfg.what, study)(cfg)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
