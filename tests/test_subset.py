"""sd_granularity='subset': per-sample gates whose branch runs on the kept samples only."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from sd_zoo import add_stochastic_depth, fold_survival_scale, set_gate_seed, stochastic_blocks
from sd_zoo.models.sd_resnet_cifar import CifarBasicBlock
from sd_zoo.stochastic_depth import subset_keep_indices


def _keeps(model):
    return [None if b.last_keep is None else b.last_keep.tolist() for b in stochastic_blocks(model)]


def _batch_sizes_seen(module):
    """Record the batch size of every call of ``module``."""
    sizes = []
    module.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes


def test_kept_fraction_matches_schedule():
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5, sd_granularity='subset').train()
    blocks = stochastic_blocks(model)
    steps, n = 150, 16
    kept = torch.zeros(len(blocks))
    ran = [_batch_sizes_seen(b.conv1) for b in blocks]
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(n, 3, 8, 8))
            kept += torch.tensor([len(b.last_keep) for b in blocks], dtype=torch.float)
    for l, (block, k) in enumerate(zip(blocks, kept), start=1):
        p = 1 - l / len(blocks) * 0.5
        sigma = math.sqrt(steps * n * p * (1 - p))
        assert abs(k.item() - steps * n * p) < 4.5 * sigma, f'block {l}: {k} of {steps * n} kept, p_l={p}'
    # the branch ran on exactly the kept samples: compute scales with the kept fraction
    assert [sum(r) for r in ran] == kept.int().tolist()
    assert any(0 < s < n for r in ran for s in r)


def _check_against_masked_reference(block, pre, input_act=torch.relu):
    """A subset block's output, input and parameter gradients and BN statistics equal gathering the kept rows,
    running the branch on them, adding into the shortcut and activating, done by hand. The input is
    ``input_act(pre)``, the previous block's activation (what a block sees in a network), and the input gradient
    compared is the one reaching ``pre``."""
    x = input_act(pre)
    for _ in range(10):  # find a step with a proper subset (deterministic: masks depend on seed and step only)
        ref = copy.deepcopy(block)
        xa, xb = pre.clone().requires_grad_(), pre.clone().requires_grad_()
        out = block(input_act(xa))
        keep = block.last_keep
        if 0 < len(keep) < len(x):
            break
    else:
        pytest.fail('no proper subset drawn in 10 steps')
    p = len(keep) / len(x) if block.granularity == 'fixed_subset' else block.survival_prob
    scale = 1 / p if block.scaling == 'inverted' else 1.0
    xb_act = input_act(xb)
    by_hand = ref.shortcut(xb_act).clone()
    by_hand[keep] += scale * ref.branch(xb_act[keep])
    by_hand = ref.act(by_hand)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-6)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (by_hand * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    # BatchNorm saw (and tracked) the kept subset's statistics
    for (name, a), b in zip(block.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize('scaling', ['paper', 'inverted'])
@pytest.mark.parametrize('stride', [1, 2])
def test_output_and_grads_equal_gather_branch_scatter_by_hand(scaling, stride):
    block = CifarBasicBlock(4, 4 * stride, stride=stride, survival_prob=0.6, granularity='subset', scaling=scaling,
                            block_index=3, seed=5).train()
    _check_against_masked_reference(block, torch.randn(8, 4, 8, 8))


@pytest.mark.parametrize('scaling', ['paper', 'inverted'])
def test_fixed_subset_runs_exactly_k_samples_each_kept_alike(scaling):
    """DINOv2's fixed-size subset: every step each block runs its branch on exactly max(int(n p_l), 1) samples,
    a uniformly random subset (each sample kept with probability k / n), and equals the masked reference with
    the n / k scale."""
    from sd_zoo.stochastic_depth import fixed_subset_size
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5, sd_granularity='fixed_subset', sd_scaling=scaling)
    blocks = stochastic_blocks(model.train())
    steps, n = 200, 8
    per_sample = torch.zeros(len(blocks), n)
    ran = [_batch_sizes_seen(b.conv1) for b in blocks]
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(n, 3, 8, 8))
            for i, b in enumerate(blocks):
                assert len(b.last_keep) == fixed_subset_size(n, b.survival_prob)
                per_sample[i, b.last_keep] += 1
    for i, b in enumerate(blocks):
        k = fixed_subset_size(n, b.survival_prob)
        assert ran[i] == ([k] * steps if k < n else [n] * steps)
        if k < n:  # each sample keeps the branch with probability k / n
            sigma = math.sqrt(steps * k / n * (1 - k / n))
            assert (per_sample[i] - steps * k / n).abs().max() < 4.5 * sigma, (i, per_sample[i])
    assert fixed_subset_size(8, 0.1) == 1 and fixed_subset_size(8, 0.55) == 4
    block = CifarBasicBlock(4, 4, survival_prob=0.6, granularity='fixed_subset', scaling=scaling, seed=3).train()
    _check_against_masked_reference(block, torch.randn(8, 4, 8, 8))


@pytest.mark.parametrize('act, where', [('relu', 'layer1.1'), ('silu', 'layer1.1'), ('relu', 'layer2.0')])
def test_timm_resnet_subset_blocks_equal_the_masked_reference(act, where):
    """timm ResNet blocks in subset mode: an identity shortcut (a ReLU block, and a SiLU one, whose dropped rows
    change under the activation) and a projection shortcut."""
    model = timm.create_model('sd_resnet18', act_layer=act, drop_path_rate=0.6, sd_granularity='subset', sd_seed=2)
    block = model.get_submodule(where).train()
    pre = torch.randn(8, block.conv1.in_channels, 8, 8)
    _check_against_masked_reference(block, pre, torch.relu if act == 'relu' else torch.nn.functional.silu)


def test_no_sample_kept_is_a_dropped_block_with_zero_grads():
    model = timm.create_model('sd_resnet56', drop_path_rate=0.5, sd_granularity='subset').train()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, CifarBasicBlock)]
    calls = {n: _batch_sizes_seen(m.conv1) for n, m in named}
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 3, 16, 16)).logsumexp(1).mean().backward()
    dropped = [(n, m) for n, m in named if len(m.last_keep) == 0]
    assert dropped and any(len(m.last_keep) > 0 for _, m in named)
    for n, m in dropped:
        assert not m.last_gate and calls[n] == []  # not computed at all
        for pn, p in m.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, f'{n}.{pn}'
        for buf in ('running_mean', 'running_var', 'num_batches_tracked'):
            assert torch.equal(getattr(m.bn1, buf), before[f'{n}.bn1.{buf}'])
    assert all(p.grad is not None for p in model.parameters())


def _single_kept_step(block, x):
    """Run training steps until exactly one sample is drawn; return the output and the block's input."""
    for _ in range(50):
        xr = x.clone().requires_grad_()
        step = block.gate_step
        out = block(xr)
        if len(subset_keep_indices(block.gate_seed, block.block_index, step, 0, len(x), block.survival_prob)) == 1:
            return out, xr
    pytest.fail('no single-sample subset in 50 steps')


