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
  {"text": ...} or Alpaca-style {"instruction", "input" (optional), "output"} records. One example per row,
  padded to block_size; an instruction record is rendered with PROMPT below and only its response tokens
  carry loss (targets -1 elsewhere), like the authors' --response_loss_only.

The batches drawn from them, step by step, are steps.py's.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from tokenizer import BYTES

BUILTIN_TASKS = ('denoise', 'noise_ladder', 'mixture', 'dilution', 'lengths')


@dataclass
class SourceData:
    sources: list        # source names, in the order of the weights
    train: list          # per source: a 1-D token stream, or examples as an (n, 2, block_size) array of (x, y)
    val: np.ndarray
    test: np.ndarray
    vocab_size: int = 256
    notes: list = None   # what loading dropped or truncated, for train.py to print once
    files: dict = None   # the files it was read from, by name (their checksums go into every checkpoint)
    digests: dict = None  # path -> [bytes, SHA-256] of what was parsed, taken as it was read (read_bytes)


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


def builtin_task(name, seed, tokenizer=BYTES, block_size=32, lines_per_source=20_000, held_out_pairs=1_000):
    """Generates a built-in task deterministically from `seed`: no files needed."""
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
        notes = []
        rows = [_example_rows(e, block_size, tokenizer, notes, f"built-in task {name}")
                for e in list(examples.values()) + held_out]
        return SourceData(sources=list(examples), train=rows[:3], val=rows[3], test=rows[4],
                          vocab_size=tokenizer.vocab_size, notes=notes)
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
    digests[path] = [len(raw), hashlib.sha256(raw).hexdigest()]
    return raw


def _read_text(path, block_size, tokenizer, digests):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}")
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

PROMPT = "### Instruction:\n{instruction}\n\n{input_section}### Response:\n"  # Alpaca's, plainly
INPUT_SECTION = "### Input:\n{input}\n\n"


