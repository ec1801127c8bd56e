import atexit
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec('matplotlib') is not None
FIGURES = ['1_hypergradient.png', '2_bias.png', '3_single_loop.png', '4_noise.png', '5_lisa.png']


def start_quick_run():
    """`python -m theory --quick`, with --plots where matplotlib is installed, on a copy of theory/ (python -m finds
    the copy first), so results.json and the figures it writes leave the committed ones alone. Started when pytest
    collects this file, before any test runs: it takes minutes on one core, and the rest of the suite leaves a core
    idle much of the time. Returns the running process and the copy's folder."""
    folder = tempfile.mkdtemp(prefix='theory_run')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, 'theory'), os.path.join(folder, 'theory'),
                    ignore=shutil.ignore_patterns('figures', 'results.*', '__pycache__'))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    args = ['--quick'] + (['--plots'] if HAS_MATPLOTLIB else [])
    proc = subprocess.Popen([sys.executable, '-m', 'theory', *args], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    atexit.register(proc.kill)  # deselected tests: nothing waits for it
    return proc, pathlib.Path(folder) / 'theory'


QUICK_RUN = start_quick_run()


@pytest.fixture(scope='module')
def quick_run():
    """The finished quick run, and the copy's folder."""
    proc, folder = QUICK_RUN
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), folder


def test_theory_checks_pass_through_the_training_step(quick_run):
    """`python -m theory --quick`: every check within tolerance (it exits 1 otherwise), using bilevel.py."""
    proc, folder = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(folder / 'results.json') as f:
        checks = json.load(f)['checks']
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(('yes', 'NO', 'figure'))]
    assert len(checks) >= 25 and len(rows) == len(checks)
    bounds = {'within': lambda c: abs(c['measured'] - c['predicted']) <= c['tolerance'],
              'at_most': lambda c: c['measured'] <= c['predicted'], 'at_least': lambda c: c['measured'] >= c['predicted']}
    assert all(c['passed'] and bounds[c['kind']](c) for c in checks if c['kind'] != 'report')
    assert sum(c['kind'] == 'report' for c in checks) <= 7  # figures beside the checks, not in place of them


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason='matplotlib is optional: --plots needs it')
def test_plots_writes_one_picture_per_stage(quick_run):
    proc, folder = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in FIGURES:
        path = folder / 'figures' / name
        assert path.stat().st_size > 10_000, name
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', name


def error_of(*args, prelude='pass'):
    """Runs python -m theory with args (after a prelude of Python code) and returns its exit code and stderr."""
    code = f"import runpy, sys; {prelude}; sys.argv = ['theory', *{list(args)!r}]; " \
           "runpy.run_module('theory', run_name='__main__', alter_sys=True)"
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr.strip()


def test_unknown_argument_is_one_clear_error():
    code, stderr = error_of('--quick', '--plot')
    assert code != 0 and stderr.startswith('error: unknown argument(s) --plot;') and '\n' not in stderr


def test_plots_without_matplotlib_is_one_clear_error():
    """Before the checks run (timeout: they would take minutes), and without a traceback."""
    code, stderr = error_of('--plots', prelude="sys.modules['matplotlib'] = None")
    assert code != 0 and stderr.startswith('error: --plots needs matplotlib') and '\n' not in stderr
