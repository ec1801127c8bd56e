import json
import os
import re
import subprocess
import sys

import pytest

from tools import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(folder, records):
    folder.mkdir(exist_ok=True)
    with open(folder / 'log.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)


def test_writes_a_png_of_the_weights_and_the_val_loss(tmp_path):
    pytest.importorskip('matplotlib')
    write_log(tmp_path, [{'step': s, 'val_loss': 3.0 - s / 100, 'weights': {'a': 0.5 + s / 1000, 'b': 0.5 - s / 1000}}
                         for s in (100, 200, 300)])
    path = plot.plot([str(tmp_path)])
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_several_runs_side_by_side_go_to_the_file_named(tmp_path):
    pytest.importorskip('matplotlib')
    for name in ('off', 'lisa'):
        write_log(tmp_path / name, [{'step': s, 'val_loss': 3.0, 'weights': {'a': 0.5, 'b': 0.5}} for s in (1, 2)])
    runs = [str(tmp_path / 'off'), str(tmp_path / 'lisa')]
    proc = subprocess.run([sys.executable, '-m', 'tools.plot', *runs], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: several runs need --to=PATH for the picture"
    proc = subprocess.run([sys.executable, '-m', 'tools.plot', *runs, f'--to={tmp_path}/both.png'], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / 'both.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for to, written in ((tmp_path / 'pictures', tmp_path / 'pictures' / 'weights.png'),  # a folder: the file in it
                        (tmp_path / 'named', tmp_path / 'named.png')):  # no format: matplotlib's png, named as written
        (tmp_path / 'pictures').mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, '-m', 'tools.plot', *runs, f'--to={to}'], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.stdout.strip() == f"wrote {written}" and written.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    (tmp_path / 'off' / 'weights.png').mkdir()  # where the picture of one run goes: a folder, not writable as a file
    proc = subprocess.run([sys.executable, '-m', 'tools.plot', runs[0]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith('error: ') and len(proc.stderr.splitlines()) == 1
    assert 'weights.png' in proc.stderr


@pytest.mark.parametrize("records, message", [(None, "no .*log.jsonl"), ([], "is empty"),
                                             ([{'step': 20}, {'step': 30, 'val_loss': 'x', 'weights': {}}], "is empty"),
                                             ([{'step': 5, 'val_loss': 1.0, 'weights': {'a': {'z': 1}}}], "is empty"),
                                             ([{'step': '5', 'val_loss': 1.0, 'weights': {'a': 1.0}}], "is empty")])
def test_a_missing_or_empty_log_is_one_clear_error(tmp_path, records, message):
    if records is not None:
        write_log(tmp_path / 'run', records)
    proc = subprocess.run([sys.executable, '-m', 'tools.plot', str(tmp_path / 'run')], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr)


def test_without_matplotlib_it_says_what_to_install(tmp_path, monkeypatch):
    write_log(tmp_path, [{'step': 1, 'val_loss': 1.0, 'weights': {'a': 1.0}}])
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.plot([str(tmp_path)])
