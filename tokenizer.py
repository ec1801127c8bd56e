"""
Text to token ids and back: raw UTF-8 bytes by default (vocab 256, nothing to install), or a BPE from a local
folder (GPT-2's, Llama 3's, Qwen's) through the optional `tokenizers` package. Nothing is downloaded.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)  # hashed by identity: data.builtin_task's cache holds one task per tokenizer object
class Tokenizer:
    """Text to token ids and back: raw UTF-8 bytes (the default, vocab 256), or a GPT-2 BPE from a folder."""
    encode: object      # str -> 1-D numpy array of ids
    decode: object      # list of ids -> str
    vocab_size: int
    end_of_text: int = None    # ends every response: the tokenizer's end-of-sequence token (GPT-2: <|endoftext|>)
    begin_of_text: int = None  # starts every example when the tokenizer's own template adds it (Llama 3)
    digests: dict = field(default_factory=dict)  # path -> [bytes, SHA-256] of the files parsed, as they were parsed
    lost: set = field(default_factory=set)  # characters of the text encoded that do not come back from the ids


BYTES = Tokenizer(encode=lambda text: np.frombuffer(text.encode('utf-8'), dtype=np.uint8),
                  decode=lambda ids: bytes(ids).decode('utf-8', errors='replace'), vocab_size=256)


# what a tokenizer folder may hold; --export copies them beside the model
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt')


def tokenizer_files(spec):
    """{name: path} of the TOKENIZER_FILES that --tokenizer's folder holds (none for 'bytes')."""
    return {name: os.path.join(spec, name) for name in TOKENIZER_FILES
            if spec != 'bytes' and os.path.isfile(os.path.join(spec, name))}


def load_tokenizer(spec):
    """'bytes', or a local folder with tokenizer.json, or GPT-2's vocab.json + merges.txt, both read through
    the optional `tokenizers` package (nothing is downloaded)."""
    if spec == 'bytes':
        return BYTES
    files = {name: os.path.join(spec, name) for name in ('tokenizer.json', 'vocab.json', 'merges.txt')}
    if not os.path.isfile(files['tokenizer.json']) and not (os.path.isfile(files['vocab.json'])
                                                            and os.path.isfile(files['merges.txt'])):
        raise FileNotFoundError(f"--tokenizer={spec}: put tokenizer.json, or GPT-2's vocab.json and merges.txt, "
                                f"in that folder (or use --tokenizer=bytes)")
    try:
        import tokenizers
    except ImportError:
        raise ImportError("--tokenizer=<folder> needs the tokenizers package: pip install tokenizers") from None
    read = files['tokenizer.json'] if os.path.isfile(files['tokenizer.json']) else files['vocab.json'] + ' and merges.txt'
    digests = {path: file_digest(path) for path in tokenizer_files(spec).values()}
    if not os.path.isfile(files['tokenizer.json']):
        check_merges(files['vocab.json'], files['merges.txt'])
    try:  # the tokenizers package raises plain Exceptions for a file it cannot parse, or a model it cannot run
        bpe = tokenizers.Tokenizer.from_file(files['tokenizer.json']) if os.path.isfile(files['tokenizer.json']) \
            else tokenizers.ByteLevelBPETokenizer(files['vocab.json'], files['merges.txt'])
        # text is encoded without special tokens; an example gets the template's BOS once, at its start
        plain, templated = bpe.encode('a', add_special_tokens=False).ids, bpe.encode('a').ids
    except Exception as e:  # e.g. a WordLevel vocabulary without its [UNK]
        raise ValueError(f"--tokenizer={spec}: {read} cannot be read as a tokenizer ({str(e).splitlines()[0]})") \
            from None
    begin = templated[0] if len(templated) > len(plain) and templated[1:len(plain) + 1] == plain else None
    end = end_of_sequence_id(spec, bpe)
    if any(file_digest(path) != recorded for path, recorded in digests.items()):  # as the checkpoint records them
        raise ValueError(f"--tokenizer={spec}: its files changed while they were read; run again once they are whole")

    lost = set()

    def encode(text):
        try:
            ids = bpe.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel vocabulary without its [UNK] meets a word it lacks
            raise ValueError(f"--tokenizer={spec} cannot encode {text[:40]!r} ({str(e).splitlines()[0]})") from None
        # a vocabulary without bytes for every character gives [UNK] or nothing for one it lacks (GPT-2's, Llama 3's
        # and Qwen's byte-level BPEs lose none); what a lowercasing or normalizing tokenizer changes shows here too
        lost.update(set(text) - set(bpe.decode(ids)))
        return np.array(ids, dtype=np.int32)
    return Tokenizer(encode=encode, decode=lambda ids: bpe.decode(list(ids)),  # ids may leave gaps: the largest counts
                     vocab_size=max(bpe.get_vocab_size(), max(bpe.get_vocab().values(), default=-1) + 1),
                     end_of_text=end, begin_of_text=begin, digests=digests, lost=lost)


def check_merges(vocab_file, merges_file):
    """GPT-2's two files: each token of vocab.json longer than one character, but for specials in brackets
    (<|endoftext|>, <s>, [UNK]), is made by one merge of merges.txt. A merges.txt cut short (a disk that
    filled, a copy stopped) still parses, with the last merges missing: it is refused here."""
    try:
        with open(vocab_file, encoding='utf-8') as f:
            vocab = json.load(f)
        with open(merges_file, encoding='utf-8') as f:
            made = {''.join(line.split()) for line in f if not line.startswith('#version')}
    except (ValueError, OSError) as e:
        raise ValueError(f"{vocab_file} and {merges_file} cannot be read as a tokenizer ({e})") from None
    unmade = [t for t in vocab if len(t) > 1 and t not in made and t[0] + t[-1] not in ('<>', '[]')] \
        if isinstance(vocab, dict) else []
    if unmade:
        raise ValueError(f"{merges_file} makes none of {len(unmade)} tokens of {vocab_file} (as {unmade[0]!r}): it "
                         f"is cut short, or from another tokenizer; copy it again")


def digest(raw):
    """[bytes, SHA-256] of a file's contents, as a checkpoint records the files a run read (data_fingerprint)."""
    return [len(raw), hashlib.sha256(raw).hexdigest()]


def file_digest(path):
    with open(path, 'rb') as f:
        return digest(f.read())


def end_of_sequence_id(folder, bpe):
    """The eos_token of tokenizer_config.json or special_tokens_map.json (Llama 3: <|end_of_text|>, or
    <|eot_id|> for its chat models), else GPT-2's <|endoftext|>; None if the vocabulary has neither."""
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    special = json.load(f)
                except ValueError as e:
                    raise ValueError(f"{path} is not valid JSON ({e})") from None
            eos = special.get('eos_token') if isinstance(special, dict) else None
            eos = eos.get('content') if isinstance(eos, dict) else eos
            if eos is not None and not isinstance(eos, str):
                raise ValueError(f"{path}: eos_token {eos!r} is not a token (a string, or {{'content': string}})")
            if eos is not None:
                if bpe.token_to_id(eos) is None:
                    raise ValueError(f"{path}: eos_token {eos!r} is not in the tokenizer's vocabulary")
                return bpe.token_to_id(eos)
    return bpe.token_to_id('<|endoftext|>')
