import numpy as np
import pytest
import torch

from data import builtin_task, load_data
from steps import evaluation_batches, train_batch, validation_batch


def test_stratified_batch_holds_every_source_in_blocks():
    data = load_data('denoise', block_size=16, seed=0)
    x, y = train_batch(data, step=3, rows_per_source=5, block_size=16, seed=0)
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
        validation_batch(data, step, 4, 16, seed=0)
    assert torch.equal(train_batch(data, 7, 4, 16, seed=0)[0], late_first[0])
    assert not torch.equal(train_batch(data, 8, 4, 16, seed=0)[0], late_first[0])
    assert not torch.equal(train_batch(data, 7, 4, 16, seed=1)[0], late_first[0])
    assert not torch.equal(validation_batch(data, 7, 20, 16, seed=0)[0], train_batch(data, 7, 4, 16, seed=0)[0])


def test_builtin_tasks_are_deterministic_and_hold_out_val_and_test_pairs():
    a = builtin_task('denoise', seed=3)
    builtin_task.cache_clear()  # generated again, not the cached object
    b = builtin_task('denoise', seed=3)
    assert a is not b
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
    assert len(evaluation_batches(data, 'test', 3, 2, 16, seed=0)) == 3


@pytest.mark.parametrize("files, message", [
    ({'val.txt': 'x' * 40, 'test.txt': 'x' * 40}, r"has no train_<source>.txt \(or .json, .jsonl\) files"),
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


def questions_and_answers(rows):
    """Decodes rows of a convention task: (a, b, answer, answer carries a sign) per row; checks that only the
    answer and its newline carry loss."""
    decoded = []
    for x, y in rows:
        text = bytes(x[x > 0].tolist()).decode()
        prompt, answer = text.split('=')
        assert (y[:len(prompt) - 1] == -1).all() and (y >= 0).sum() == len(answer) + 1
        assert (answer[0] in '+-' and len(answer) == 2) or (answer.isdigit() and len(answer) == 1)
        a, b = prompt.split('?')
        decoded.append((int(a), int(b), int(answer), answer[0] in '+-'))
    return np.array(decoded)


@pytest.mark.parametrize('task, second, second_add_fraction', [('mixture', 'sub', 0.0), ('dilution', 'diluted', 0.25),
                                                               ('lengths', 'sub', 0.0)])
def test_convention_tasks_answer_one_question_per_row_and_val_is_70_30(task, second, second_add_fraction):
    data = builtin_task(task, seed=0)
    assert data.sources == ['add', second, 'letters']
    rows = {name: questions_and_answers(train[:2000]) for name, train in zip(data.sources[:2], data.train)}
    rows.update(val=questions_and_answers(data.val), test=questions_and_answers(data.test))
    for name, expected in (('add', 1.0), (second, second_add_fraction), ('val', 0.7), ('test', 0.7)):
        a, b, answer, signed = rows[name][rows[name][:, 1] != 0].T  # b = 0 answers both ways alike
        assert ((answer == a + b) | (answer == a - b)).all()
        assert abs((answer == a + b).mean() - expected) < 0.05, name
        # `lengths` writes sums unsigned (two tokens with the newline), differences signed (three)
        assert (signed == (answer != a + b)).all() if task == 'lengths' else signed.all()
    assert all(bytes(x[x > 0].tolist()).decode().isalpha() for x, _ in data.train[2][:500])


def test_a_cached_task_is_shared_read_only_and_each_load_gets_its_own_record():
    """builtin_task's cache hands the same arrays to every run of one process: a run that wrote into them would
    change the next run's data, so writing raises; load_data's record (files, digests) is each call's own."""
    first, second = load_data('denoise', 16, 0), load_data('denoise', 16, 0)
    assert first is not second and first.train[0] is second.train[0]
    with pytest.raises(ValueError, match='read-only'):
        first.train[0][0] = 1
    assert load_data('denoise', 16, 1).train[0] is not first.train[0]  # another seed, another task
