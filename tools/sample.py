"""
Complete prompts with a model trained by train.py (nanoGPT's sample.py): the upper model with the best
validation loss, from out_dir/best, to see what the reweighted model learned.

    python -m tools.sample --out_dir=out --prompt="12+34="             # the built-in tasks: does it add correctly?
    python -m tools.sample --out_dir=out --prompt="12+34=" --temperature=0 --num_samples=1     # greedy
"""
import os
import sys
from dataclasses import dataclass

import torch

from checkpoint import load_best_model
from config import check_device, override
from tokenizer import load_tokenizer, tokenizer_files


@dataclass
class SampleConfig:
    out_dir: str = 'out'
    prompt: str = '12+34='
    num_samples: int = 3
    max_new_tokens: int = 20
    temperature: float = 0.8     # 0: greedy
    top_k: int = 0               # 0: no top-k filtering
    seed: int = 0
    device: str = 'cpu'


def main(argv):
    cfg = override(SampleConfig(), argv)
    check_device(cfg.device)
    if cfg.device == 'auto':
        cfg.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    tiny = torch.finfo(torch.float32).eps  # below it a temperature is greedy in all but name, and overflows the logits
    if not (cfg.temperature == 0 or tiny <= cfg.temperature < float('inf')) or min(cfg.top_k, cfg.num_samples,
                                                                                 cfg.max_new_tokens) < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or at least {tiny:.2g}, --top_k, --num_samples and "
                         f"--max_new_tokens 0 or more; got {cfg.temperature}, {cfg.top_k}, {cfg.num_samples}, "
                         f"{cfg.max_new_tokens}")
    torch.manual_seed(cfg.seed)
    model, meta = load_best_model(cfg.out_dir)
    spec = meta.get('tokenizer', 'bytes')
    if spec != 'bytes' and not os.path.isdir(spec):
        raise FileNotFoundError(f"{spec}, the tokenizer folder the model was trained with (best/meta.json), is missing")
    model, tokenizer = model.to(cfg.device), load_tokenizer(spec)
    # the tokenizer's files as the model was trained with them (where best/meta.json records them): none edited,
    # added or removed since
    trained = {k.removeprefix('tokenizer/'): v for k, v in meta.get('data_files', {}).items() if k.startswith('tokenizer/')}
    now = {name: tokenizer.digests[path] for name, path in tokenizer_files(spec).items()}
    for name in sorted(trained.keys() | now.keys()) if 'data_files' in meta else []:
        if trained.get(name) != now.get(name):
            what = 'changed' if name in trained and name in now else 'appeared' if name in now else 'is missing'
            raise ValueError(f"{os.path.join(spec, name)} {what} since the model was trained with the tokenizer's "
                             f"files: its ids would decode as other text")
    print(f"upper model of step {meta['step']} (val loss {meta['val_loss']:.4f})")
    begin = [] if tokenizer.begin_of_text is None else [tokenizer.begin_of_text]  # as training saw every example
    prompt = torch.tensor(begin + tokenizer.encode(cfg.prompt).tolist(), dtype=torch.long, device=cfg.device)[None]
    if prompt.size(1) == 0:
        raise ValueError("--prompt is empty, and this tokenizer starts no example with a token of its own: give a "
                         "prompt to complete")
    completions = []
    for _ in range(cfg.num_samples):
        out = model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k)[0, prompt.size(1):]
        completions.append(tokenizer.decode(out.tolist()))
        print(f"{cfg.prompt}{completions[-1]}\n---")
    return completions


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
