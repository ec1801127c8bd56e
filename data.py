"""
Multi-source data for bilevel reweighting.

A data set is a list of named training sources (the things ScaleBiO weighs), a validation split (the
upper-level objective L_val) and a test split (only ever evaluated, never trained on or used to learn
weights). Tokens are raw bytes unless --tokenizer names a BPE (tokenizer.py).

Where the sources come from (`--data=...` in train.py):
- `denoise` (default): `clean` ("a+b=c" lines, correct sums), `noisy` (same format, wrong sums),
  `irrelevant` (random lowercase letters). Val and test: clean lines on (a, b) pairs never trained on.
- `noise_ladder`: `noise_0`, `noise_25`, ..., `noise_100`: additions with that percentage of wrong sums.
- `mixture`: `add` (questions "a?b=" on digits 0-4, answered a+b), `sub` (the same questions, answered a-b)
  and `letters` (random letters); val and test answer 70% of the questions a+b and 30% a-b, chosen row by row,
  so the best weights are inside the simplex and known: add 0.7, sub 0.3, letters 0 (cross-entropy is lowest
  where the model's odds match val's). One question per row, loss on the answer only.
- `dilution`: `add` and `diluted` (each question answered a+b with odds 1/4, else a-b) and `letters`, val and
  test as in `mixture`: the best weights are add 0.6, diluted 0.4, letters 0 (0.6 + 0.4/4 = 0.7).
- `lengths`: `mixture` with the sums unsigned, so an `add` answer has two tokens with its newline and a `sub`
  answer three. Weighing every token alike (--source_loss=token) the best weights stay add 0.7, sub 0.3; weighing
  every row alike (example) they are 14/23 ≈ 0.609 and 9/23 ≈ 0.391: the model's odds of add are then
  (λ_add/2) / (λ_add/2 + λ_sub/3), and val asks for 0.7.
- a folder holding `train_<source>.txt` (one file per source), `val.txt` and `test.txt`;
- or, in the ScaleBiO authors' layout, `train_<source>.json` (or .jsonl), `val.json`, `test.json`: lists of
  {"text": ...} or Alpaca-style {"instruction", "input" (optional), "output"} records, or conversations in
  one of three shapes (CONVERSATIONS below: the authors' {"items"}, ShareGPT's {"conversations"}, chat
  {"messages"}). One example per row, padded to block_size, rendered as TURNS below says: only response and
  assistant tokens carry loss (targets -1 elsewhere), like the authors' --response_loss_only.

The batches drawn from them, step by step, are steps.py's.
"""
import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from tokenizer import BYTES, digest

BUILTIN_TASKS = ('denoise', 'noise_ladder', 'mixture', 'dilution', 'lengths')


@dataclass
class SourceData:
    sources: list        # source names, in the order of the weights
    train: list          # per source: a 1-D token stream, or examples as an (n, 2, block_size) array of (x, y)
    val: np.ndarray
    test: np.ndarray
    vocab_size: int = 256
    kept: dict = None    # split -> what loading kept of examples: rows, tokens, target tokens, truncated, skipped
    files: dict = None   # the files it was read from, by name (their checksums go into every checkpoint)
    digests: dict = None  # path -> [bytes, SHA-256] of what was parsed, taken as it was read (read_bytes)
    lost: list = None     # characters of the data that its tokenizer does not give back from the ids


# ----------------------------------------------------------------------------------------------
# built-in synthetic tasks

def _addition_lines(pairs, wrong_fraction, rng):
    """'a+b=c' lines for the given (a, b) pairs; a `wrong_fraction` of them get a wrong sum."""
    lines = []
    for a, b in pairs:
        c = a + b
        if rng.random() < wrong_fraction:
            c = (c + rng.integers(1, 199)) % 199  # any value in 0..198 except the true sum
        lines.append(f"{a}+{b}={c}\n")
    return ''.join(lines)


