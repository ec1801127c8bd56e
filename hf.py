"""
Hugging Face model folders in and out, offline: config.json and the weights, as model.safetensors, as shards
(model-00001-of-0000N.safetensors with model.safetensors.index.json, what every 7B+ model ships) or as
pytorch_model.bin, read and written one tensor at a time. GPT-2, GPT-NeoX (Pythia) and the Llama family
(model_type llama, qwen2, mistral). Nothing is downloaded.

    python train.py --init_from=path/to/folder ...     # both copies start from its weights, its config.json
    python train.py ... --export=True                  # out_dir/hf: the trained upper model, the same family
"""
import contextlib
import json
import math
import os
import pickle

import torch

from fsdp import fill, full, is_main_process, rank0_decides
from model import GPTConfig, empty_model, make_model

# HF's GPT-2 uses Conv1D layers, whose weights are stored as (in, out): the transpose of nn.Linear's
GPT2_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
LLAMA_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'mistral': 'MistralForCausalLM'}
# GPT-NeoX's names in its checkpoints and ours (model.GPT with rotary positions); transformers 5 names the head lm_head
NEOX_NAMES = (('gpt_neox.embed_in.', 'transformer.wte.'), ('gpt_neox.final_layer_norm.', 'transformer.ln_f.'),
              ('gpt_neox.layers.', 'transformer.h.'), ('embed_out.', 'lm_head.'), ('.input_layernorm.', '.ln_1.'),
              ('.post_attention_layernorm.', '.ln_2.'), ('.attention.query_key_value.', '.attn.c_attn.'),
              ('.attention.dense.', '.attn.c_proj.'), ('.mlp.dense_h_to_4h.', '.mlp.c_fc.'),
              ('.mlp.dense_4h_to_h.', '.mlp.c_proj.'))
VOCAB_TABLES = ('transformer.wte.weight', 'lm_head.weight')  # their rows beyond vocab_size are GPT's padding
HEAD, EMBEDDINGS = 'lm_head.weight', ('transformer.wte.weight', 'model.embed_tokens.weight')  # ours, by family


def read_config(path):
    """Our GPTConfig from a folder's config.json."""
    config_path = os.path.join(path, 'config.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: a Hugging Face model folder holds config.json and "
                                f"model.safetensors (or shards with model.safetensors.index.json, or pytorch_model.bin)")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path} is not a model config (a JSON object)")
    model_type = hf.get('model_type', 'gpt2')
    readers = {'gpt2': gpt2_config, 'gpt_neox': neox_config, **{name: llama_config for name in LLAMA_ARCHITECTURES}}
    if not isinstance(model_type, str) or model_type not in readers:
        raise ValueError(f"{config_path}: model_type {json.dumps(model_type)} is neither GPT-2, GPT-NeoX nor of the "
                         f"Llama family ({', '.join(LLAMA_ARCHITECTURES)})")
    try:
        return readers[model_type](hf, config_path)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field of the wrong kind, deep in the config
        if str(e).startswith(config_path):
            raise
        raise ValueError(f"{config_path}: a field is missing or of the wrong kind ({type(e).__name__}: {e})") from None


# config.json's fields read besides the sizes: each a positive number, or true / false
NUMBERS = ('layer_norm_epsilon', 'layer_norm_eps', 'rms_norm_eps', 'rope_theta', 'rotary_emb_base')
FLAGS = ('tie_word_embeddings', 'use_parallel_residual', 'attention_bias', 'mlp_bias', 'use_sliding_window')


def check_kinds(hf, sizes, where):
    """The sizes a config.json gives, each a positive integer or null (at most 2**24: no model has a larger one,
    and a position table that long would not fit in memory), its NUMBERS positive and finite, its FLAGS booleans."""
    rope = hf['rope_parameters'] if isinstance(hf.get('rope_parameters'), dict) else {}
    wrong = [f'{k}={hf[k]!r}' for k in sizes
             if hf.get(k) is not None and (type(hf[k]) is not int or not 0 < hf[k] <= 2**24)]
    wrong += [f'{k}={v!r}' for k, v in [*hf.items(), *rope.items()]
              if k in NUMBERS and (type(v) not in (int, float) or not 0 < v < math.inf)]
    wrong += [f'{k}={hf[k]!r}' for k in FLAGS if hf.get(k) is not None and type(hf[k]) is not bool]
    if wrong:
        raise ValueError(f"{where}: {', '.join(wrong)}: sizes must be positive integers up to 2**24, "
                         f"{', '.join(NUMBERS)} positive numbers, {', '.join(FLAGS)} true or false")


