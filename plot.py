"""
A picture of a run: each source's weight against steps, and the validation loss beside it, read from
out_dir/log.jsonl (one point every eval_interval steps). For ScaleBiO the weights are λ = softmax(p) and the
loss is the upper model w's; for a baseline, the share of the training signal each source received so far.

    python plot.py out                 # writes out/weights.png
    python plot.py out-uniform         # any train.py out_dir

matplotlib is optional (README's install command installs it); the training code never imports it.
"""
import json
import os
import sys


def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: train.py writes it at every evaluation (--eval_interval)")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty: the run has not reached its first evaluation")
    return records


def plot(out_dir):
    records = read_log(out_dir)
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot.py needs matplotlib: pip install matplotlib") from None
    steps = [r['step'] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for source in records[0]['weights']:
        left.plot(steps, [r['weights'][source] for r in records], marker='.', label=source)
    left.set(xlabel='step', ylabel='weight', ylim=(-0.02, 1.02), title='source weights')
    left.legend()
    right.plot(steps, [r['val_loss'] for r in records], marker='.', color='black')
    right.set(xlabel='step', ylabel='loss', title='validation loss')
    fig.tight_layout()
    path = os.path.join(out_dir, 'weights.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == '__main__':
    try:
        print(f"wrote {plot(sys.argv[1] if len(sys.argv) > 1 else 'out')}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
