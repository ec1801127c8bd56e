import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_theory_checks_pass_through_the_training_step():
    """`python -m theory --quick`: every check within tolerance (it exits 1 otherwise), using bilevel.py."""
    proc = subprocess.run([sys.executable, '-m', 'theory', '--quick'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(ROOT, 'theory', 'results.json')) as f:
        checks = json.load(f)['checks']
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(('yes', 'NO', 'figure'))]
    assert len(checks) >= 25 and len(rows) == len(checks)
    bounds = {'within': lambda c: abs(c['measured'] - c['predicted']) <= c['tolerance'],
              'at_most': lambda c: c['measured'] <= c['predicted'], 'at_least': lambda c: c['measured'] >= c['predicted']}
    assert all(c['passed'] and bounds[c['kind']](c) for c in checks if c['kind'] != 'report')
    assert sum(c['kind'] == 'report' for c in checks) <= 7  # figures beside the checks, not in place of them