def gpt2_config(hf, where):
    check_kinds(hf, ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd'), where)
    missing = [k for k in ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if hf.get(k) is None]
    activation = hf.get('activation_function', 'gelu_new')
    scaling = {k: hf[k] for k, usual in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False))
               if hf.get(k, usual) != usual}  # attention scaled other than by 1/sqrt(head size)
    if missing or activation not in ('gelu_new', 'gelu_pytorch_tanh', 'gelu') or hf.get('tie_word_embeddings') is False \
            or scaling:
        raise ValueError(f"{where} is not a GPT-2 config read here (missing {missing}, activation {activation}, "
                         f"tie_word_embeddings {hf.get('tie_word_embeddings', True)}: its head is its embedding"
                         + ''.join(f", {k} {json.dumps(v)}" for k, v in scaling.items()) + ")")
    if hf['n_embd'] % hf['n_head']:
        raise ValueError(f"{where}: n_embd={hf['n_embd']} is not a multiple of n_head={hf['n_head']}")
    return GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                     n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True, gelu='none' if activation == 'gelu' else 'tanh',
                     norm_eps=hf.get('layer_norm_epsilon', 1e-5))


def neox_config(hf, where):
    sizes = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'vocab_size',
             'max_position_embeddings')
    check_kinds(hf, sizes, where)
    missing = [k for k in sizes if hf.get(k) is None]
    activation = hf.get('hidden_act', 'gelu')
    rope = dict(hf.get('rope_parameters') or {})  # transformers 5; older configs: rotary_pct, rotary_emb_base
    share = rope.get('partial_rotary_factor', hf.get('rotary_pct', 0.25))  # transformers' default, Pythia's value
    tanh = ('gelu_new', 'gelu_fast', 'gelu_pytorch_tanh')  # GPT-NeoX-20B's gelu_fast: the tanh approximation
    if missing or activation not in ('gelu', *tanh) or hf.get('attention_bias', True) is not True \
            or hf.get('rope_scaling') or rope.get('rope_type', 'default') != 'default':
        raise ValueError(f"{where} is not a GPT-NeoX config read here (missing {missing}, hidden_act {activation}, "
                         f"attention_bias {hf.get('attention_bias', True)}, rope {hf.get('rope_scaling') or rope})")
    head_dim = hf['hidden_size'] // hf['num_attention_heads']
    if hf['hidden_size'] % hf['num_attention_heads'] or hf['intermediate_size'] != 4 * hf['hidden_size'] \
            or not (isinstance(share, (int, float)) and 2 <= int(head_dim * share) <= head_dim):
        raise ValueError(f"{where}: hidden_size {hf['hidden_size']} must be a multiple of num_attention_heads and a "
                         f"quarter of intermediate_size {hf['intermediate_size']}, and rotary_pct {share!r} must "
                         f"rotate 2 to {head_dim} dimensions of a head")
    return GPTConfig(family='gpt_neox', block_size=hf['max_position_embeddings'], vocab_size=hf['vocab_size'],
                     n_layer=hf['num_hidden_layers'], n_head=hf['num_attention_heads'], n_embd=hf['hidden_size'],
                     gelu='none' if activation == 'gelu' else 'tanh', rotary_pct=float(share),
                     rope_theta=float(rope.get('rope_theta', hf.get('rotary_emb_base', 10000.0))),
                     parallel_residual=bool(hf.get('use_parallel_residual', True)),
                     norm_eps=hf.get('layer_norm_eps', 1e-5), tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


def padded_rows(rows, n_padded):
    """Rows of a vocabulary table padded to n_padded rows (GPT-2's and GPT-NeoX's tables): the padding is zeros."""
    n = rows.shape[0]

    def read(start, stop):
        real = rows.read(min(start, n), min(stop, n))
        return torch.cat([real, real.new_zeros(max(0, stop - max(start, n)), *real.shape[1:])])
    return Rows((n_padded, *rows.shape[1:]), read, rows.where)


def llama_config(hf, where):
    check_kinds(hf, ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'vocab_size',
                     'max_position_embeddings', 'num_key_value_heads', 'head_dim', 'sliding_window'), where)
    missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                           'vocab_size', 'max_position_embeddings') if hf.get(k) is None]
    if missing or hf.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"{where} is not a Llama-family config (missing {missing}, hidden_act {hf.get('hidden_act')})")
    # rotary settings: rope_theta + rope_scaling, or the newer rope_parameters holding both
    rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    theta = float(rope.pop('rope_theta', hf.get('rope_theta', 10000.0)))
    rope_type = rope.pop('rope_type', rope.pop('type', 'default'))
    if rope_type not in ('default', 'llama3') or rope.get('partial_rotary_factor', 1.0) != 1.0:
        raise ValueError(f"{where}: rope type '{rope_type}' (partial_rotary_factor {rope.get('partial_rotary_factor', 1.0)})"
                         f" is not implemented: default or llama3, on whole heads")
    scaling = None
    if rope_type == 'llama3':
        rope.setdefault('original_max_position_embeddings', hf['max_position_embeddings'])  # as transformers does
        scaling = {k: rope.get(k) for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                                            'original_max_position_embeddings')}
        if not all(type(v) in (int, float) and v > 0 for v in scaling.values()) \
                or scaling['high_freq_factor'] <= scaling['low_freq_factor']:
            raise ValueError(f"{where}: llama3 rope scaling {scaling} needs every value a positive number and "
                             f"high_freq_factor above low_freq_factor")
    model_type = hf['model_type']
    window = hf.get('sliding_window') if model_type == 'mistral' or hf.get('use_sliding_window') else None
    llama = model_type == 'llama'  # Qwen2 and Mistral fix their biases: q/k/v only (Qwen2), none (Mistral)
    return GPTConfig(family=model_type, block_size=hf['max_position_embeddings'], vocab_size=hf['vocab_size'],
                     n_layer=hf['num_hidden_layers'], n_head=hf['num_attention_heads'],
                     n_kv_head=hf.get('num_key_value_heads') or hf['num_attention_heads'],
                     n_embd=hf['hidden_size'], head_dim=hf.get('head_dim') or 0, mlp_hidden=hf['intermediate_size'],
                     rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get('rms_norm_eps', 1e-6),
                     qkv_bias=model_type == 'qwen2', attention_bias=llama and bool(hf.get('attention_bias')),
                     mlp_bias=llama and bool(hf.get('mlp_bias')), tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
                     sliding_window=window or 0, bias=False)


