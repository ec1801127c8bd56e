import numpy as np
import pytest
import torch

from data import builtin_task, eval_batches, load_data, train_batch, val_batch


def test_stratified_batch_holds_every_source_in_blocks():
    data = load_data('denoise', block_size=16, seed=0)
    x, y = train_batch(data, step=3, batch_per_source=5, block_size=16, seed=0)
    assert data.sources == ['clean', 'noisy', 'irrelevant']
    assert x.shape == y.shape == (15, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # rows [5i, 5i+5) come from source i: letters only in 'irrelevant', digits only in the additions
    text = [bytes(row.tolist()).decode() for row in x]
    assert all(any(c.isdigit() for c in t) for t in text[:10])
    assert all(not any(c.isdigit() for c in t) for t in text[10:])


def test_batch_is_a_pure_function_of_seed_split_and_step():
    data = load_data('noise_ladder', block_size=16, seed=0)
    late_first = train_batch(data, 7, 4, 16, seed=0)
    for step in range(7):  # drawing other steps first changes nothing
        train_batch(data, step, 4, 16, seed=0)
        val_batch(data, step, 4, 16, seed=0)
    assert torch.equal(train_batch(data, 7, 4, 16, seed=0)[0], late_first[0])
    assert not torch.equal(train_batch(data, 8, 4, 16, seed=0)[0], late_first[0])
    assert not torch.equal(train_batch(data, 7, 4, 16, seed=1)[0], late_first[0])
    assert not torch.equal(val_batch(data, 7, 20, 16, seed=0)[0], train_batch(data, 7, 4, 16, seed=0)[0])


def test_builtin_tasks_are_deterministic_and_hold_out_val_and_test_pairs():
    a, b = builtin_task('denoise', seed=3), builtin_task('denoise', seed=3)
    assert all(np.array_equal(s, t) for s, t in zip(a.train + [a.val, a.test], b.train + [b.val, b.test]))
    lines = {k: set(bytes(v).decode().split()) for k, v in
             [('clean', a.train[0]), ('noisy', a.train[1]), ('val', a.val), ('test', a.test)]}
    pairs = {k: {line.split('=')[0] for line in v} for k, v in lines.items()}
    assert not pairs['val'] & pairs['clean'] and not pairs['test'] & pairs['clean']
    assert not pairs['val'] & pairs['test']
    assert all(eval(l.split('=')[0]) == int(l.split('=')[1]) for l in lines['clean'] | lines['val'])
    assert all(eval(l.split('=')[0]) != int(l.split('=')[1]) for l in lines['noisy'])


def test_noise_ladder_rates():
    data = builtin_task('noise_ladder', seed=0)
    assert data.sources == ['noise_0', 'noise_25', 'noise_50', 'noise_75', 'noise_100']
    for name, tokens in zip(data.sources, data.train):
        lines = bytes(tokens).decode().split()
        wrong = np.mean([eval(l.split('=')[0]) != int(l.split('=')[1]) for l in lines])
        assert abs(wrong - int(name.split('_')[1]) / 100) < 0.02


def write_folder(folder, files):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder)


def test_text_folder_sources_are_named_by_file(tmp_path):
    long = 'hello world, ' * 10
    folder = write_folder(tmp_path / 'd', {'train_web.txt': long, 'train_books.txt': 'é' * 40,
                                           'val.txt': long, 'test.txt': long, 'notes.md': 'ignored'})
    data = load_data(folder, block_size=16, seed=0)
    assert data.sources == ['books', 'web']
    x, _ = train_batch(data, 0, 2, 16, seed=0)
    assert x.shape == (4, 16)
    assert len(eval_batches(data, 'test', 3, 2, 16, seed=0)) == 3


@pytest.mark.parametrize("files, message", [
    ({'val.txt': 'x' * 40, 'test.txt': 'x' * 40}, "has no train_<source>.txt files"),
    ({'train_a.txt': 'x' * 40, 'test.txt': 'x' * 40}, "missing file .*val.txt"),
    ({'train_a.txt': '', 'val.txt': 'x' * 40, 'test.txt': 'x' * 40}, "train_a.txt is empty"),
    ({'train_a.txt': 'x' * 40, 'val.txt': 'x' * 5, 'test.txt': 'x' * 40}, "val.txt has only 5 tokens.*17"),
    ({'train_a.txt': b'\xff\xfe' * 40, 'val.txt': 'x' * 40, 'test.txt': 'x' * 40}, "train_a.txt is not UTF-8"),
])
def test_bad_folders_give_one_clear_error_naming_the_file(tmp_path, files, message):
    folder = write_folder(tmp_path / 'd', files)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_data(folder, block_size=16, seed=0)


def test_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        load_data(str(tmp_path / 'nope'), block_size=16, seed=0)


def lines(tokens):
    return bytes(tokens.tolist()).decode().splitlines()


def test_mixture_needs_both_arithmetic_sources_and_val_is_70_30_in_blocks():
    data = builtin_task('mixture', seed=0)
    assert data.sources == ['add', 'sub', 'letters']
    add, sub, letters = (lines(t) for t in data.train)
    assert all('+' in l and eval(l.replace('=', '==')) for l in add[:500])
    assert all('-' in l.split('=')[0][1:] and eval(l.replace('=', '==')) for l in sub[:500])
    assert all(l.isalpha() for l in letters[:500])
    for split in (data.val, data.test):
        held_out = lines(split)
        is_add = np.array(['+' in l for l in held_out])
        assert abs(is_add.mean() - 0.7) < 0.05
        assert (np.diff(is_add.astype(int)) != 0).sum() < len(held_out) / 10  # blocks, not line by line


def test_coverage_splits_one_skill_by_the_first_operand():
    data = builtin_task('coverage', seed=0)
    low, high, _ = (lines(t) for t in data.train)
    assert all(int(l.split('+')[0]) < 30 for l in low[:500]) and all(int(l.split('+')[0]) >= 30 for l in high[:500])
    firsts = [int(l.split('+')[0]) for l in lines(data.val)]
    assert 0.2 < np.mean(np.array(firsts) < 30) < 0.4  # val covers every first operand
