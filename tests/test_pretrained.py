"""Our GPT against Hugging Face's GPT-2, offline: a random model saved by transformers, loaded by
hf.from_pretrained, and exported back (needs the optional transformers and safetensors packages)."""
import pytest
import torch

from hf import export_pretrained, from_pretrained

transformers = pytest.importorskip('transformers')


def test_hugging_face_gpt2_loads_with_the_same_logits_and_exports_back(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                                        bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / 'hf')
    ours = from_pretrained(str(tmp_path / 'hf')).eval()
    assert ours.config.vocab_size == 100 and ours.padded_vocab == 128
    idx = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        expected = hf_model(idx).logits
        assert torch.allclose(ours(idx)[0], expected, atol=1e-5)
        export_pretrained(ours, str(tmp_path / 'exported'))
        back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'exported')).eval()
        assert torch.allclose(back(idx).logits, expected, atol=1e-5)


def test_a_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / 'config.json').write_text('{"n_positions": 8, "vocab_size": 10, "n_layer": 1, "n_head": 1, "n_embd": 4}')
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"):
        from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        from_pretrained(str(tmp_path / 'nowhere'))


def test_a_checkpoint_missing_a_weight_or_with_a_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                        bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / 'model.safetensors'))
    save_file({k: v for k, v in weights.items() if 'c_fc.weight' not in k}, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match="weights missing for .*c_fc.weight"):
        from_pretrained(str(tmp_path))
    weights['transformer.wpe.weight'] = weights['transformer.wpe.weight'][:3].contiguous()
    save_file(weights, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError, match="wpe.weight has shape"):
        from_pretrained(str(tmp_path))