def test_single_kept_sample_at_1x1_is_dropped_and_runs_when_larger():
    block = CifarBasicBlock(4, 4, survival_prob=0.5, granularity='subset', seed=2).train()
    convs = _batch_sizes_seen(block.conv1)
    x = torch.rand(3, 4, 1, 1)
    out, xr = _single_kept_step(block, x)  # BN in training cannot normalise one value per channel
    assert len(block.last_keep) == 0 and not block.last_gate
    assert torch.equal(out, x)
    out.sum().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in block.parameters())
    convs.clear()
    block.zero_grad()
    out, xr = _single_kept_step(block, torch.rand(3, 4, 2, 2))
    assert len(block.last_keep) == 1 and block.last_gate and convs[-1] == 1
    out.sum().backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in block.parameters())
    # an ImageNet model on a small input reaches 1x1 in its last stage; training must not raise
    model = timm.create_model('sd_resnet18', sd_granularity='subset', num_classes=4).train()
    for _ in range(12):
        model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_masks_reproducible_per_rank_independent_of_global_rng():
    a = subset_keep_indices(3, 7, 11, 0, 64, 0.5)
    assert torch.equal(a, subset_keep_indices(3, 7, 11, 0, 64, 0.5))
    assert a.dtype == torch.int64 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, subset_keep_indices(3, 7, 11, 1, 64, 0.5))  # another rank
    assert not torch.equal(a, subset_keep_indices(3, 7, 12, 0, 64, 0.5))  # another step
    assert not torch.equal(a, subset_keep_indices(3, 8, 11, 0, 64, 0.5))  # another block

    def sequence(seed):
        model = timm.create_model('sd_resnet20', sd_granularity='subset', sd_seed=seed).train()
        seq = []
        with torch.no_grad():
            for _ in range(6):
                model(torch.randn(8, 3, 8, 8))
                seq.append(_keeps(model))
        return model, seq

    torch.manual_seed(1)
    model, first = sequence(3)
    torch.manual_seed(2)
    assert sequence(3)[1] == first
    assert sequence(4)[1] != first
    set_gate_seed(model, 3, step=0)
    again = []
    with torch.no_grad():
        for _ in range(6):
            model(torch.randn(8, 3, 8, 8))
            again.append(_keeps(model))
    assert again == first