def weight_files(path):
    """The folder's weight files: one, or the shards its index names."""
    for single in ('model.safetensors', 'pytorch_model.bin'):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    for index in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                try:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
                except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}/{index} is not an index of weight files "
                                     f"({{'weight_map': {{tensor: file}}}}): {type(e).__name__}: {e}") from None
            for shard in shards:  # a file of the folder, not one elsewhere
                if not isinstance(shard, str) or os.path.isabs(shard) or os.path.normpath(shard).startswith('..') \
                        or not os.path.isfile(os.path.join(path, shard)):
                    raise FileNotFoundError(f"{path}/{index} names {shard!r}, which is not a file in the folder")
            return [os.path.join(path, shard) for shard in shards]
    raise FileNotFoundError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# the dtypes of safetensors' header (https://huggingface.co/docs/safetensors/index#format)
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
                      'BOOL': torch.bool}


class Rows:
    """A checkpoint's tensor, read when asked: its shape, read(start, stop), its rows start to stop (dim 0), and
    where it is stored ("file: name", for errors). fsdp.fill reads the rows FSDP2 gives this rank, so each rank
    reads its share of the checkpoint, not all of it."""

    def __init__(self, shape, read, where):
        self.shape, self.read, self.where = torch.Size(shape), read, where


def read_tensors(file):
    """(name, Rows) pairs of one weight file. A .safetensors file is 8 bytes (little-endian length of the
    header), a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes of each tensor, row after
    row: a range of rows is one range of bytes, read here without the safetensors package. A .bin file is
    memory-mapped: a slice of it touches only its own pages."""
    if not file.endswith('.safetensors'):
        for name, tensor in torch_checkpoint(file).items():
            yield name, Rows(tensor.shape, lambda start, stop, tensor=tensor: tensor[start:stop], f'{file}: {name}')
        return
    with open(file, 'rb') as f:
        header, start = read_safetensors_header(file, f)
    for name, (dtype, shape, begin, end) in header.items():
        yield name, Rows(shape, safetensors_rows(file, dtype, shape, start + begin, end - begin), f'{file}: {name}')


