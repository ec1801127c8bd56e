"""Conversation records: the authors' {"items"}, ShareGPT's {"conversations"} and chat {"messages"}, rendered with
data.TURNS; loss on assistant turns only; whole turns kept where a row allows; bad records one line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train
from data import PROMPT, TURNS, kept_table, load_data
from tokenizer import BYTES, load_tokenizer
from test_errors import fails

TURNS_OF = [('system', 'Be brief.'), ('user', 'What is 2+3?'), ('assistant', '5'),
            ('user', 'And 4+4?'), ('assistant', 'It is 8.')]
ROLES = {'items': ('from', 'value', {'system': 'system', 'user': 'human', 'assistant': 'gpt'}),
         'conversations': ('from', 'value', {'system': 'system', 'user': 'human', 'assistant': 'gpt'}),
         'messages': ('role', 'content', {'system': 'system', 'user': 'user', 'assistant': 'assistant'})}


def as_shape(shape, turns):
    role_key, text_key, names = ROLES[shape]
    return {shape: [{role_key: names[role], text_key: text} for role, text in turns]}


def write(folder, files):
    folder.mkdir(exist_ok=True)
    for name, records in files.items():
        text = '\n'.join(json.dumps(r) for r in records) if name.endswith('.jsonl') else json.dumps(records)
        (folder / name).write_text(text if not isinstance(records, str) else records)
    return str(folder)


def rows_of(tmp_path, shape, turns, block_size, tokenizer=BYTES, name='d'):
    record = as_shape(shape, turns)
    folder = write(tmp_path / name, {'train_a.json': [record], 'val.json': [record], 'test.jsonl': [record]})
    return load_data(folder, block_size=block_size, seed=0, tokenizer=tokenizer)


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
    tokenizers = pytest.importorskip('tokenizers')
    bpe = tokenizers.ByteLevelBPETokenizer()
    text = [''.join(TURNS[role][0] + text for role, text in TURNS_OF)] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=['<|endoftext|>'])
    folder = tmp_path_factory.mktemp('bpe')
    bpe.save(str(folder / 'tokenizer.json'))
    return load_tokenizer(str(folder))


@pytest.mark.parametrize('tokenizer_name', ['bytes', 'bpe'])
def test_three_shapes_give_the_same_rows_and_only_assistant_turns_are_targets(tmp_path, request, tokenizer_name):
    tokenizer = BYTES if tokenizer_name == 'bytes' else request.getfixturevalue('bpe')
    rows = [rows_of(tmp_path, shape, TURNS_OF, 128, tokenizer, shape).train[0] for shape in ROLES]
    assert all(np.array_equal(rows[0], r) for r in rows[1:])
    x, y = rows[0][0]
    end = [tokenizer.end_of_text] if tokenizer.end_of_text is not None else list(b'\n')
    # the input is the authors' rendering, turn by turn: marker and text encoded as one string, then an end of
    # text after an assistant's; the marker's tokens are those that decode to a part of it (a byte-level BPE
    # joins its trailing space to the text's first word)
    expected, targets = [], []
    for role, text in TURNS_OF:
        marker = TURNS[role][0]
        turn = tokenizer.encode(marker + text).tolist()
        n_marker = 0
        while marker.startswith(tokenizer.decode(turn[:n_marker + 1])):
            n_marker += 1
        body = turn[n_marker:] + (end if role == 'assistant' else [])
        expected += turn[:n_marker] + body
        targets += [None] * n_marker + (body if role == 'assistant' else [None] * len(body))
    assert (tokenizer_name == 'bpe') == (n_marker < len(tokenizer.encode(marker)))  # the BPE joins the space
    n = len(expected)
    assert x[:n - 1].tolist() == expected[:-1] and (x[n - 1:] == 0).all()
    # token by token: y[i] predicts expected[i + 1], a target exactly where an assistant's text or end is
    assert [t if t != -1 else None for t in y[:n - 1].tolist()] == targets[1:] and (y[n - 1:] == -1).all()
    runs = [tokenizer.decode([t for t in run if t not in end]).strip()
            for run in np.split(y, np.flatnonzero(np.diff((y != -1).astype(int))) + 1) if run[0] != -1]
    assert runs == ['5', 'It is 8.']


def test_truncation_keeps_whole_turns_and_never_a_row_without_targets(tmp_path):
    turns = TURNS_OF + [('user', 'Thanks!')]  # context after the last answer: kept only where it fits
    text = ''.join(TURNS[role][0] + t + ('\n' if role == 'assistant' else '') for role, t in turns)
    first_target = text.index('5')  # the first token a row can learn: the first assistant turn's text
    turn_ends = [text.index('5\n') + 2, text.index('8.\n') + 3]  # the assistant turns end after their newline
    for block_size in range(1, len(text) + 3):
        if block_size < first_target:
            with pytest.raises(ValueError, match=rf"every example is skipped.*--block_size={first_target} keeps half"):
                rows_of(tmp_path, 'messages', turns, block_size)
            continue
        data = rows_of(tmp_path, 'messages', turns, block_size)
        (x, y), = data.train[0]
        whole = [end for end in turn_ends if end <= block_size + 1]
        kept = len(text) if len(text) <= block_size + 1 else whole[-1] if whole else block_size + 1
        assert bytes(x[:kept - 1].tolist()).decode() == text[:kept - 1] and (x[kept - 1:] == 0).all(), block_size
        last = max([end for end in turn_ends if end <= kept], default=kept)  # the last target: an answer's end
        assert y[last - 2] != -1 and (y[last - 1:] == -1).all(), block_size
        assert data.kept['a'] == {'rows': 1, 'tokens': kept, 'target_tokens': int((y != -1).sum()),
                                  'truncated': int(len(text) > block_size + 1), 'skipped': 0}


def test_skipped_conversations_are_counted_and_reported(tmp_path, capsys):
    short = as_shape('items', [('user', 'hi'), ('assistant', 'hello')])
    long = as_shape('items', [('user', 'x' * 60), ('assistant', 'hello')])
    folder = write(tmp_path / 'd', {'train_a.json': [short, long, short], 'train_b.jsonl': [short] * 2,
                                    'val.json': [short], 'test.json': [short]})
    summary = train.main([f'--data={folder}', f'--out_dir={tmp_path}/out', '--block_size=32', '--n_layer=1',
                          '--max_steps=1', '--eval_interval=1', '--batch_per_source=2', '--val_batch=2'])
    assert summary['data_kept']['a'] == {'rows': 2, 'tokens': 2 * len('###Human: hi###Assistant: hello\n'),
                                         'target_tokens': 2 * len('hello\n'), 'truncated': 0, 'skipped': 1}
    table = capsys.readouterr().out
    assert kept_table(summary['data_kept']) in table
    assert re.search(r"\na\s+2\s+64\s+12\s+0.0%\s+33.3%\n", table)


def turn(shape, role, text):
    role_key, text_key, _ = ROLES[shape]
    return {role_key: role, text_key: text}


@pytest.mark.parametrize('record, message', [
    ({'messages': [turn('messages', 'user', 'hi'), turn('messages', 'tool', 'x')]},
     r'record 1: turn 2 has "role" "tool", not one of system, user, assistant'),
    ({'items': [turn('items', 'human', 'hi'), turn('items', 'gpt', '')]}, r'record 1: turn 2 \(gpt\) has no text'),
    ({'items': [turn('items', 'human', 'hi'), {'from': 'gpt'}]}, r'record 1: turn 2 \(gpt\) has no text'),
    ({'conversations': [turn('conversations', 'human', 'hi')]}, r'record 1 has no assistant turn \("from": "gpt"\)'),
    ({'conversations': [turn('conversations', 'human', 'hi'), turn('conversations', 'gpt', ['a'])]},
     r'record 1: turn 2: "value" must be a string, got \["a"\]'),
    ({'messages': [turn('messages', 'user', 'hi'), 'hello']}, r'record 1: turn 2 is not an object'),
    ({'messages': []}, r'record 1: "messages" must be a list of turns'),
    ({'items': [turn('items', 'human', 'hi'), turn('items', 'gpt', 'yo')], 'text': 'x'},
     r'record 1 has both "items" and "text": one shape per record'),
    ({'conversations': [turn('conversations', 'human', 'hi'), turn('conversations', 'gpt', 'yo')],
      'system': 'Answer in French.'}, r'record 1 has "system", which is not read here'),  # ShareGPT's, LLaMA-Factory's
    ({'instruction': 'hi', 'output': 'yo', 'history': [['q', 'a']]}, r'record 1 has "history", which is not read here'),
])
def test_a_bad_conversation_is_one_line_naming_the_file_and_the_record(tmp_path, capsys, record, message):
    good = as_shape('items', TURNS_OF)
    folder = write(tmp_path / 'd', {'train_a.json': [record], 'val.json': [good], 'test.json': [good]})
    assert re.search(r'train_a.json: ' + message, fails(capsys, tmp_path / 'out', f'--data={folder}'))
    assert not (tmp_path / 'out').exists()


def test_one_shape_per_file_and_shapes_may_differ_across_files(tmp_path, capsys):
    good = [as_shape(shape, TURNS_OF) for shape in ROLES]
    folder = write(tmp_path / 'd', {'train_a.jsonl': [good[0], good[2]], 'val.json': [good[1]], 'test.json': [good[2]]})
    assert re.search(r'train_a.jsonl: line 2 is a messages record, line 1 a items record: one shape per file',
                     fails(capsys, tmp_path / 'out', f'--data={folder}'))
    folder = write(tmp_path / 'e', {'train_a.jsonl': [good[0]], 'train_b.json': [{'text': 'abc'}],
                                    'val.json': [good[1]], 'test.json': [good[2]]})
    assert load_data(folder, block_size=64, seed=0).kept['a']['rows'] == 1


def test_the_conversation_folder_loads_and_never_overwrites_a_users_files(tmp_path):
    from tools import conversations
    conversations.write_folder(str(tmp_path / 'chat'), n=40)
    data = load_data(str(tmp_path / 'chat'), block_size=256, seed=0)
    assert data.sources == ['bare_sums', 'problems', 'small_talk', 'trivia', 'two_problems']
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'val.json').write_text('[{"text": "my own"}]')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for arg, code, out in [(str(tmp_path / 'mine'), 1, 'is not empty: give a new folder'), ('--help', 0, 'python -m tools.conversations data/chat')]:
        proc = subprocess.run([sys.executable, '-m', 'tools.conversations', arg], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, 'PYTHONPATH': root})
        assert proc.returncode == code and out in proc.stdout + proc.stderr, proc.stderr
    assert (tmp_path / 'mine' / 'val.json').read_text() == '[{"text": "my own"}]'
    assert not (tmp_path / '--help').exists()


def test_empty_fields_of_other_layouts_and_blank_outputs_are_no_error(tmp_path):
    """LLaMA-Factory's exports carry "system": "" and "history": []: nothing is dropped, so nothing is refused;
    a blank output has nothing to learn and is skipped and counted, as a blank text is."""
    good = {'instruction': 'What is 2+3?', 'output': '5', 'history': [], 'system': ''}
    folder = write(tmp_path / 'd', {'train_a.json': [good, {'instruction': 'hi', 'output': ' '}, good],
                                    'val.json': [good], 'test.json': [good]})
    row = PROMPT.format(instruction='What is 2+3?', input_section='') + '5\n'
    assert load_data(str(folder), block_size=64, seed=0).kept['a'] == {
        'rows': 2, 'tokens': 2 * len(row), 'target_tokens': 4, 'truncated': 0, 'skipped': 1}
