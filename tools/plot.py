"""
A picture of a run: each source's weight against steps, and the validation loss beside it, read from
out_dir/log.jsonl (one point every eval_interval steps). For ScaleBiO the weights are λ = softmax(p) and the
loss is the upper model w's; for a baseline, the share of the training signal each source received so far.

    python -m tools.plot out                 # writes out/weights.png
    python -m tools.plot out-uniform         # any train.py out_dir
    python -m tools.plot out out-lisa --to=weights.png   # several runs side by side, one weights panel each

matplotlib is optional (README's install command installs it); the training code never imports it.
"""
import os
import sys

import outdir


def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: train.py writes it at every evaluation (--eval_interval)")
    records = [r for r in outdir.read_log(path)  # records of an evaluation, as train.py writes them
               if type(r.get('step')) is int and isinstance(r.get('weights'), dict)
               and isinstance(r.get('val_loss'), (int, float))
               and all(type(w) in (int, float) for w in r['weights'].values())]
    if not records:
        raise ValueError(f"{path} is empty: the run has not reached its first evaluation")
    return records


def plot(out_dirs, path=None):
    """One weights panel per run, side by side, then the validation losses of all of them; written to `path`
    (default: weights.png in the single out_dir)."""
    logs = [read_log(d) for d in out_dirs]
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot.py needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, len(logs) + 1, figsize=(5.5 * (len(logs) + 1), 4))
    for out_dir, records, left in zip(out_dirs, logs, axes):
        steps = [r['step'] for r in records]
        for source in records[0]['weights']:
            left.plot(steps, [r['weights'].get(source, float('nan')) for r in records], marker='.', label=source)
        left.set(xlabel='step', ylabel='weight', ylim=(-0.02, 1.02),
                 title='source weights' if len(logs) == 1 else f'source weights: {out_dir}')
        left.legend()
        axes[-1].plot(steps, [r['val_loss'] for r in records], marker='.', label=out_dir)
    axes[-1].set(xlabel='step', ylabel='loss', title='validation loss')
    if len(logs) > 1:
        axes[-1].legend()
    fig.tight_layout()
    path = os.path.join(path or out_dirs[0], 'weights.png') if not path or os.path.isdir(path) else path
    path += '' if os.path.splitext(path)[1] else '.png'  # what matplotlib writes for a name without a format
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == '__main__':
    to = [a.removeprefix('--to=') for a in sys.argv[1:] if a.startswith('--to=')]
    runs = [a for a in sys.argv[1:] if not a.startswith('--to=')] or ['out']
    try:
        if len(runs) > 1 and not to:
            raise ValueError("several runs need --to=PATH for the picture")
        print(f"wrote {plot(runs, to[-1] if to else None)}")
    except (ValueError, OSError, ImportError) as e:  # OSError: the picture cannot be written there
        sys.exit(f"error: {e}")