def safetensors_rows(file, dtype, shape, offset, nbytes):
    """read(start, stop) of a tensor stored at `offset` of a safetensors file (a 0-d tensor is one row)."""
    row_shape = shape[1:] if shape else []
    row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes

    def read(start, stop):
        with open(file, 'rb') as f:
            f.seek(offset + start * row_bytes)
            data = bytearray((stop - start) * row_bytes)
            f.readinto(data)  # straight into the tensor's memory: one copy of it, not two
        rows = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return rows.view(shape) if not shape else rows.view(stop - start, *row_shape)
    return read


def read_safetensors_header(file, f):
    """{name: (dtype, shape, begin, end)} of a safetensors file open at its start, and where its data begins, once
    every count agrees: the header's length with the file, each tensor's bytes with its dtype and shape, and the
    last tensor's end with the file's end. A cut file (an export stopped by a full disk) would read as zeros."""
    size = os.fstat(f.fileno()).st_size
    length = int.from_bytes(f.read(8), 'little')
    cut = f"{file} is not a whole safetensors file ({size} bytes)"
    if size < 8 or not 0 < length <= size - 8:
        raise ValueError(f"{cut}: its header would be {length} bytes; write or download it again")
    try:
        header = json.loads(f.read(length))
        header.pop('__metadata__', None)
        tensors = {}
        for name, info in header.items():
            if info['dtype'] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: {name} is of dtype {info['dtype']}, which is not read here "
                                 f"({', '.join(SAFETENSORS_DTYPES)})")
            dtype, (begin, end), shape = SAFETENSORS_DTYPES[info['dtype']], info['data_offsets'], info['shape']
            if not all(type(n) is int for n in [begin, end, *shape]) or not 0 <= begin <= end \
                    or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{file}: {name}'s bytes {begin}-{end} do not hold a {info['dtype']} tensor of shape "
                                 f"{shape}; the file is damaged")
            tensors[name] = (dtype, shape, begin, end)
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cut}: its header cannot be read ({type(e).__name__}: {e})") from None
    ranges = sorted((begin, end, name) for name, (*_, begin, end) in tensors.items())
    for (_, end, name), (begin, _, following) in zip([(0, 0, 'the header')] + ranges, ranges):
        if begin != end:  # the format: tensors back to back from the header on, no gap, no overlap
            raise ValueError(f"{file}: the bytes of {name} and {following} "
                             f"{'overlap' if begin < end else 'leave a gap'}; the file is damaged")
    data_bytes = ranges[-1][1] if ranges else 0
    if 8 + length + data_bytes != size:
        raise ValueError(f"{cut}: its header names {data_bytes} bytes of tensors, the file holds {size - 8 - length}; "
                         f"write or download it again")
    return tensors, 8 + length