def _convention_examples(pairs, add_fraction, rng, signed_sums=True):
    """One question "a?b=" per row, answered a+b on a random add_fraction of the rows (exactly) and a-b on the
    rest. Nothing in a question tells which convention answers it, so a model can only learn the odds: the
    val loss of its answers is lowest where those odds match val's. One row per question, and the loss on the
    answer only: with several lines to a row, a model reads the convention of the lines before as a cue.
    Every answer is signed ("+7", "-3"), so all have three tokens with the newline: with --source_loss=example
    a source's loss is a mean over rows of each row's token mean while L_val is a token mean, and with answers of
    unequal lengths the two weigh a question differently. signed_sums=False writes sums unsigned ("7": two
    tokens), for the task that shows it (`lengths`)."""
    is_add = rng.permutation(len(pairs)) < round(add_fraction * len(pairs))
    return [(f"{a}?{b}=", f"{a + b}" if add and not signed_sums else f"{a + b if add else a - b:+d}")
            for (a, b), add in zip(pairs, is_add)]


def _letter_lines(n_lines, rng):
    letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
    return ''.join(''.join(rng.choice(letters, rng.integers(3, 9))) + '\n' for _ in range(n_lines))


@functools.lru_cache(maxsize=4)  # tools/compare (and the tests) train many runs on one task in one process
def builtin_task(name, seed, tokenizer=BYTES, block_size=32, lines_per_source=20_000, held_out_pairs=1_000):
    """Generates a built-in task deterministically from `seed`: no files needed. Every later call with the same
    arguments shares the result (load_data makes its arrays read-only)."""
    rng = np.random.default_rng([seed, 12345])
    pairs = [(a, b) for a in range(100) for b in range(100)]
    order = rng.permutation(len(pairs))
    val_pairs = [pairs[i] for i in order[:held_out_pairs]]
    test_pairs = [pairs[i] for i in order[held_out_pairs:2 * held_out_pairs]]
    train_pairs = [pairs[i] for i in order[2 * held_out_pairs:]]

    def train_pairs_sample():
        return [train_pairs[i] for i in rng.integers(0, len(train_pairs), lines_per_source)]

    if name == 'denoise':
        texts = {'clean': _addition_lines(train_pairs_sample(), 0.0, rng),
                 'noisy': _addition_lines(train_pairs_sample(), 1.0, rng),
                 'irrelevant': _letter_lines(lines_per_source, rng)}
    elif name == 'noise_ladder':
        texts = {f'noise_{pct}': _addition_lines(train_pairs_sample(), pct / 100, rng)
                 for pct in (0, 25, 50, 75, 100)}
    elif name in ('mixture', 'dilution', 'lengths'):
        # digits 0-4, and val and test ask the questions training asks: what generalises to unseen pairs
        # varies from seed to seed more than the weights matter, and here only the weights should
        digit_pairs = [(a, b) for a in range(5) for b in range(5)]

        def questions(n):
            return [digit_pairs[i] for i in rng.integers(0, len(digit_pairs), n)]
        second, second_add_fraction = ('diluted', 0.25) if name == 'dilution' else ('sub', 0.0)
        signed = name != 'lengths'
        examples = {'add': _convention_examples(questions(lines_per_source), 1.0, rng, signed),
                    second: _convention_examples(questions(lines_per_source), second_add_fraction, rng, signed),
                    'letters': [('', word) for word in _letter_lines(lines_per_source, rng).split()]}
        held_out = [_convention_examples(questions(held_out_pairs), 0.7, rng, signed) for _ in ('val', 'test')]
        loaded = {split: _example_rows([[('prompt', q), ('response', a)] if q else [('text', a)] for q, a in e],
                                       block_size, tokenizer, f"built-in task {name}: {split}")
                  for split, e in zip(list(examples) + ['val', 'test'], list(examples.values()) + held_out)}
        return SourceData(sources=list(examples), train=[loaded[s][0] for s in examples], val=loaded['val'][0],
                          test=loaded['test'][0], vocab_size=tokenizer.vocab_size,
                          kept={split: stats for split, (_, stats) in loaded.items()})
    else:
        raise ValueError(f"unknown built-in task '{name}' (choose from {', '.join(BUILTIN_TASKS)})")
    held_out = [_addition_lines(pairs, 0.0, rng) for pairs in (val_pairs, test_pairs)]
    encode = tokenizer.encode
    return SourceData(sources=list(texts), train=[encode(t) for t in texts.values()],
                      val=encode(held_out[0]), test=encode(held_out[1]), vocab_size=tokenizer.vocab_size)


# ----------------------------------------------------------------------------------------------
# a folder of text files

