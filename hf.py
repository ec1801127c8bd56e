"""
Hugging Face model folders in and out, offline: config.json and the weights, as model.safetensors, as shards
(model-00001-of-0000N.safetensors with model.safetensors.index.json, what every 7B+ model ships) or as
pytorch_model.bin. GPT-2 and the Llama family (model_type llama, qwen2, mistral). Nothing is downloaded.

    python train.py --init_from=path/to/folder ...     # both copies start from its weights, its config.json
    python train.py ... --export=True                  # out_dir/hf: the trained upper model, the same family
"""
import json
import os

import torch

from model import GPTConfig, make_model

# HF's GPT-2 uses Conv1D layers, whose weights are stored as (in, out): the transpose of nn.Linear's
GPT2_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
LLAMA_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'mistral': 'MistralForCausalLM'}


def read_config(path):
    """Our GPTConfig from a folder's config.json."""
    config_path = os.path.join(path, 'config.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: a Hugging Face model folder holds config.json and "
                                f"model.safetensors (or shards with model.safetensors.index.json, or pytorch_model.bin)")
    with open(config_path) as f:
        hf = json.load(f)
    model_type = hf.get('model_type', 'gpt2')
    if model_type == 'gpt2':
        return gpt2_config(hf, config_path)
    if model_type in LLAMA_ARCHITECTURES:
        return llama_config(hf, config_path)
    raise ValueError(f"{config_path}: model_type '{model_type}' is neither GPT-2 nor of the Llama family "
                     f"({', '.join(LLAMA_ARCHITECTURES)})")


def gpt2_config(hf, where):
    missing = [k for k in ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if k not in hf]
    activation = hf.get('activation_function', 'gelu_new')
    if missing or activation not in ('gelu_new', 'gelu_pytorch_tanh', 'gelu'):
        raise ValueError(f"{where} is not a GPT-2 config (missing {missing}, activation {activation})")
    return GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                     n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True, gelu='none' if activation == 'gelu' else 'tanh')


def llama_config(hf, where):
    missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                           'vocab_size', 'max_position_embeddings') if k not in hf]
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
        scaling = {k: rope[k] for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                                        'original_max_position_embeddings')}
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
                shards = sorted(set(json.load(f)['weight_map'].values()))
            for shard in shards:
                if not os.path.isfile(os.path.join(path, shard)):
                    raise FileNotFoundError(f"{path}/{index} names {shard}, which is not in the folder")
            return [os.path.join(path, shard) for shard in shards]
    raise FileNotFoundError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_tensors(file):
    if file.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{file} needs the safetensors package: pip install safetensors") from None
        return load_file(file)
    return torch.load(file, map_location='cpu', weights_only=True)


def our_name(name, config):
    """The name of a checkpoint tensor in our model, or None for tensors to skip."""
    if config.family != 'gpt2':  # skipped: a tied head; the rotary buffers older Llama checkpoints carry
        return None if (name == 'lm_head.weight' and config.tie_embeddings) or name.endswith('rotary_emb.inv_freq') \
            else name
    name = 'transformer.' + name.removeprefix('transformer.')  # GPT2LMHeadModel or GPT2Model keys
    return None if name.endswith(('.attn.bias', '.attn.masked_bias', 'lm_head.weight')) else name  # old masks; tied head


@torch.no_grad()
def from_pretrained(path):
    """A model from a local Hugging Face folder, filled one weight file at a time. A tensor with no place in
    the model, a missing one and a misshapen one are each one clear error naming it."""
    config = read_config(path)
    model = make_model(config)
    ours = model.state_dict()
    for tensor in ours.values():
        tensor.zero_()  # GPT-2's padding rows of the vocabulary stay 0
    loaded = {'lm_head.weight'} if config.tie_embeddings else set()
    for file in weight_files(path):
        for name, tensor in read_tensors(file).items():
            name = our_name(name, config)
            if name is None:
                continue
            if name not in ours:
                raise ValueError(f"{path}: weight {name} has no place in a {config.family} model")
            if config.family == 'gpt2' and name.endswith(GPT2_TRANSPOSED):
                tensor = tensor.t()
            expected = (config.vocab_size, *ours[name].shape[1:]) if name == 'transformer.wte.weight' \
                else ours[name].shape
            if tensor.shape != expected:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected)}")
            ours[name][:tensor.size(0)].copy_(tensor)
            loaded.add(name)
    if set(ours) - loaded:
        raise ValueError(f"{path}: weights missing for {sorted(set(ours) - loaded)}")
    return model


def hf_config(config):
    if config.family == 'gpt2':
        return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': config.vocab_size,
                'n_positions': config.block_size, 'n_ctx': config.block_size, 'n_embd': config.n_embd,
                'n_layer': config.n_layer, 'n_head': config.n_head, 'layer_norm_epsilon': 1e-5,
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


def export_pretrained(state_dict, config, folder, token_ids=None, max_shard_bytes=5 * 2**30):
    """Writes a full state dict of our model as a Hugging Face folder that transformers loads: config.json (with
    token_ids, e.g. bos_token_id and eos_token_id, so that generation stops where training taught it) and float32
    weights, in shards of at most max_shard_bytes with an index when larger (pytorch_model.bin without the
    safetensors package); GPT-2's vocabulary cropped to the tokenizer's."""
    if config.family == 'gpt2' and not config.bias:
        raise ValueError("a Hugging Face GPT-2 has biases: export needs a model trained with bias=True")
    weights = {}
    for name, tensor in state_dict.items():
        if name == 'lm_head.weight' and config.tie_embeddings:
            continue  # tied to the embedding
        tensor = tensor.detach().cpu().float()  # float32, whatever the training dtype
        if name == 'transformer.wte.weight':
            tensor = tensor[:config.vocab_size]
        if config.family == 'gpt2' and name.endswith(GPT2_TRANSPOSED):
            tensor = tensor.t()
        weights[name] = tensor.contiguous()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({**hf_config(config), **(token_ids or {})}, f, indent=2)
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(weights, os.path.join(folder, 'pytorch_model.bin'))
        return
    shards, size = [{}], 0
    for name, tensor in weights.items():
        if size and size + tensor.numel() * 4 > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * 4
    if len(shards) == 1:
        save_file(weights, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
        return
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={'format': 'pt'})
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': sum(t.numel() * 4 for t in weights.values())},
                   'weight_map': weight_map}, f, indent=2)