def torch_checkpoint(file):
    """The tensors of a torch .bin file, memory-mapped where its format allows; a damaged one is an error naming it."""
    try:
        try:
            tensors = torch.load(file, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # a file written before torch 1.6 (GPT-2's own) cannot be memory-mapped
            tensors = torch.load(file, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # OSError: a cut zip archive
        raise ValueError(f"{file} cannot be read as a torch checkpoint ({e}); write or download it again") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file} is not a model's weights (a dict of names to tensors)")
    return tensors


def our_name(name, config):
    """The name of a checkpoint tensor in our model (a tied head's too: it must equal the embedding), or None
    for tensors to skip."""
    if config.family == 'gpt_neox':  # skipped: older checkpoints' causal masks and rotary buffers
        if name.endswith(('attention.bias', 'attention.masked_bias', 'rotary_emb.inv_freq')):
            return None
        for theirs, ours in NEOX_NAMES:
            name = name.replace(theirs, ours)
        return name
    if config.family != 'gpt2' or name == HEAD:  # a head as it is; skipped: the rotary buffers older Llamas carry
        return None if name.endswith('rotary_emb.inv_freq') else name
    name = 'transformer.' + name.removeprefix('transformer.')  # GPT2LMHeadModel or GPT2Model keys
    return None if name.endswith(('.attn.bias', '.attn.masked_bias')) else name  # old causal masks


def pretrained_tensors(path, config):
    """(name, Rows) pairs of our model from a local Hugging Face folder (fsdp.fill reads each into a model, or
    this rank's rows into its shards). A tensor with no place in the model, a missing
    one and a misshapen one are each one clear error naming it."""
    with torch.device('meta'):
        shapes = {name: p.shape for name, p in make_model(config).named_parameters(remove_duplicate=False)}
    loaded, tied = set(), {}  # tied: a tied model's embedding and head as its files hold them (a .bin may hold both)
    for file in weight_files(path):
        for name, rows in read_tensors(file):
            name = our_name(name, config)
            if name is None:
                continue
            if name not in shapes or name in loaded:  # in loaded: two names for one tensor, or in two shards
                raise ValueError(f"{file}: weight {name} " + ("is stored twice; which is meant cannot be told"
                                 if name in shapes else f"has no place in a {config.family} model"))
            loaded.add(name)
            if config.tie_embeddings and name in (HEAD, *EMBEDDINGS):
                tied[name] = rows
                if name == HEAD:  # not read into the model: checked to equal the embedding below
                    continue
            if config.family == 'gpt2' and name.endswith(GPT2_TRANSPOSED):  # our rows are its columns: read whole
                rows = Rows(rows.shape[::-1], lambda start, stop, rows=rows: rows.read(0, rows.shape[0]).t()[start:stop],
                            rows.where)
            expected = (config.vocab_size, *shapes[name][1:]) if name in VOCAB_TABLES else shapes[name]
            if rows.shape != expected:
                raise ValueError(f"{path}: {name} has shape {tuple(rows.shape)}, config.json implies {tuple(expected)}")
            if rows.shape != shapes[name]:  # the padding rows of GPT-2's (and GPT-NeoX's) vocabulary
                rows = padded_rows(rows, shapes[name][0])
            yield name, rows
    missing = set(shapes) - loaded - ({'lm_head.weight'} if config.tie_embeddings else set())
    if missing:
        raise ValueError(f"{path}: weights missing for {sorted(missing)}")
    head, embedding = tied.get(HEAD), next((tied[name] for name in EMBEDDINGS if name in tied), None)
    if head is not None and not rank0_decides(lambda: same_rows(head, embedding)):  # read once, by rank 0
        raise ValueError(f"{head.where} differs from {embedding.where}, but config.json ties the head to the "
                         f"embedding (GPT-2 always; tie_word_embeddings): which is meant cannot be told")


def same_rows(a, b, chunk=4096):
    """Whether two stored tensors hold the same values, compared a chunk of rows at a time."""
    spans = [(i, min(i + chunk, a.shape[0])) for i in range(0, a.shape[0], chunk)]
    return a.shape == b.shape and all(torch.equal(a.read(*span).float(), b.read(*span).float()) for span in spans)


def from_pretrained(path):
    """A model on the CPU from a local Hugging Face folder (train.py fills its sharded copies itself)."""
    config = read_config(path)
    model = empty_model(config)
    fill(model, pretrained_tensors(path, config))
    return model


def hf_config(config):
    if config.family == 'gpt_neox':
        return {'model_type': 'gpt_neox', 'architectures': ['GPTNeoXForCausalLM'], 'vocab_size': config.vocab_size,
                'max_position_embeddings': config.block_size, 'hidden_size': config.n_embd,
                'num_hidden_layers': config.n_layer, 'num_attention_heads': config.n_head,
                'intermediate_size': 4 * config.n_embd, 'hidden_act': 'gelu' if config.gelu == 'none' else 'gelu_new',
                'rotary_pct': config.rotary_pct, 'rotary_emb_base': config.rope_theta, 'attention_bias': True,
                'use_parallel_residual': config.parallel_residual, 'layer_norm_eps': config.norm_eps,
                'tie_word_embeddings': config.tie_embeddings, 'torch_dtype': 'float32'}
    if config.family == 'gpt2':
        return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': config.vocab_size,
                'n_positions': config.block_size, 'n_ctx': config.block_size, 'n_embd': config.n_embd,
                'n_layer': config.n_layer, 'n_head': config.n_head, 'layer_norm_epsilon': config.norm_eps,
                'activation_function': 'gelu_new' if config.gelu == 'tanh' else 'gelu',
                'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout,
                'tie_word_embeddings': True, 'torch_dtype': 'float32'}
    hf = {'model_type': config.family, 'architectures': [LLAMA_ARCHITECTURES[config.family]],
          'vocab_size': config.vocab_size, 'max_position_embeddings': config.block_size,
          'hidden_size': config.n_embd, 'num_hidden_layers': config.n_layer, 'num_attention_heads': config.n_head,
          'num_key_value_heads': config.n_kv_head or config.n_head, 'head_dim': config.head_dim or config.n_embd // config.n_head,
          'intermediate_size': config.mlp_hidden, 'hidden_act': 'silu', 'rms_norm_eps': config.norm_eps,
          'rope_theta': config.rope_theta, 'rope_scaling': dict(rope_type='llama3', **config.rope_scaling)
          if config.rope_scaling else None, 'tie_word_embeddings': config.tie_embeddings, 'torch_dtype': 'float32'}
    if config.family == 'llama':
        hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    hf['sliding_window'] = config.sliding_window or None
    if config.family == 'qwen2':
        hf['use_sliding_window'] = bool(config.sliding_window)
    return hf


