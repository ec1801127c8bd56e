"""
A folder of conversation sources to try ScaleBiO on chat data (docs/data.md): three that answer arithmetic
word problems correctly and two of generic chat, each source in one of the three shapes data.py reads, with
word problems as validation and test.

    python -m tools.conversations data/chat          # writes train_<source>.json(l), val.json, test.json
    python train.py --data=data/chat --block_size=128 --out_dir=out-chat

- `problems` (the authors' {"items"}): one word problem, answered with the number;
- `two_problems` (ShareGPT's {"conversations"}): two problems in one conversation, each answered;
- `bare_sums` (chat {"messages"}): "What is 12 + 7?", answered with the number, no story;
- `small_talk` ({"messages"}, some with a long system prompt) and `trivia` ({"conversations"}): chat.
"""
import json
import os
import sys

import numpy as np

from outdir import write_whole

NAMES = ['Ann', 'Ben', 'Cai', 'Dee', 'Eli', 'Fay']
THINGS = ['apples', 'marbles', 'stamps', 'shells', 'coins']
SMALL_TALK = [('Hello!', 'Hi there, how can I help?'), ('How are you today?', 'I am well, thank you for asking.'),
              ('Thanks for your help.', 'You are welcome.'), ('Good night!', 'Good night, sleep well.'),
              ('Can you tell me a joke?', 'Why did the cat sit on the mat? It was warm.')]
TRIVIA = [('What colour is the sky on a clear day?', 'Blue.'), ('How many legs does a spider have?', 'Eight.'),
          ('What is the capital of France?', 'Paris.'), ('Which planet is called the red planet?', 'Mars.'),
          ('What do bees make?', 'Honey.')]


def word_problem(rng):
    """A story about adding or taking away, and its answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = int(rng.integers(5, 30)), int(rng.integers(1, 5))
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", str(a + b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have now?", str(a - b)


def shaped(shape, turns):
    """[(role, text)] as a record of one of data.CONVERSATIONS' shapes."""
    if shape == 'messages':
        return {'messages': [{'role': role, 'content': text} for role, text in turns]}
    names = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}
    return {shape: [{'from': names[role], 'value': text} for role, text in turns]}


def sources(rng, n):
    def problems():
        return [shaped('items', [('user', q), ('assistant', a)]) for q, a in (word_problem(rng) for _ in range(n))]

    def two_problems():
        return [shaped('conversations', [('user', q1), ('assistant', a1), ('user', q2), ('assistant', a2)])
                for (q1, a1), (q2, a2) in ((word_problem(rng), word_problem(rng)) for _ in range(n))]

    def bare_sums():
        pairs = rng.integers(5, 30, (n, 2))
        return [shaped('messages', [('user', f"What is {a} + {b}?"), ('assistant', str(a + b))]) for a, b in pairs]

    def chat(shape, pairs, system=None):
        return [shaped(shape, ([('system', system)] if system and rng.random() < 0.2 else [])
                       + [('user', pairs[i][0]), ('assistant', pairs[i][1])])
                for i in rng.integers(0, len(pairs), n)]
    long_system = 'You are a friendly assistant who answers politely and briefly. ' * 3
    return {'train_problems.json': problems(), 'train_two_problems.json': two_problems(),
            'train_bare_sums.jsonl': bare_sums(), 'train_small_talk.jsonl': chat('messages', SMALL_TALK, long_system),
            'train_trivia.json': chat('conversations', TRIVIA), 'val.json': problems()[:400],
            'test.json': problems()[:400]}


def write_folder(folder, seed=0, n=2000):
    """A new folder (one that exists must be empty: nothing in it is overwritten), each file written whole."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"{folder} {'is not empty' if os.path.isdir(folder) else 'is a file'}: give a new folder")
    os.makedirs(folder, exist_ok=True)
    for name, records in sources(np.random.default_rng(seed), n).items():
        text = '\n'.join(json.dumps(r) for r in records) if name.endswith('.jsonl') else json.dumps(records)
        write_whole(os.path.join(folder, name), lambda f, text=text: f.write(text))


if __name__ == '__main__':
    if len(sys.argv) != 2 or sys.argv[1].startswith('-'):  # -h, --help: the usage above
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:] in (['-h'], ['--help']) else 1)
    try:
        write_folder(sys.argv[1])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {sys.argv[1]}")