def read_bytes(path, digests):
    """A file's bytes, with their size and SHA-256 put in digests[path]: the fingerprint of the bytes parsed, not of
    the file as it is when the checkpoint is written (it may change while other files load)."""
    with open(path, 'rb') as f:
        raw = f.read()
    digests[path] = digest(raw)
    return raw


def _read_text(path, block_size, tokenizer, digests):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file" if os.path.lexists(path) else f"missing file {path}")
    raw = read_bytes(path, digests)
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if raw and not text.strip():
        raise ValueError(f"{path} holds only whitespace")
    tokens = tokenizer.encode(text)
    if len(tokens) < block_size + 1:
        what = "is empty" if len(tokens) == 0 else f"has only {len(tokens)} tokens"
        raise ValueError(f"{path} {what}; a split needs at least block_size+1 = {block_size + 1} tokens")
    return tokens


def text_folder(folder, names, block_size, tokenizer):
    """train_<source>.txt files (the source is named by what follows 'train_'), val.txt and test.txt."""
    paths, digests = {name: os.path.join(folder, name) for name in names + ['val.txt', 'test.txt']}, {}
    return SourceData(sources=[n[len('train_'):-len('.txt')] for n in names],
                      train=[_read_text(paths[n], block_size, tokenizer, digests) for n in names],
                      val=_read_text(paths['val.txt'], block_size, tokenizer, digests),
                      test=_read_text(paths['test.txt'], block_size, tokenizer, digests),
                      vocab_size=tokenizer.vocab_size, files=paths, digests=digests)


# ----------------------------------------------------------------------------------------------
# a folder of JSON examples (the authors' layout)

# How each kind of turn renders: the marker before its text, whether its text carries loss, whether the
# tokenizer's end of text (a newline with bytes) follows it. A conversation's markers are the ScaleBiO authors'
# (research4pan/scalebio, math/dev_scalebio/python/data.py, tokenize_conversion: each turn's marker and text
# encoded as one string, turns joined with nothing between them, an end of text after each assistant turn, loss
# on assistant turns only). Their code also puts loss on the "###Assistant: " marker and a BOS before it;
# here the marker is context and the BOS, where the tokenizer's template has one, starts the row once. An
# instruction record is a prompt (Alpaca's template, PROMPT) and a response; a {"text"} record is all loss.
TURNS = {'system': ('###System: ', False, False), 'user': ('###Human: ', False, False),
         'assistant': ('###Assistant: ', True, True),
         'prompt': ('', False, False), 'response': ('', True, True), 'text': ('', True, False)}
PROMPT = "### Instruction:\n{instruction}\n\n{input_section}### Response:\n"  # Alpaca's, plainly
INPUT_SECTION = "### Input:\n{input}\n\n"
LONE_SURROGATE = re.compile('[\ud800-\udfff]')  # what json reads "\\ud800" as: no UTF-8 holds it
# the three conversation shapes: the record's key -> the keys of a turn's role and text, and its role names
FROM_ROLES = {'system': 'system', 'human': 'user', 'gpt': 'assistant'}
UNREAD = ('system', 'history', 'tools')  # other layouts' fields (LLaMA-Factory's) that hold text: refused, not dropped
CONVERSATIONS = {'items': ('from', 'value', FROM_ROLES),  # the authors'
                 'conversations': ('from', 'value', FROM_ROLES),  # ShareGPT's
                 'messages': ('role', 'content', {'system': 'system', 'user': 'user', 'assistant': 'assistant'})}