def test_eval_equals_batch_mode_and_folds():
    model = timm.create_model('sd_resnet20', sd_granularity='subset').train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    batch_mode = timm.create_model('sd_resnet20', sd_granularity='batch').eval()
    batch_mode.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(batch_mode(x), ref)
        folded = fold_survival_scale(copy.deepcopy(model))
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_channels_last_rows_stay_channels_last_and_match_contiguous():
    model = timm.create_model('sd_resnet20', sd_granularity='subset', sd_seed=4).train()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    formats = []
    for b in stochastic_blocks(cl):
        b.conv1.register_forward_pre_hook(
            lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(8, 3, 16, 16)
    out = model(x)
    out_cl = cl(x.contiguous(memory_format=torch.channels_last))
    assert _keeps(model) == _keeps(cl) and any(0 < len(k) < 8 for k in _keeps(cl))
    assert formats and all(formats)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    # backward keeps the layout too: a contiguous gradient reaching a channels_last BN sends it down a slow
    # path (bf16 BN backward took 3x as long on the kept rows as on the full batch in constant depth)
    grad_formats = []
    for b in stochastic_blocks(cl):
        b.bn2.register_full_backward_pre_hook(
            lambda m, grads: grad_formats.append(grads[0].is_contiguous(memory_format=torch.channels_last)))
    w = torch.randn_like(out)
    xa, xb = x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last).requires_grad_()
    (model(xa) * w).sum().backward()
    (cl(xb) * w).sum().backward()
    assert grad_formats and all(grad_formats)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(cl.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = cl(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in cl.parameters())


def test_fx_and_torchscript():
    from timm.models import create_feature_extractor
    model = timm.create_model('sd_resnet20', sd_granularity='subset').train()
    fx = create_feature_extractor(model, return_nodes={'layer3': 'out'})
    x = torch.randn(4, 3, 16, 16)
    masks = []
    for _ in range(5):
        fx(x)['out'].sum().backward()
        masks.append(_keeps(fx))
    assert len({str(m) for m in masks}) > 1  # masks stay live in the traced model
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_add_stochastic_depth_subset_on_timm_resnet18():
    base = timm.create_model('resnet18', num_classes=10).eval()
    converted = add_stochastic_depth(base, drop_path_rate=0.5, sd_granularity='subset')
    assert list(converted.state_dict()) == list(base.state_dict())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted(x), base(x))  # eval unchanged (inverted scaling)
    converted.train()
    named = [(n, m) for n, m in converted.named_modules() if m in stochastic_blocks(converted)]
    calls = {n: (_batch_sizes_seen(m.conv1), _batch_sizes_seen(m.downsample[0]) if m.downsample else None)
             for n, m in named}
    seen_partial = seen_drop = False
    for _ in range(10):
        for c, d in calls.values():
            c.clear()
            d is not None and d.clear()
        converted.zero_grad()
        converted(torch.randn(3, 3, 64, 64)).logsumexp(1).mean().backward()
        for n, m in named:
            k = len(m.last_keep)
            branch, shortcut = calls[n]
            assert branch == ([k] if k else []), n
            if shortcut is not None:
                assert shortcut == [3]  # the projection shortcut runs on every sample
            seen_partial |= 0 < k < 3
            if k == 0:
                seen_drop = True
                assert all(torch.count_nonzero(p.grad) == 0 for p in m.branch_parameters())
        assert all(p.grad is not None for p in converted.parameters())
    assert seen_partial and seen_drop
    with pytest.raises(ValueError, match="granularity 'layer'"):
        add_stochastic_depth(base, sd_granularity='layer')


def test_constant_depth_subset_runs_every_sample():
    model = timm.create_model('sd_resnet20', drop_path_rate=0.0, sd_granularity='subset').train()
    ref = copy.deepcopy(model)
    ref_blocks = stochastic_blocks(ref)
    for b in ref_blocks:
        b.granularity = 'batch'
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert all(b.last_gate and b.last_keep is None for b in stochastic_blocks(model))


def test_autocast_adds_in_the_wider_type():
    """An fp32 shortcut plus a bf16 branch gives fp32, as ``shortcut + out`` does in batch mode."""
    block = CifarBasicBlock(4, 4, survival_prob=0.5, granularity='subset', seed=1).train()
    x = torch.rand(8, 4, 8, 8)
    for _ in range(10):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = block(x)
        keep = block.last_keep
        if 0 < len(keep) < 8:
            break
    else:
        pytest.fail('no proper subset drawn in 10 steps')
    assert out.dtype == torch.float32
    dropped = torch.ones(8, dtype=torch.bool)
    dropped[keep] = False
    assert torch.equal(out[dropped], x[dropped])  # the shortcut rows untouched, not rounded to bf16
    assert not torch.equal(out[keep], x[keep])


@pytest.mark.parametrize('channels_last', [False, True])
def test_row_gather_and_scatter_gradients(channels_last):
    """The subset block's autograd functions against numerical gradients, in both layouts."""
    from sd_zoo.stochastic_depth import _AddRows, _GatherRows, _SplitRows
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, 3, 4, 4, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_()
    rows_in = torch.randn(3, 3, 4, 4, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_()
    index = torch.tensor([0, 2, 5])

    def split_add(x, rows_in):  # identity shortcut: x's copy plus 0.5 * rows_in * (kept rows of x) at index
        base, rows = _SplitRows.apply(x, index)
        return _AddRows.apply(base, rows * rows_in, index, 0.5, True)

    def gather_add(x, rows_in):  # another shortcut (here 2x): a new tensor
        return _AddRows.apply(2 * x, _GatherRows.apply(x, index) * rows_in, index, 0.5, False)

    for fn in (split_add, gather_add):
        assert torch.autograd.gradcheck(fn, (x, rows_in))
        out = fn(x, rows_in)
        assert out.is_contiguous(memory_format=fmt)
        expected = (2 * x if fn is gather_add else x).detach().clone()
        expected[index] += 0.5 * x.detach()[index] * rows_in.detach()
        torch.testing.assert_close(out, expected)
