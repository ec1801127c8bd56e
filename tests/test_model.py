import pytest
import torch

from fsdp import fill
from model import GPT, GPTConfig, initial_weights, make_model


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_causal_a_later_token_never_changes_an_earlier_logit():
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 50, (3, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (3, 6))
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # the test can see a change where there is one


def test_minus_one_targets_are_ignored_and_loss_is_per_row():
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 8))
    targets = torch.randint(0, 50, (2, 8))
    logits, _ = model(idx)
    _, row_loss = model(idx, targets)
    assert row_loss.shape == (2,)
    masked = targets.clone()
    masked[0, :5] = -1
    _, masked_loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], targets[0, 5:])
    assert torch.allclose(masked_loss[0], expected, atol=1e-6)
    assert torch.allclose(masked_loss[1], row_loss[1])
    assert not torch.allclose(masked_loss[0], row_loss[0])


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_closed_form(bias):
    V, T, L, C = 50, 16, 3, 24
    model = tiny(vocab_size=V, block_size=T, n_layer=L, n_embd=C, bias=bias)
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, V)  # padding rows cropped
    V = 64  # the embedding is padded up to a multiple of 64
    # per block: 2 LayerNorms, c_attn (C x 3C), attn c_proj (C x C), c_fc (C x 4C), mlp c_proj (4C x C) = 12C²
    # weights, plus with bias 3C+C+4C+C = 9C Linear biases and 2C LayerNorm biases; head tied to wte
    norm = 2 * C if bias else C
    per_block = 12 * C * C + 2 * norm + (9 * C if bias else 0)
    assert model.num_params() == V * C + T * C + L * per_block + norm


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = tiny(n_layer=8, n_embd=64, vocab_size=256)
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.003
    assert abs(proj - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight


def test_batch_longer_than_context_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


LLAMA = dict(family='llama', n_kv_head=1, mlp_hidden=24, bias=False, rope_theta=500000.0)


@pytest.mark.parametrize('shape', [{}, dict(bias=False), dict(LLAMA, tie_embeddings=True), dict(LLAMA, tie_embeddings=False)],
                         ids=['gpt2', 'gpt2 without biases', 'llama tied', 'llama untied'])
def test_a_model_built_on_the_meta_device_and_filled_equals_one_built_on_the_cpu(shape):
    """train.py's construction: nothing allocated, then initial_weights one tensor at a time. Bit for bit the
    CPU construction, and the generator ends where it ends, so everything drawn later is the same too."""
    config = GPTConfig(**{**dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16), **shape})
    torch.manual_seed(3)
    on_cpu, drawn_next = make_model(config), torch.rand(4)
    torch.manual_seed(3)
    with torch.device('meta'):
        built = make_model(config)
    assert all(p.is_meta for p in built.parameters())
    built.to_empty(device='cpu')
    fill(built, initial_weights(config))
    assert torch.equal(torch.rand(4), drawn_next)
    for (name, a), b in zip(on_cpu.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), name
    embedding = built.transformer.wte if config.family == 'gpt2' else built.model.embed_tokens
    assert (built.lm_head.weight is embedding.weight) == config.tie_embeddings  # to_empty kept the head tied


@pytest.mark.parametrize('lever', ['checkpoint_blocks', 'logits_at_targets'])
def test_each_memory_lever_keeps_less_for_the_backward_and_gives_the_same_gradients(lever):
    """Activation checkpointing keeps each block's input only; the head on target positions only keeps no logits
    for the masked three quarters of the positions (a big vocabulary makes those dominate)."""
    torch.manual_seed(0)
    model = tiny(n_layer=4, vocab_size=2000).double()
    x = torch.randint(0, 2000, (3, 16))
    targets = x.clone()
    targets[:, :12] = -1
    saved, grads = [], []
    for on in (False, True):
        setattr(model, lever, on)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, targets)[1].sum()
        saved.append(total[0])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert saved[1] < 0.6 * saved[0]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_rows_cropped_after_the_last_target_keep_every_row_loss_and_gradient(family):
    """Right-padded rows of different lengths: the cropped forward gives the same per-row losses and gradients
    (float64), and the crop length is the longest row's, rounded up to the multiple."""
    from steps import crop_to_targets
    torch.manual_seed(0)
    shape = dict(family='llama', n_kv_head=1, mlp_hidden=32, bias=False) if family == 'llama' else {}
    model = make_model(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, **shape)).double()
    x = torch.randint(0, 50, (4, 32))
    y = torch.randint(0, 50, (4, 32))
    for row, length in enumerate([5, 11, 3, 9]):
        y[row, :2] = -1          # a prompt carries no loss
        y[row, length:] = -1     # nor does padding
        x[row, length + 1:] = 0  # the pad token
    assert crop_to_targets(x, y)[0].shape == (4, 11)
    assert crop_to_targets(x, y, multiple=8)[0].shape == (4, 16)
    assert crop_to_targets(x, y, multiple=64)[0].shape == (4, 32)  # never past the rows' own length
    assert crop_to_targets(x, torch.full_like(y, -1))[0].shape == (4, 1)
    losses, grads = [], []
    for rows in ((x, y), crop_to_targets(x, y)):
        row_loss = model(*rows)[1]
        row_loss.sum().backward()
        losses.append(row_loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert torch.allclose(losses[0], losses[1], atol=1e-10, rtol=0) and (losses[0] > 0).all()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
