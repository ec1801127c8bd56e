"""The Llama family and GPT-NeoX against Hugging Face's own models, offline: tiny random Llama, Qwen2, Mistral
and GPT-NeoX models
written by transformers as several safetensors shards with an index, loaded by hf.from_pretrained, and
exported back (needs the optional transformers and safetensors packages)."""
import json
import os

import pytest
import torch

from hf import export_pretrained, from_pretrained
from config import MODEL_PRESETS
from model import GPTConfig, make_model, rope_frequencies

transformers = pytest.importorskip('transformers')

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
             max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
CASES = {
    'llama, grouped-query, untied, llama3 rotary scaling': (transformers.LlamaConfig, dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    'llama, attention and MLP biases, tied': (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True,
                                                                             tie_word_embeddings=True)),
    'qwen2, q/k/v biases, tied': (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    'mistral, grouped-query, head_dim apart from hidden_size / heads, untied': (transformers.MistralConfig, dict(
        num_key_value_heads=1, head_dim=12, sliding_window=None, tie_word_embeddings=False)),
    # GPT-NeoX: fused q/k/v head by head, rotary positions on part of each head, vocabulary padded inside ours
    'gpt_neox, parallel residual, half of each head rotary': (transformers.GPTNeoXConfig, dict(
        intermediate_size=128, rotary_pct=0.5)),
    'gpt_neox, sequential residual, a quarter rotary, tanh gelu': (transformers.GPTNeoXConfig, dict(
        intermediate_size=128, rotary_pct=0.25, use_parallel_residual=False, hidden_act='gelu_new',
        rotary_emb_base=500.0)),
    'gpt_neox, gelu_fast as GPT-NeoX-20B, the rotary share left to its default': (transformers.GPTNeoXConfig, dict(
        intermediate_size=128, hidden_act='gelu_fast')),
}
ARCHITECTURES = {transformers.LlamaConfig: transformers.LlamaForCausalLM, transformers.Qwen2Config:
                 transformers.Qwen2ForCausalLM, transformers.MistralConfig: transformers.MistralForCausalLM,
                 transformers.GPTNeoXConfig: transformers.GPTNeoXForCausalLM}


def write_tiny(folder, config_class, extra, seed=0):
    torch.manual_seed(seed)
    hf_model = ARCHITECTURES[config_class](config_class(**{**SMALL, **extra})).eval()
    with torch.no_grad():  # every tensor random and large (biases and norm gains too): nothing hides in flat logits
        for name, param in hf_model.named_parameters():
            param.normal_(1.0 if 'norm' in name else 0.0, 0.3)
    hf_model.save_pretrained(folder, max_shard_size='20KB')  # several shards and an index
    return hf_model


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hugging_face_and_the_export_loads_back(tmp_path, case):
    hf_model = write_tiny(tmp_path / 'hf', *CASES[case])
    assert os.path.isfile(tmp_path / 'hf' / 'model.safetensors.index.json')
    ours = from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        expected = hf_model(idx).logits
        assert expected.std() > 1.0
        assert torch.allclose(ours(idx)[0], expected, atol=1e-5)
        export_pretrained(ours, str(tmp_path / 'exported'),
                          {'bos_token_id': 0, 'eos_token_id': 99}, max_shard_bytes=20_000)
        assert os.path.isfile(tmp_path / 'exported' / 'model.safetensors.index.json')
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported')).eval()
        assert type(back) is type(hf_model) and (back.config.bos_token_id, back.config.eos_token_id) == (0, 99)
        assert torch.allclose(back(idx).logits, expected, atol=1e-5)


def test_the_older_rope_theta_and_rope_scaling_keys_read_alike(tmp_path):
    hf_model = write_tiny(tmp_path, *CASES['llama, grouped-query, untied, llama3 rotary scaling'])
    config = json.loads((tmp_path / 'config.json').read_text())
    rope = config.pop('rope_parameters')  # the layout of Llama 3.1 / 3.2 config.json files
    config['rope_theta'] = rope.pop('rope_theta')
    config['rope_scaling'] = {'type' if k == 'rope_type' else k: v for k, v in rope.items()}
    (tmp_path / 'config.json').write_text(json.dumps(config))
    ours = from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_theta == 500000.0 and ours.config.rope_scaling['factor'] == 8.0
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf_model(idx).logits, atol=1e-5)


def test_llama3_scaling_stretches_long_wavelengths_and_blends_the_middle():
    plain = rope_frequencies(GPTConfig(family='llama', n_embd=32, n_head=4))  # wavelengths 2π·(1, 10, 100, 1000)
    scaled = rope_frequencies(GPTConfig(family='llama', n_embd=32, n_head=4, rope_theta=10000.0, rope_scaling={
        k: v for k, v in LLAMA3_ROPE.items() if k not in ('rope_type', 'rope_theta')}))
    assert torch.allclose(scaled[1:], plain[1:] / 8)  # longer than original_max_position_embeddings: / factor
    assert plain[0] / 8 < scaled[0] < plain[0]  # between 16/4 and 16: blended


def test_a_weight_missing_misplaced_or_misshapen_is_one_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file
    write_tiny(tmp_path, transformers.LlamaConfig, dict(tie_word_embeddings=False))
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
    file = str(tmp_path / index['weight_map']['model.norm.weight'])
    weights = load_file(file)
    save_file({k: v for k, v in weights.items() if k != 'model.norm.weight'}, file)
    with pytest.raises(ValueError, match=r"weights missing for \['model.norm.weight'\]"):
        from_pretrained(str(tmp_path))
    save_file({**weights, 'model.layers.9.mlp.up_proj.weight': torch.zeros(64, 32)}, file)
    with pytest.raises(ValueError, match="weight model.layers.9.mlp.up_proj.weight has no place"):
        from_pretrained(str(tmp_path))
    save_file({**weights, 'model.norm.weight': torch.ones(31)}, file)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(31,\), config.json implies \(32,\)"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name, billions", [('llama3.2-1b', 1.24), ('llama3-8b', 8.03), ('yi-34b', 34.39),
                                             ('pythia-160m', 0.162), ('gpt-neox-20b', 20.55)])
def test_presets_have_the_published_parameter_counts(name, billions):
    with torch.device('meta'):  # shapes only: no memory
        model = make_model(GPTConfig(**MODEL_PRESETS[name]))
    assert model.num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_an_attention_window_shorter_than_block_size_is_refused(tmp_path):
    import train
    write_tiny(tmp_path, transformers.MistralConfig, dict(sliding_window=8, vocab_size=256))
    with pytest.raises(ValueError, match=r"attention window \(8\) is shorter than --block_size=16"):
        train.main([f'--init_from={tmp_path}', '--block_size=16', f'--out_dir={tmp_path}/out', '--max_steps=1'])


def test_a_gpt_neox_config_without_a_rotary_share_takes_transformers_default_a_quarter(tmp_path):
    from hf import read_config
    (tmp_path / 'config.json').write_text(json.dumps({**SMALL, 'model_type': 'gpt_neox', 'intermediate_size': 128}))
    assert read_config(str(tmp_path)).rotary_pct == 0.25
