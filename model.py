"""
A GPT-2 language model, written in the style of nanoGPT's model.py
(https://github.com/karpathy/nanoGPT/blob/master/model.py), read top to bottom.

Two things differ from nanoGPT, because ScaleBiO needs them:
- forward(idx, targets) returns the mean cross-entropy of EACH row (shape (B,)), not one scalar: the
  bilevel step weights the data sources, so the caller averages rows by source itself.
- targets equal to -1 are ignored, so prompt or padding tokens can be masked out of the loss.
`model.transformer.h` is the list of transformer blocks that LISA (lisa.py) freezes and unfreezes.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024   # context length
    vocab_size: int = 50257  # the tokenizer's; the model pads its tables up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm layers, as in GPT-2
    gelu: str = 'none'       # 'tanh': GPT-2's own approximation ("gelu_new"), used for its pretrained weights


GPT2_SHAPES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
               'gpt2-xl': (48, 25, 1600)}  # n_layer, n_head, n_embd of the four GPT-2 sizes


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # flash / memory-efficient attention where the backend has it; is_causal masks future tokens
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # embedding and head rows padded to a multiple of 64 for faster matmuls (GPT-2: 50257 -> 50304);
        # the padding rows are never a target, and forward crops them from the logits
        self.padded_vocab = -(-config.vocab_size // 64) * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab, bias=False)
        # weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: residual projections are scaled by 1/sqrt(number of residual layers),
        # so the variance of the residual stream does not grow with depth (2 residual adds per block)
        for name, param in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self):
        """All parameters, the tied embedding counted once (named_parameters() yields it once)."""
        return sum(p.numel() for p in self.parameters())

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab) and, given targets, the mean
        cross-entropy of each row over its targets that are not -1, shape (B,)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"a batch of {T} tokens per row is longer than the model's context "
                             f"(block_size={self.config.block_size})")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))[..., :self.config.vocab_size]
        if targets is None:
            return logits, None
        # cross-entropy in float32 even under bf16 autocast: the per-source means are compared across
        # two models, so their rounding error must stay well below the differences being measured
        logits_fp = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_loss = F.cross_entropy(logits_fp.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=-1, reduction='none').view(B, T)
        n_targets = (targets != -1).sum(dim=1).clamp(min=1)
        return logits, token_loss.sum(dim=1) / n_targets

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0):
        """Appends max_new_tokens sampled tokens to idx (B, T), as nanoGPT's generate; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float('inf'))
                next_token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, path):
        """A GPT-2 from a local Hugging Face folder (config.json + model.safetensors or pytorch_model.bin).
        Nothing is downloaded. HF's Conv1D layers store their weights transposed; the vocabulary is padded."""
        config_path = os.path.join(path, 'config.json')
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} is missing: a Hugging Face GPT-2 folder holds config.json and "
                                    f"model.safetensors or pytorch_model.bin")
        with open(config_path) as f:
            hf = json.load(f)
        missing = [k for k in ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if k not in hf]
        activation = hf.get('activation_function', 'gelu_new')
        if missing or activation not in ('gelu_new', 'gelu_pytorch_tanh', 'gelu'):
            raise ValueError(f"{config_path} is not a GPT-2 config (missing {missing}, activation {activation})")
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True,
                           gelu='none' if activation == 'gelu' else 'tanh')
        model = cls(config)
        ours = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}  # padding rows stay 0
        loaded = {'lm_head.weight'}
        for name, tensor in read_weights(path).items():
            name = 'transformer.' + name.removeprefix('transformer.')  # GPT2LMHeadModel or GPT2Model keys
            if name.endswith(('.attn.bias', '.attn.masked_bias', 'lm_head.weight')):
                continue  # old causal-mask buffers; the head is tied to wte
            if name not in ours:
                raise ValueError(f"{path}: weight {name} has no place in a GPT-2")
            if name.endswith(HF_TRANSPOSED):
                tensor = tensor.t()
            expected = (config.vocab_size, *ours[name].shape[1:]) if name == 'transformer.wte.weight' \
                else ours[name].shape
            if tensor.shape != expected:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected)}")
            ours[name][:tensor.size(0)] = tensor
            loaded.add(name)
        if set(ours) - loaded:
            raise ValueError(f"{path}: weights missing for {sorted(set(ours) - loaded)}")
        ours['lm_head.weight'] = ours['transformer.wte.weight']
        model.load_state_dict(ours)
        return model


# HF's GPT-2 uses Conv1D layers, whose weights are stored as (in, out): the transpose of nn.Linear's
HF_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def target_counts(targets, dtype):
    """Targets per row that count (not -1), so that row means can be turned back into token sums."""
    return (targets != -1).sum(dim=1).clamp(min=1).to(dtype)


def make_optimizer(model, lr, weight_decay):
    """AdamW over ALL parameters (LISA freezes some; AdamW skips those whose grad is None). As in nanoGPT,
    matrices decay and biases / LayerNorm gains do not."""
    params = list(model.parameters())
    return torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}], lr=lr)


def read_weights(path):
    if os.path.isfile(os.path.join(path, 'model.safetensors')):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}/model.safetensors needs the safetensors package: pip install safetensors") from None
        return load_file(os.path.join(path, 'model.safetensors'))
    if os.path.isfile(os.path.join(path, 'pytorch_model.bin')):
        return torch.load(os.path.join(path, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def export_pretrained(state_dict, config, folder):
    """Writes a full state dict of our GPT as a Hugging Face GPT-2 folder that transformers loads:
    config.json and model.safetensors (pytorch_model.bin without safetensors); the vocabulary cropped."""
    if not config.bias:
        raise ValueError("a Hugging Face GPT-2 has biases: export needs a model trained with bias=True")
    weights = {}
    for name, tensor in state_dict.items():
        if name == 'lm_head.weight':
            continue  # tied to wte
        tensor = tensor.detach().cpu().float()  # float32, whatever the training dtype
        if name == 'transformer.wte.weight':
            tensor = tensor[:config.vocab_size]
        weights[name] = (tensor.t() if name.endswith(HF_TRANSPOSED) else tensor).contiguous()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': config.vocab_size,
                   'n_positions': config.block_size, 'n_ctx': config.block_size, 'n_embd': config.n_embd,
                   'n_layer': config.n_layer, 'n_head': config.n_head, 'layer_norm_epsilon': 1e-5,
                   'activation_function': 'gelu_new' if config.gelu == 'tanh' else 'gelu',
                   'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout,
                   'tie_word_embeddings': True, 'torch_dtype': 'float32'}, f, indent=2)
    try:
        from safetensors.torch import save_file
        save_file(weights, os.path.join(folder, 'model.safetensors'))
    except ImportError:
        torch.save(weights, os.path.join(folder, 'pytorch_model.bin'))