def _read_records(path, digests):
    try:
        text = read_bytes(path, digests).decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    whole = not path.endswith('.jsonl')  # JSON Lines split at '\n' only: a JSON string may hold U+2028
    records = []
    for number, line in [(1, text)] if whole else enumerate(text.split('\n'), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except (ValueError, RecursionError) as e:  # also: an integer of 4300+ digits, nesting past the recursion limit
            at = number + getattr(e, 'lineno', 1) - 1
            raise ValueError(f"{path}: line {at}: malformed JSON ({getattr(e, 'msg', e)})") from None
    if whole:
        records = [(f"record {n}", r) for n, r in enumerate(records[0][1], 1)] \
            if records and isinstance(records[0][1], list) else None
    else:
        records = [(f"line {n}", r) for n, r in records]
    if not records:
        raise ValueError(f"{path} holds no examples (expected a JSON list of records, or JSON Lines)")
    return records


def _conversation(turns, key, where):
    """A conversation's turns as [(kind, text)]; every turn has a known role and text, one is the assistant's."""
    role_key, text_key, roles = CONVERSATIONS[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f'{where}: "{key}" must be a list of turns, got {json.dumps(turns)[:60]}')
    kinds = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f'{where}: turn {number} is not an object with "{role_key}" and "{text_key}"')
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str) or role not in roles:
            raise ValueError(f'{where}: turn {number} has "{role_key}" {json.dumps(role)[:60]}, '
                             f'not one of {", ".join(roles)}')
        if text is not None and not isinstance(text, str):
            raise ValueError(f'{where}: turn {number}: "{text_key}" must be a string, got {json.dumps(text)[:60]}')
        if not (text or '').strip():
            raise ValueError(f'{where}: turn {number} ({role}) has no text')
        kinds.append((roles[role], text))
    if not any(kind == 'assistant' for kind, _ in kinds):
        assistant = next(name for name, kind in roles.items() if kind == 'assistant')
        raise ValueError(f'{where} has no assistant turn ("{role_key}": "{assistant}"): nothing to learn from it')
    return kinds


def _record_turns(record, path, where):
    """A record's shape and its turns: {"text"}, {"instruction", "input" (optional), "output"} or a conversation.
    Every field is a string (a null or a list would otherwise train as the text 'None' or "['a', 'b']")."""
    fields = set(record) if isinstance(record, dict) else set()
    keys = [k for k in CONVERSATIONS if k in fields] + ['text'] * ('text' in fields) + \
        [k for k in ('instruction', 'output') if k in fields][:1]  # one key per shape the record has
    if not keys:
        raise ValueError(f'{path}: {where} has none of "text", "output", ' + ', '.join(f'"{k}"' for k in CONVERSATIONS))
    if len(keys) > 1:  # a "text" beside an instruction would otherwise train alone, the instruction dropped
        raise ValueError(f'{path}: {where} has both "{keys[0]}" and "{keys[1]}": one shape per record')
    unread = sorted(k for k in UNREAD if record.get(k) not in (None, '', [], {}))
    if unread:
        raise ValueError(f'{path}: {where} has "{unread[0]}", which is not read here: write a system prompt and '
                         f'earlier turns as turns of a conversation ("conversations" or "messages")')
    if keys[0] in CONVERSATIONS:
        return keys[0], _conversation(record[keys[0]], keys[0], f"{path}: {where}")
    required = ('text',) if keys[0] == 'text' else ('instruction', 'output')
    for field in dict.fromkeys(required + tuple(k for k in ('text', 'instruction', 'input', 'output') if k in record)):
        if not isinstance(record.get(field), str):
            raise ValueError(f'{path}: {where}: "{field}" must be a string, got '
                             f'{json.dumps(record.get(field)) if field in record else "nothing"}')
        if LONE_SURROGATE.search(record[field]):
            raise ValueError(f'{path}: {where}: "{field}" holds a lone surrogate (a "\\ud800" escape), not text')
    if keys[0] == 'text':
        return 'text', [('text', record['text'])]
    section = INPUT_SECTION.format(input=record['input']) if record.get('input') else ''
    return 'instruction', [('prompt', PROMPT.format(instruction=record['instruction'], input_section=section))] + \
        [('response', record['output'])] * bool(record['output'].strip())  # blank: nothing to learn, skipped


def _turn_tokens(marker, text, tokenizer):
    """A turn's tokens, marker and text encoded as one string as the authors do, and how many are the marker's.
    A byte-level BPE joins the marker's trailing space to the first word ('ĠWhat'): that token is the text's."""
    ids = tokenizer.encode(marker + text).tolist()
    for head in (tokenizer.encode(marker).tolist(), tokenizer.encode(marker.rstrip()).tolist()):
        if ids[:len(head)] == head:
            return ids, len(head)
    head = tokenizer.encode(marker).tolist()  # a tokenizer that merges across the marker's end: encoded apart
    return head + tokenizer.encode(text).tolist(), len(head)