def _read_records(path, digests):
    try:
        text = read_bytes(path, digests).decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    try:
        if path.endswith('.jsonl'):
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append((f"line {number}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {number}: malformed JSON ({e.msg})") from None
        else:
            records = json.loads(text)
            records = [(f"record {number}", r) for number, r in enumerate(records, 1)] if isinstance(records, list) \
                else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
    if not records:
        raise ValueError(f"{path} holds no examples (expected a JSON list of records, or JSON Lines)")
    return records


def _example_rows(examples, block_size, tokenizer, notes, where):
    """(prompt, response) pairs as rows (x, y) of block_size tokens: y is x shifted by one, -1 where there is
    no loss (the prompt and the padding)."""
    rows, truncated, dropped = [], 0, 0
    for prompt, response in examples:
        # prompt and response are encoded apart (a BPE merge never crosses into the response); the example starts
        # with the tokenizer's BOS where its template adds one, and the response ends with its end-of-sequence
        # token, or a newline for bytes, so the model learns to stop
        end = [tokenizer.end_of_text] if tokenizer.end_of_text is not None else tokenizer.encode('\n')
        begin = [] if tokenizer.begin_of_text is None else [tokenizer.begin_of_text]
        prompt_ids = np.concatenate([np.asarray(begin, dtype=np.int64), tokenizer.encode(prompt)])
        prompt_tokens = len(prompt_ids)
        tokens = np.concatenate([prompt_ids, tokenizer.encode(response), np.asarray(end if prompt else [], dtype=np.int64)])
        if prompt_tokens > block_size or len(tokens) <= max(prompt_tokens, 1):  # no response token to learn
            dropped += 1
            continue
        truncated += len(tokens) > block_size + 1
        tokens = tokens[:block_size + 1].astype(np.int64)
        row = np.zeros((2, block_size), dtype=np.int64)
        row[1] = -1
        row[0, :len(tokens) - 1] = tokens[:-1]
        row[1, max(prompt_tokens - 1, 0):len(tokens) - 1] = tokens[max(prompt_tokens, 1):]
        rows.append(row)
    if truncated or dropped:
        notes.append(f"{where}: {truncated} examples truncated to block_size={block_size}, {dropped} dropped "
                     f"(no response token within it)")
    if not rows:
        raise ValueError(f"{where}: no example fits block_size={block_size} (its prompts are longer): "
                         f"raise --block_size")
    return np.stack(rows)


def _examples(path, block_size, notes, tokenizer, digests):
    """Each record of a JSON file as one row: {"text"}, or {"instruction", "input" (optional), "output"}, all
    strings (a null or a list would otherwise train as the text 'None' or "['a', 'b']")."""
    examples, blank = [], True
    for where, record in _read_records(path, digests):
        if not isinstance(record, dict) or not any(k in record for k in ('text', 'output')):
            raise ValueError(f'{path}: {where} has neither "text" nor "output"')
        required = ('text',) if 'text' in record else ('instruction', 'output')
        for key in dict.fromkeys(required + tuple(k for k in ('text', 'instruction', 'input', 'output') if k in record)):
            if not isinstance(record.get(key), str):
                raise ValueError(f'{path}: {where}: "{key}" must be a string, got '
                                 f'{json.dumps(record.get(key)) if key in record else "nothing"}')
        blank = blank and not ''.join(record[k] for k in required + ('input',) if k in record).strip()
        if 'text' in record:
            examples.append(('', record['text']))
        else:
            section = INPUT_SECTION.format(input=record['input']) if record.get('input') else ''
            examples.append((PROMPT.format(instruction=record['instruction'], input_section=section), record['output']))
    if blank:
        raise ValueError(f"{path}: every record is blank")
    return _example_rows(examples, block_size, tokenizer, notes, path)


def json_folder(folder, names, block_size, tokenizer):
    notes = []
    split_names = [s + ext for s in ('val', 'test') for ext in ('.json', '.jsonl')
                   if os.path.isfile(os.path.join(folder, s + ext))]
    for split in ('val', 'test'):
        if not any(name.startswith(split + '.') for name in split_names):
            raise FileNotFoundError(f"missing file {os.path.join(folder, split)}.json (or .jsonl)")
    paths, digests = {name: os.path.join(folder, name) for name in names + split_names}, {}
    train, (val, test) = ([_examples(paths[n], block_size, notes, tokenizer, digests) for n in group]
                          for group in (names, split_names))
    return SourceData(sources=[n[len('train_'):n.rindex('.')] for n in names], train=train, val=val, test=test,
                      vocab_size=tokenizer.vocab_size, notes=notes, files=paths, digests=digests)


def data_files(folder):
    """The training files of a data folder and their format, 'text' or 'json': one format per folder, one file
    per source and split."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data '{folder}' is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
                                f"nor a folder")
    listing = sorted(os.listdir(folder))
    names = [n for n in listing if n.startswith('train_') and n.endswith(('.txt', '.json', '.jsonl'))]
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
    return names, 'text' if text else 'json'


def load_data(data, block_size, seed, tokenizer=BYTES):
    if data in BUILTIN_TASKS:
        source_data = builtin_task(data, seed, tokenizer, block_size)
        for name, tokens in zip(['val', 'test'] + source_data.sources,
                                [source_data.val, source_data.test] + source_data.train):
            if len(tokens) < block_size + 1:
                raise ValueError(f"built-in split '{name}' has {len(tokens)} tokens; block_size={block_size} "
                                 f"is too long for it")
        source_data.files = {}
        return source_data
    names, kind = data_files(data)
    return (text_folder if kind == 'text' else json_folder)(data, names, block_size, tokenizer)


def fixed_weights(spec, sources):
    """Source weights for --method=fixed: 'uniform', or the weights a scalebio run wrote to its summary.json."""
    if spec == 'uniform':
        return torch.full((len(sources),), 1.0 / len(sources), dtype=torch.float64)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--weights: no file {spec} (give 'uniform' or a summary.json)")
    try:
        with open(spec) as f:
            summary = json.load(f)
    except ValueError:  # not JSON, or not UTF-8
        summary = None
    if not isinstance(summary, dict) or 'weights' not in summary:
        raise ValueError(f"--weights={spec} is not a summary.json (give 'uniform' or a scalebio run's summary.json)")
    if summary.get('sources') != sources:
        raise ValueError(f"--weights: {spec} has sources {summary.get('sources')}, the data has {sources}")
    weights = summary['weights']
    if not (isinstance(weights, list) and len(weights) == len(sources)
            and all(isinstance(w, (int, float)) and 0 <= w < math.inf for w in weights)
            and abs(sum(weights) - 1) < 1e-3):
        raise ValueError(f"--weights: {spec} has weights {weights}: one per source, each 0 or more, summing to 1")
    return torch.tensor(weights, dtype=torch.float64) / sum(weights)  # exactly 1, as λ on the simplex
