import torch

from bilevel import make_source_logits_optimizer
from config import parse_config
from lisa import draw_active_blocks, set_active_blocks, set_lisa_blocks
from model import GPT, GPTConfig
from model import make_optimizer

N_LAYER, N_ACTIVE, INTERVAL = 6, 2, 5


def state_bytes(optimizer):
    """Bytes of AdamW's moments (the scalar step counters excluded)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for name, t in s.items() if name != 'step')


def run_lisa(steps, n_active=N_ACTIVE):
    """Trains a tiny GPT with LISA as train.py does; yields (step, model, optimizer, active, before) per step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=N_LAYER, n_head=2, n_embd=16))
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        active = set_active_blocks(model.transformer.h, optimizer,
                                   draw_active_blocks(N_LAYER, n_active, seed=0, switch_index=step // INTERVAL))
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randint(0, 32, (4, 8))
        model(x, x)[1].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield step, model, optimizer, active, before


def test_exactly_n_active_blocks_train_and_switches_happen_only_every_interval():
    previous, changes = None, []
    for step, model, _, active, before in run_lisa(40):
        trainable = [i for i, b in enumerate(model.transformer.h) if all(p.requires_grad for p in b.parameters())]
        frozen = [i for i, b in enumerate(model.transformer.h) if not any(p.requires_grad for p in b.parameters())]
        assert trainable == active and len(active) == N_ACTIVE and len(frozen) == N_LAYER - N_ACTIVE
        if previous is not None and active != previous:
            changes.append(step)
        previous = active
        # frozen blocks do not move; embeddings and head always train
        params = list(model.parameters())
        for p, old in zip(params, before):
            assert torch.equal(p, old) != p.requires_grad
        assert model.transformer.wte.weight.requires_grad and model.transformer.ln_f.weight.requires_grad
    assert all(s % INTERVAL == 0 for s in changes) and len(changes) >= 4


def test_optimizer_state_exists_only_for_trainable_parameters_at_the_expected_size():
    for step, model, optimizer, active, _ in run_lisa(30):
        trainable = {p for p in model.parameters() if p.requires_grad}
        assert set(optimizer.state) == trainable
        n_trainable = sum(p.numel() for p in trainable)
        assert state_bytes(optimizer) == 2 * 4 * n_trainable  # exp_avg and exp_avg_sq, float32
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    assert n_trainable == total - (N_LAYER - N_ACTIVE) * block


def test_a_block_drawn_again_keeps_its_state_a_new_one_starts_fresh():
    steps_of = {}
    for step, model, optimizer, active, _ in run_lisa(40):
        if step % INTERVAL == INTERVAL - 1:  # the last step of an interval
            counts = {i: optimizer.state[model.transformer.h[i].mlp.c_fc.weight]['step'].item() for i in active}
            for i, count in counts.items():
                kept = i in steps_of.get(step - INTERVAL, {})
                expected = steps_of[step - INTERVAL][i] + INTERVAL if kept else INTERVAL
                assert count == expected
            steps_of[step] = counts
    assert optimizer.state[model.transformer.wte.weight]['step'].item() == 40  # always trains, never reset


def test_lisa_off_is_full_fine_tuning_and_draws_are_pure_functions():
    assert draw_active_blocks(6, 0, seed=0, switch_index=3) == list(range(6))
    assert draw_active_blocks(6, 6, seed=0, switch_index=3) == list(range(6))
    assert draw_active_blocks(6, 2, 0, 7) == draw_active_blocks(6, 2, 0, 7)
    draws = {tuple(draw_active_blocks(6, 2, 0, k, copy_index=c)) for k in range(10) for c in (0, 1)}
    assert len(draws) > 5
    for *_, model, optimizer, _, _ in run_lisa(3, n_active=0):
        assert set(optimizer.state) == set(model.parameters())


def trainable(blocks):
    return [i for i, b in enumerate(blocks) if all(p.requires_grad for p in b.parameters())]


def test_copies_train_the_same_blocks_with_a_shared_draw_and_their_own_with_independent_draws():
    models = [GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=N_LAYER, n_head=2, n_embd=16)) for _ in range(2)]
    copies = [(m.transformer.h, make_optimizer(m, lr=1e-2, weight_decay=0.1)) for m in models]
    differ = 0
    for switch in range(10):
        set_lisa_blocks(copies, N_ACTIVE, 7, switch, 'shared')
        u, w = (trainable(blocks) for blocks, _ in copies)
        assert u == w == draw_active_blocks(N_LAYER, N_ACTIVE, 7, switch)
        set_lisa_blocks(copies, N_ACTIVE, 7, switch, 'independent')
        u, w = (trainable(blocks) for blocks, _ in copies)
        assert [u, w] == [draw_active_blocks(N_LAYER, N_ACTIVE, 7, switch, c) for c in (0, 1)]
        differ += u != w
    assert differ >= 5