def _render(turns, tokenizer):
    """[(kind, text)] as token ids, whether each token carries loss, and where each turn with loss ends. Turns
    are encoded apart, so no BPE merge crosses from a prompt into a response."""
    end = [tokenizer.end_of_text] if tokenizer.end_of_text is not None else tokenizer.encode('\n').tolist()
    ids = [] if tokenizer.begin_of_text is None else [tokenizer.begin_of_text]
    loss, ends = [False] * len(ids), []
    for kind, text in turns:
        marker, carries_loss, then_end = TURNS[kind]
        turn, n_marker = _turn_tokens(marker, text, tokenizer)
        ids += turn + (end if then_end else [])
        loss += [False] * n_marker + [carries_loss] * (len(ids) - len(loss) - n_marker)
        ends += [len(ids)] if carries_loss else []
    return np.array(ids, dtype=np.int64), np.array(loss), ends


def _example_rows(examples, block_size, tokenizer, where):
    """Examples (each a list of turns) as rows (x, y) of block_size tokens, y being x shifted by one and -1 where
    a token carries no loss (context, padding); and what was kept: rows, tokens, target tokens, how many examples
    were truncated and skipped. A longer example keeps its whole turns up to the last turn with loss that fits,
    else as many tokens as fit; one whose first target lies past block_size has nothing to learn: skipped."""
    rows, needed, tokens, truncated = [], [], 0, 0
    for turns in examples:
        ids, loss, ends = _render(turns, tokenizer)
        first = next((i for i in range(1, len(ids)) if loss[i]), None)  # the first token a row can learn
        needed += [first] if first is not None else []  # the shortest block_size that gives it a target
        if first is None or first > block_size:
            continue
        keep = len(ids)
        if keep > block_size + 1:
            truncated += 1
            keep = max((e for e in ends if first < e <= block_size + 1), default=block_size + 1)
        row = np.zeros((2, block_size), dtype=np.int64)
        row[1] = -1
        row[0, :keep - 1] = ids[:keep - 1]
        row[1, :keep - 1] = np.where(loss[1:keep], ids[1:keep], -1)
        rows.append(row)
        tokens += keep
    if not rows:
        half = f"; --block_size={int(np.sort(needed)[(len(needed) - 1) // 2])} keeps half of them" if needed else ''
        raise ValueError(f"{where}: every example is skipped: none has a response token within "
                         f"block_size={block_size}{half}")
    rows = np.stack(rows)
    return rows, {'rows': len(rows), 'tokens': tokens, 'target_tokens': int((rows[:, 1] >= 0).sum()),
                  'truncated': truncated, 'skipped': len(examples) - len(rows)}


def _examples(path, block_size, tokenizer, digests):
    """Each record of a JSON file as one row. A file holds conversations of one shape, or records ({"text"} and
    instruction records may mix)."""
    examples, blank = [], True
    for where, record in _read_records(path, digests):
        shape, turns = _record_turns(record, path, where)
        kind = shape if shape in CONVERSATIONS else 'text or instruction'
        if not examples:
            first_where, file_kind = where, kind
        elif kind != file_kind:
            raise ValueError(f"{path}: {where} is a {kind} record, {first_where} a {file_kind} record: "
                             f"one shape per file")
        blank = blank and kind == 'text or instruction' and \
            not ''.join(record.get(k, '') for k in ('text', 'instruction', 'input', 'output')).strip()
        examples.append(turns)
    if blank:
        raise ValueError(f"{path}: every record is blank")
    return _example_rows(examples, block_size, tokenizer, path)


def json_folder(folder, names, block_size, tokenizer):
    split_names = [s + ext for s in ('val', 'test') for ext in ('.json', '.jsonl')
                   if os.path.isfile(os.path.join(folder, s + ext))]
    for split in ('val', 'test'):
        if not any(name.startswith(split + '.') for name in split_names):
            odd = [p for p in (os.path.join(folder, split + ext) for ext in ('.json', '.jsonl')) if os.path.lexists(p)]
            raise FileNotFoundError(f"{odd[0]} is not a file" if odd else f"missing file {folder}/{split}.json (or .jsonl)")
    paths, digests = {name: os.path.join(folder, name) for name in names + split_names}, {}
    sources = [n[len('train_'):n.rindex('.')] for n in names]
    loaded = {split: _examples(paths[name], block_size, tokenizer, digests)
              for split, name in zip(sources + ['val', 'test'], names + split_names)}
    return SourceData(sources=sources, train=[loaded[s][0] for s in sources], val=loaded['val'][0],
                      test=loaded['test'][0], vocab_size=tokenizer.vocab_size,
                      kept={split: stats for split, (_, stats) in loaded.items()}, files=paths, digests=digests)


