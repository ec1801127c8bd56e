"""
The two model families, written in the style of nanoGPT's model.py
(https://github.com/karpathy/nanoGPT/blob/master/model.py), read top to bottom: GPT-2 (LayerNorm, learned
positions, GELU, multi-head attention, tied head; GPT-NeoX is the same block with rotary positions, attention
and MLP side by side and an untied head), then the Llama family (RMSNorm, rotary positions, SwiGLU,
grouped-query attention; Qwen2's q/k/v biases and Mistral's config read the same way). One GPTConfig says which.

Two things differ from nanoGPT, because ScaleBiO needs them:
- forward(idx, targets) returns the mean cross-entropy of EACH row (shape (B,)), not one scalar: the
  bilevel step weights the data sources, so the caller averages rows by source itself.
- targets equal to -1 are ignored, so prompt or padding tokens can be masked out of the loss.
`model.blocks` is the list of transformer blocks that LISA (lisa.py) freezes and FSDP (fsdp.py) shards.
Hugging Face folders in and out: hf.py.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    family: str = 'gpt2'     # 'gpt2', 'gpt_neox', or the Llama family: 'llama', 'qwen2', 'mistral' (HF's model_type)
    block_size: int = 1024   # context length
    vocab_size: int = 50257  # at least the tokenizer's; GPT-2 pads its tables up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # GPT-2: biases in Linear and LayerNorm layers
    gelu: str = 'none'       # GPT-2: 'tanh' is its own approximation ("gelu_new"), used for its pretrained weights
    # GPT-NeoX (Black et al. 2022, arXiv 2204.06745; Pythia): GPT-2's block with rotary positions on a share of each
    # head's dimensions instead of learned ones, attention and MLP side by side, an untied head
    rotary_pct: float = 0.0  # 0: GPT-2's learned positions
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), one residual for both
    # the Llama family
    n_kv_head: int = 0       # grouped-query attention: key/value heads, each shared by n_head / n_kv_head queries
    head_dim: int = 0        # 0: n_embd // n_head
    mlp_hidden: int = 0      # SwiGLU's inner width (intermediate_size)
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    qkv_bias: bool = False   # Qwen2: biases on q, k and v
    attention_bias: bool = False  # Llama's attention_bias: biases on q, k, v and o
    mlp_bias: bool = False
    tie_embeddings: bool = True  # the head is the embedding matrix (GPT-2; Llama 3.2 1B/3B, Qwen2 0.5B; not GPT-NeoX)
    sliding_window: int = 0  # Mistral's attention window (0: none); train.py refuses one shorter than block_size


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.per_head_qkv = config.family == 'gpt_neox'

    def forward(self, x, cos=None, sin=None):
        B, T, C = x.size()
        qkv = self.c_attn(x)
        if self.per_head_qkv:  # GPT-NeoX's rows, as its checkpoints hold them: head by head, [q, k, v] within each
            q, k, v = qkv.view(B, T, self.n_head, 3 * C // self.n_head).chunk(3, dim=3)
        else:  # GPT-2's: [all q, all k, all v]
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in qkv.split(C, dim=2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cos is not None:  # GPT-NeoX: the first cos.size(-1) dimensions of each head rotate, the rest pass
            r = cos.size(-1)
            q, k = (torch.cat((t[..., :r] * cos + rotate_half(t[..., :r]) * sin, t[..., r:]), dim=-1) for t in (q, k))
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
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); or both at once (GPT-NeoX)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cos=None, sin=None):
        if self.parallel_residual:
            return x + self.attn(self.ln_1(x), cos, sin) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class LanguageModel(nn.Module):
    """What both families share: the initialisation, the per-row loss, sampling, the parameter count. A family
    defines `blocks`, `tie_weights()`, `_init_weights(module)`, `hidden(idx)` (the final normalised states) and
    `head(hidden)` (the logits)."""

    def init_weights(self):
        """The random initialisation, in place: _init_weights on every module, then the parameters that
        _residual_std names drawn again with their own std. initial_weights (below) replays exactly these
        draws for a model built on the meta device."""
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if self._residual_std(name):
                torch.nn.init.normal_(param, mean=0.0, std=self._residual_std(name))

    def _residual_std(self, name):
        return None

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty, keeping a tied head tied (it gives each module a tensor of its own)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    checkpoint_blocks = False  # train.py's --checkpoint_blocks
    logits_at_targets = True   # train.py's --logits_at_targets

    def run_block(self, block, *inputs):
        """One transformer block. With activation checkpointing (Chen et al. 2016, arXiv 1604.06174) the backward
        keeps only each block's input and recomputes the block's activations when it needs them: activation
        memory falls from every block's intermediates to one block's, for one more forward per step."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def num_params(self):
        """All parameters, a tied embedding counted once (named_parameters() yields it once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Without targets: the logits (B, T, vocab), None. With targets: None and
        the mean cross-entropy of each row over its targets that are not -1, shape (B,)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"a batch of {T} tokens per row is longer than the model's context "
                             f"(block_size={self.config.block_size})")
        if 0 < self.config.sliding_window < T:
            raise ValueError(f"{T} tokens per row exceed the model's attention window ({self.config.sliding_window}): "
                             f"sliding-window attention is not implemented")
        hidden = self.hidden(idx)
        if targets is None:
            return self.head(hidden), None
        # the head and the cross-entropy only where there is a target: a prompt's and padding's positions cost
        # nothing (at a 128k vocabulary the logits are about 1 MB per token); every position with --logits_at_targets=False
        keep = targets != -1 if self.logits_at_targets else torch.ones_like(targets, dtype=torch.bool)
        logits = self.head(hidden[keep])
        # cross-entropy in float32 even under bf16 autocast: the per-source means are compared across
        # two models, so their rounding error must stay well below the differences being measured
        logits_fp = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_loss = logits_fp.new_zeros(B, T)
        token_loss[keep] = F.cross_entropy(logits_fp, targets[keep], ignore_index=-1, reduction='none')
        n_targets = (targets != -1).sum(dim=1).clamp(min=1)
        return None, token_loss.sum(dim=1) / n_targets

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


class GPT(LanguageModel):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # embedding and head rows padded to a multiple of 64 for faster matmuls (GPT-2: 50257 -> 50304);
        # the padding rows are never a target, and forward crops them from the logits
        self.padded_vocab = -(-config.vocab_size // 64) * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, config.n_embd),
            **({} if config.rotary_pct else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab, bias=False)
        self.tie_weights()
        self.init_weights()

    @property
    def blocks(self):
        return self.transformer.h

    def tie_weights(self):
        # weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds
        if self.config.tie_embeddings:  # GPT-2 always; GPT-NeoX never
            self.transformer.wte.weight = self.lm_head.weight

    def _residual_std(self, name):
        # GPT-2 paper, section 2.3: residual projections are scaled by 1/sqrt(number of residual layers),
        # so the variance of the residual stream does not grow with depth (2 residual adds per block)
        return 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith('c_proj.weight') else None

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx):
        pos, x = torch.arange(idx.size(1), dtype=torch.long, device=idx.device), self.transformer.wte(idx)
        rotary = rotations(self.config, pos, x.dtype) if self.config.rotary_pct else ()
        x = self.transformer.drop(x if self.config.rotary_pct else x + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = self.run_block(block, x, *rotary)
        return self.transformer.ln_f(x)

    def head(self, hidden):
        return self.lm_head(hidden)[..., :self.config.vocab_size]


# ----------------------------------------------------------------------------------------------
# the Llama family, in Hugging Face's layout (module names as in its checkpoints, rotate-half rotary
# positions), so that a checkpoint's tensors load by name: modeling_llama.py in transformers

class RMSNorm(nn.Module):
    """x / rms(x) · g (Zhang & Sennrich 2019), computed in float32 at least, as Llama's reference does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        x_fp = x.to(torch.promote_types(x.dtype, torch.float32))
        x_fp = x_fp * torch.rsqrt(x_fp.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp.to(x.dtype)


def rope_frequencies(config, device=None):
    """The rotation frequency of each pair of a head's dimensions: θ^(-2i/d) (Su et al. 2021, RoFormer), with
    Llama 3.1's rescaling of the long wavelengths when config.rope_scaling asks for it. Computed at every
    forward (a few dozen numbers), never stored: a model built on the meta device then has no buffer to fill."""
    dim = config.head_dim or config.n_embd // config.n_head
    dim = int(dim * config.rotary_pct) if config.rotary_pct else dim  # GPT-NeoX rotates a share of each head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if not config.rope_scaling:
        return inv_freq
    r = config.rope_scaling  # wavelengths beyond the original context are stretched by `factor`, short ones kept
    low_wavelen = r['original_max_position_embeddings'] / r['low_freq_factor']
    high_wavelen = r['original_max_position_embeddings'] / r['high_freq_factor']
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r['factor'], inv_freq)
    smooth = (r['original_max_position_embeddings'] / wavelen - r['low_freq_factor']) \
        / (r['high_freq_factor'] - r['low_freq_factor'])
    smoothed = (1 - smooth) * scaled / r['factor'] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotations(config, positions, dtype):
    """cos and sin of the rotation of position t by angle t·θ_i, for both halves of the rotated dimensions
    (rotate_half's pairs)."""
    angles = torch.outer(positions.float(), rope_frequencies(config, positions.device))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    """Hugging Face's layout: the two halves of a head's dimensions form the rotated pairs (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        qkv_bias = config.qkv_bias or config.attention_bias
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.attention_bias)

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # grouped-query attention: each key/value head serves n_head / n_kv_head query heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) · up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @property
    def blocks(self):
        return self.model.layers

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):  # Hugging Face's initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def hidden(self, idx):
        x = self.model.embed_tokens(idx)
        cos, sin = rotations(self.config, torch.arange(idx.size(1), device=idx.device), x.dtype)
        for block in self.model.layers:
            x = self.run_block(block, x, cos, sin)
        return self.model.norm(x)

    def head(self, hidden):
        return self.lm_head(hidden)


def make_model(config):
    """A GPT-2 or a Llama-family model, as config.family says. Under `with torch.device('meta')` it allocates
    nothing and draws no random numbers: train.py builds both copies so, shards them, then fills them."""
    if config.family in ('gpt2', 'gpt_neox'):
        return GPT(config)
    if config.family in ('llama', 'qwen2', 'mistral'):
        return Llama(config)
    raise ValueError(f"unknown model family '{config.family}' (gpt2, gpt_neox, llama, qwen2, mistral)")


def empty_model(config, device='cpu'):
    """make_model(config) allocated on `device` without initialisation, for weights that are then read in."""
    with torch.device('meta'):
        model = make_model(config)
    return model.to_empty(device=device)


def initial_weights(config):
    """(name, tensor) pairs: make_model(config)'s random initial weights, one layer's full tensors at a time on the
    CPU, drawn from torch's global generator in the order a construction on the CPU draws them. Filling a model
    built on the meta device with them in order (a name may come again: the later value wins, as in
    init_weights) gives make_model(config) built on the CPU, bit for bit, without ever holding the whole model.

    The order: each layer's own constructor draws first (nn.Linear's Kaiming-uniform, nn.Embedding's normal),
    then init_weights redraws, layer by layer, then the residual projections once more."""
    with torch.device('meta'):
        model = make_model(config)
    layers = [(prefix, module) for prefix, module in model.named_modules() if list(module.parameters(recurse=False))]
    for _, module in layers:  # the constructors' draws, discarded as init_weights discards them
        if hasattr(module, 'reset_parameters'):
            copy.deepcopy(module).to_empty(device='cpu').reset_parameters()
    for prefix, module in layers:
        layer = copy.deepcopy(module).to_empty(device='cpu')
        if hasattr(layer, 'reset_parameters'):
            with torch.random.fork_rng(devices=[]):  # what init_weights leaves alone (norm gains) keeps the
                layer.reset_parameters()              # constructor's value, without drawing a second time
        model._init_weights(layer)
        for name, param in layer.named_parameters(prefix=prefix):
            yield name, param.detach()
    for name, param in model.named_parameters():
        if model._residual_std(name):
            yield name, torch.empty(param.shape).normal_(mean=0.0, std=model._residual_std(name))


def target_counts(targets, dtype):
    """Targets per row that count (not -1), so that row means can be turned back into token sums."""
    return (targets != -1).sum(dim=1).clamp(min=1).to(dtype)


def make_optimizer(model, lr, weight_decay):
    """AdamW over ALL parameters (LISA freezes some; AdamW skips those whose grad is None). As in nanoGPT,
    matrices decay and biases / LayerNorm gains do not."""
    params = list(model.parameters())
    return torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}], lr=lr)