def test_p_is_updated_by_the_authors_adam_with_lisa_as_without_it():
    for args in ([], ['--lisa_layers=2']):
        cfg = parse_config(args)
        assert (cfg.source_logits_update, cfg.central_difference, cfg.lisa_merge_frozen, cfg.lisa_interval) == \
            ('adam', False, False, 20)
    logits = torch.zeros(3, requires_grad=True)
    group = make_source_logits_optimizer(logits, 'adam').param_groups[0]  # torch's AdamW defaults, the authors' rate
    assert (group['betas'], group['initial_lr'], group['weight_decay']) == ((0.9, 0.999), 1e-2, 0.0)


def test_merge_frozen_gives_a_freezing_block_the_copies_mean_and_leaves_the_rest():
    torch.manual_seed(0)
    models = [GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=N_LAYER, n_head=2, n_embd=16)) for _ in range(2)]
    copies = [(m.transformer.h, make_optimizer(m, lr=1e-2, weight_decay=0.1)) for m in models]
    set_lisa_blocks(copies, N_ACTIVE, 7, 0, 'shared', merge_frozen=True)
    first = draw_active_blocks(N_LAYER, N_ACTIVE, 7, 0)
    with torch.no_grad():  # the copies move apart in every block, as training would move the active ones
        for p in models[1].parameters():
            p.add_(torch.randn_like(p))
    before = [[p.clone() for p in m.parameters()] for m in models]
    set_lisa_blocks(copies, N_ACTIVE, 7, 0, 'shared', merge_frozen=True)  # the same interval: nothing merges
    assert all(torch.equal(a, b) for m, old in zip(models, before) for a, b in zip(m.parameters(), old))
    switch = next(k for k in range(1, 100) if set(draw_active_blocks(N_LAYER, N_ACTIVE, 7, k)) != set(first))
    second = draw_active_blocks(N_LAYER, N_ACTIVE, 7, switch)  # some block freezes at this switch
    set_lisa_blocks(copies, N_ACTIVE, 7, switch, 'shared', merge_frozen=True)
    for i, (block_u, block_w) in enumerate(zip(*(m.transformer.h for m in models))):
        names = [n for n, _ in block_u.named_parameters()]
        old_u = dict(zip(names, [before[0][j] for j, (n, p) in enumerate(models[0].named_parameters())
                                 if n.startswith(f'transformer.h.{i}.')]))
        old_w = dict(zip(names, [before[1][j] for j, (n, p) in enumerate(models[1].named_parameters())
                                 if n.startswith(f'transformer.h.{i}.')]))
        for name, p_u in block_u.named_parameters():
            p_w = dict(block_w.named_parameters())[name]
            if i in first and i not in second:  # froze now: both hold the mean
                assert torch.allclose(p_u, (old_u[name] + old_w[name]) / 2) and torch.equal(p_u, p_w)
            else:  # still active, or frozen before this switch: untouched
                assert torch.equal(p_u, old_u[name]) and torch.equal(p_w, old_w[name])


def test_by_default_a_block_that_freezes_keeps_each_copys_values():
    torch.manual_seed(0)
    models = [GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=N_LAYER, n_head=2, n_embd=16)) for _ in range(2)]
    copies = [(m.transformer.h, make_optimizer(m, lr=1e-2, weight_decay=0.1)) for m in models]
    set_lisa_blocks(copies, N_ACTIVE, 7, 0)
    with torch.no_grad():  # the copies move apart, as training would move them
        for p in models[1].parameters():
            p.add_(torch.randn_like(p))
    before = [[p.clone() for p in m.parameters()] for m in models]
    switch = next(k for k in range(1, 100) if set(draw_active_blocks(N_LAYER, N_ACTIVE, 7, k))
                  != set(draw_active_blocks(N_LAYER, N_ACTIVE, 7, 0)))
    set_lisa_blocks(copies, N_ACTIVE, 7, switch)
    assert all(torch.equal(a, b) for m, old in zip(models, before) for a, b in zip(m.parameters(), old))