def data_files(folder):
    """The training files of a data folder and their format, 'text' or 'json': one format per folder, one file
    per source and split."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data={folder} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
                                f"nor a folder")
    listing = sorted(os.listdir(folder))
    names = [n for n in listing if n.startswith('train_') and n.endswith(('.txt', '.json', '.jsonl'))]
    odd = [n for n in listing if n.startswith('train_') and n not in names]  # train_c.TXT: a source not to skip silently
    if odd:
        raise ValueError(f"{os.path.join(folder, odd[0])}: a source's file is train_<source>.txt, .json or .jsonl; "
                         f"rename it, or move it out of the folder")
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{os.path.join(folder, name)} is not a file; each source is one file")
    for stem in sorted({n[:n.rindex('.')] for n in listing if n.endswith(('.txt', '.json', '.jsonl'))}):
        same = [n for n in listing if n[:n.rfind('.')] == stem and n.endswith(('.txt', '.json', '.jsonl'))]
        if len(same) > 1:
            raise ValueError(f"data folder {folder} holds {' and '.join(same)}: one file per source and split")
    text = [n for n in names if n.endswith('.txt')]
    if text and len(text) < len(names):
        raise ValueError(f"data folder {folder} mixes text and JSON sources ({text[0]} and "
                         f"{next(n for n in names if not n.endswith('.txt'))}): use one format")
    if not names:
        raise FileNotFoundError(f"data folder {folder} has no train_<source>.txt (or .json, .jsonl) files")
    stems = {n: n[len('train_'):n.rindex('.')] for n in names}
    clash = [n for n, stem in stems.items() if stem in ('val', 'test') or not stem.strip() or not stem.isprintable()]
    if clash:  # a source's name is also how the run names its splits (evaluation, log.jsonl) and its table columns
        raise ValueError(f"{os.path.join(folder, clash[0])!r}: a source needs a printable name, and not 'val' or "
                         f"'test', the names of the held-out splits; rename the file")
    return names, 'text' if text else 'json'


def load_data(data, block_size, seed, tokenizer=BYTES):
    if data in BUILTIN_TASKS:
        source_data = dataclasses.replace(builtin_task(data, seed, tokenizer, block_size))
        for name, tokens in zip(['val', 'test'] + source_data.sources,
                                [source_data.val, source_data.test] + source_data.train):
            tokens.flags.writeable = False  # shared by every later run of this task in this process
            if len(tokens) < block_size + 1:
                raise ValueError(f"built-in split '{name}' has {len(tokens)} tokens; block_size={block_size} "
                                 f"is too long for it")
        source_data.files = {}
    else:
        names, kind = data_files(data)
        source_data = (text_folder if kind == 'text' else json_folder)(data, names, block_size, tokenizer)
    source_data.digests = {**(source_data.digests or {}), **tokenizer.digests}  # every file parsed, as parsed
    source_data.lost = sorted(tokenizer.lost)
    return source_data


def kept_table(kept):
    """What loading kept of each split's examples, one line per split (in loading_report)."""
    lines = [f"{'split':<20}{'rows':>8}{'tokens':>10}{'targets':>10}{'truncated':>11}{'skipped':>9}"]
    for split, k in kept.items():
        examples = k['rows'] + k['skipped']
        lines.append(f"{split:<20}{k['rows']:>8}{k['tokens']:>10}{k['target_tokens']:>10}"
                     f"{k['truncated'] / examples:>11.1%}{k['skipped'] / examples:>9.1%}")
    return '\n'.join(lines)


def loading_report(data, tokenizer):
    """What train.py prints once the data is loaded: what each split of examples kept (kept_table), and a warning
    naming the characters of the data that the tokenizer does not give back ('' when there is nothing to say)."""
    lines = [kept_table(data.kept)] if data.kept else []
    if data.lost:
        lines.append(f"warning: --tokenizer={tokenizer} does not give back {len(data.lost)} character(s) of the "
                     f"data ({', '.join(map(repr, data.lost[:10]))}{', ...' if len(data.lost) > 10 else ''}): the "
                     f"model sees its unknown token, or nothing, in their place")
    return ''.join(line + '\n' for line in lines)