def export_pretrained(model, folder, token_ids=None, max_shard_bytes=5 * 2**30):
    """Writes the model as a Hugging Face folder that transformers loads: config.json (with token_ids, e.g.
    bos_token_id and eos_token_id, so that generation stops where training taught it) and float32 weights, as
    model.safetensors or, when larger than max_shard_bytes, as shards with an index; GPT-2's vocabulary cropped
    to the tokenizer's. Streamed: every rank calls it, each tensor is gathered from the shards one at a time,
    and rank 0 writes it and lets it go, so no rank ever holds the whole model."""
    config = model.config
    if config.family in ('gpt2', 'gpt_neox') and not config.bias:
        raise ValueError(f"a Hugging Face {config.family} has biases: export needs a model trained with bias=True")
    # what each file holds, known before any tensor is gathered: safetensors' header comes first
    entries = []  # (name in the file, parameter, shape in the file)
    for name, param in model.named_parameters():  # a tied head is yielded once, as the embedding
        shape = (config.vocab_size, *param.shape[1:]) if name in VOCAB_TABLES else tuple(param.shape)
        if config.family == 'gpt2' and name.endswith(GPT2_TRANSPOSED):
            shape = shape[::-1]
        entries.append((neox_name(name) if config.family == 'gpt_neox' else name, param, shape))
    files, size = [[]], 0
    for entry in entries:
        nbytes = 4 * math.prod(entry[2])
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    names = ['model.safetensors'] if len(files) == 1 else \
        [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    writer = is_main_process()
    if writer:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'config.json'), 'w') as f:
            json.dump({**hf_config(config), **(token_ids or {})}, f, indent=2)
        if len(files) > 1:
            with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
                json.dump({'metadata': {'total_size': sum(4 * math.prod(e[2]) for e in entries)},
                           'weight_map': {e[0]: file for file, part in zip(names, files) for e in part}}, f, indent=2)
    for file, part in zip(names, files):
        with open(os.path.join(folder, file), 'wb') if writer else contextlib.nullcontext() as f:
            if writer:
                f.write(safetensors_header(part))
            for name, param, shape in part:
                tensor = full(param.detach()).float().cpu()  # a collective: every rank gathers, in the same order
                if config.family == 'gpt2' and name.endswith(GPT2_TRANSPOSED):
                    tensor = tensor.t()
                tensor = tensor[:shape[0]]  # the vocabulary's padding rows cropped
                if writer:
                    f.write(memoryview(tensor.contiguous().numpy()))  # the tensor's own bytes, not a copy


def neox_name(name):
    """Our name of a GPT-NeoX tensor as its checkpoints name it."""
    for theirs, ours in NEOX_NAMES:
        name = name.replace(ours, theirs)
    return name


def safetensors_header(entries):
    """The 8-byte length and the JSON header of a safetensors file of float32 tensors (read_tensors' format),
    padded with spaces to a multiple of 8 bytes, as the format asks."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, _, shape in entries:
        nbytes = 4 * math.prod(shape)
        header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    return len(text).to_bytes(8, 'little') + text
