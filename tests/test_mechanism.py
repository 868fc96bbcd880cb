"""The paper's mechanism, checked on the real models."""
import copy
import math

import pytest
import timm

from conftest import check_checkpointing_recomputes_the_same_gates
import torch
import torch.nn as nn

import sd_zoo
from sd_zoo import fold_survival_scale, set_gate_seed, stochastic_blocks, survival_schedule
from sd_zoo.models.sd_resnet_cifar import CifarBasicBlock


def _gates(model):
    return [b.last_gate for b in stochastic_blocks(model)]


def test_block_drop_frequency_matches_schedule():
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5).train()
    blocks = stochastic_blocks(model)
    steps = 800
    drops = torch.zeros(len(blocks))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            drops += torch.tensor([not g for g in _gates(model)], dtype=torch.float)
    for l, (block, dropped) in enumerate(zip(blocks, drops), start=1):
        p = 1 - l / len(blocks) * 0.5
        assert block.survival_prob == pytest.approx(p)
        sigma = math.sqrt(steps * p * (1 - p))
        assert abs(dropped.item() - steps * (1 - p)) < 4.5 * sigma, f'block {l}: {dropped} drops, p_l={p}'


def test_dropped_branches_are_not_computed():
    model = timm.create_model('sd_resnet32').train()
    calls = {}

    def counter(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.register_forward_hook(counter(name))
    x = torch.randn(4, 3, 16, 16)
    seen_drop = False
    for _ in range(5):
        calls.clear()
        model(x).sum().backward()
        for bi, (name, block) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, CifarBasicBlock)):
            expected = 1 if block.last_gate else 0
            for sub in ('conv1', 'bn1', 'conv2', 'bn2'):
                assert calls.get(f'{name}.{sub}', 0) == expected, (name, sub, block.last_gate)
            seen_drop |= not block.last_gate
        assert calls['conv1'] == 1 and calls['bn1'] == 1  # the stem always runs
    assert seen_drop


def test_dropped_blocks_get_zero_grads_and_keep_bn_stats():
    model = timm.create_model('sd_resnet56', drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    model(x).logsumexp(1).mean().backward()
    blocks = dict((n, m) for n, m in model.named_modules() if isinstance(m, CifarBasicBlock))
    dropped = [n for n, b in blocks.items() if not b.last_gate]
    kept = [n for n, b in blocks.items() if b.last_gate]
    assert dropped and kept
    for n in dropped:
        for pn, p in blocks[n].named_parameters():
            assert p.grad is not None, f'{n}.{pn} has no gradient'
            assert torch.count_nonzero(p.grad) == 0, f'{n}.{pn} has a non-zero gradient'
        for bn in ('bn1', 'bn2'):
            for buf in ('running_mean', 'running_var', 'num_batches_tracked'):
                assert torch.equal(getattr(getattr(blocks[n], bn), buf), before[f'{n}.{bn}.{buf}'])
    for n in kept:
        assert any(torch.count_nonzero(p.grad) > 0 for p in blocks[n].parameters())
        assert not torch.equal(blocks[n].bn1.running_mean, before[f'{n}.bn1.running_mean'])
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('granularity', ['batch', 'sample', 'subset'])
@pytest.mark.parametrize('scaling', ['paper', 'inverted'])
@pytest.mark.parametrize('stride', [1, 2])
def test_eval_output_is_the_expectation_of_training_output(granularity, scaling, stride):
    """E[shortcut + gate * branch (/ p)] in training equals the eval output (pre-activation)."""
    p = 0.7
    block = CifarBasicBlock(4, 4 * stride, stride=stride, survival_prob=p, granularity=granularity, scaling=scaling)
    block.act2 = nn.Identity()  # the expectation commutes with the sum, not with the final ReLU
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 4, 8, 8)
    block.eval()
    with torch.no_grad():
        expected = block(x)
        block.train()
        for m in block.modules():  # BN in eval so that only the gate is random
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        n = 4000
        mean = sum(block(x) for _ in range(n)) / n
        keep = block.shortcut(x) + block.branch(x) * (1.0 if scaling == 'paper' else 1 / p)
        drop = block.shortcut(x)
    assert torch.allclose(p * keep + (1 - p) * drop, expected, atol=1e-5)
    # Monte-Carlo mean within 5 standard errors of the expectation
    stderr = (keep - drop).abs() * math.sqrt(p * (1 - p) / n)  # the same per element for every granularity
    assert ((mean - expected).abs() <= 5 * stderr + 1e-5).all()


def test_state_dict_is_self_describing():
    torch.manual_seed(1)
    trained = timm.create_model('sd_resnet20', drop_path_rate=0.5, sd_scaling='paper').train()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        for _ in range(3):
            trained(x)  # move BN statistics away from their init
    trained.eval()
    for kwargs in [dict(drop_path_rate=0.2, sd_scaling='inverted'), dict(drop_path_rate=0.0), dict(sd_rule='uniform')]:
        other = timm.create_model('sd_resnet20', **kwargs)
        other.load_state_dict(trained.state_dict())
        other.eval()
        with torch.no_grad():
            assert torch.equal(other(x), trained(x)), kwargs


def test_folding_gives_a_plain_resnet_with_identical_outputs():
    model = timm.create_model('sd_resnet44', drop_path_rate=0.5).train()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        model(x)
    model.eval()
    folded = fold_survival_scale(copy.deepcopy(model))
    assert all(b.eval_scale.item() == 1.0 for b in stochastic_blocks(folded))
    plain = timm.create_model('sd_resnet44', drop_path_rate=0.0, sd_scaling='inverted').eval()
    plain.load_state_dict(folded.state_dict())
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)


def test_plain_resnet_state_dict_without_eval_scale_loads_as_unscaled():
    src = timm.create_model('sd_resnet20', drop_path_rate=0.0).eval()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith('eval_scale')}
    dst = timm.create_model('sd_resnet20', drop_path_rate=0.5).eval()
    dst.load_state_dict(sd)
    assert all(b.eval_scale.item() == 1.0 for b in stochastic_blocks(dst))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_loaded_eval_scales_hold_until_the_block_trains_with_its_own_schedule():
    """Loaded weights evaluate with the scales they were trained with; fine-tuning them at another rate (or
    SD fine-tuning of constant-depth weights) evaluates with the new schedule's p_l, as the paper's rule says."""
    trained = timm.create_model('sd_resnet20', drop_path_rate=0.1)
    for source, loaded in ((trained.state_dict(), [b.survival_prob for b in stochastic_blocks(trained)]),
                           ({k: v for k, v in trained.state_dict().items() if not k.endswith('eval_scale')},
                            [1.0] * 9)):
        tuned = timm.create_model('sd_resnet20', drop_path_rate=0.5)
        tuned.load_state_dict(source)
        assert [b.eval_scale.item() for b in stochastic_blocks(tuned)] == pytest.approx(loaded)
        with torch.no_grad():  # a training-mode pass that trains nothing (BN recalibration) keeps them
            tuned.train()(torch.randn(2, 3, 8, 8))
        assert [b.eval_scale.item() for b in stochastic_blocks(tuned)] == pytest.approx(loaded)
        tuned.train()(torch.randn(2, 3, 8, 8))
        own = survival_schedule(9, 0.5)
        assert [b.eval_scale.item() for b in stochastic_blocks(tuned)] == pytest.approx(own)
        assert own != pytest.approx(loaded)
    # folded weights keep their scale in the BN: training a folded model does not scale them twice
    loaded = timm.create_model('sd_resnet20', drop_path_rate=0.5)
    loaded.load_state_dict(trained.state_dict())
    folded = fold_survival_scale(loaded)
    folded.train()(torch.randn(2, 3, 8, 8))
    assert all(b.eval_scale.item() == 1.0 for b in stochastic_blocks(folded))


def test_partial_and_converted_loads_keep_the_eval_scales():
    """A head-only partial load leaves the blocks' scales alone; a converted timm model (inverted scaling:
    eval_scale not in its state_dict, so its keys stay timm's) loads its own state_dict strictly."""
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5)
    before = [b.eval_scale.item() for b in stochastic_blocks(model)]
    model.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith('fc.')}, strict=False)
    assert [b.eval_scale.item() for b in stochastic_blocks(model)] == before and before[-1] == 0.5
    converted = sd_zoo.add_stochastic_depth(timm.create_model('resnet18'), drop_path_rate=0.2)
    assert not any(k.endswith('eval_scale') for k in converted.state_dict())
    converted.load_state_dict(converted.state_dict())  # strict


def test_training_setups_that_would_silently_break_the_gates_are_errors():
    x = torch.randn(2, 3, 8, 8)
    # nn.DataParallel trains throwaway replicas (replicate() marks them): the gate counter would never advance
    replica = timm.create_model('sd_resnet20').train()
    for block in stochastic_blocks(replica):
        block._is_replica = True
    with pytest.raises(ValueError, match='cannot train under nn.DataParallel'):
        replica(x)
    # subset gates skip a block's branch on some ranks only: SyncBatchNorm's collective would hang
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model('sd_resnet20', sd_granularity='subset'))
    with pytest.raises(ValueError, match="'subset' gates cannot train with SyncBatchNorm"):
        synced.train()(x)
    # ... also when converted after a first training step (nothing remembers the plain BatchNorm)
    trained = timm.create_model('sd_resnet20', sd_granularity='subset').train()
    trained(x)
    with pytest.raises(ValueError, match="'subset' gates cannot train with SyncBatchNorm"):
        nn.SyncBatchNorm.convert_sync_batchnorm(trained)(x)
    # a scripted model has no Python gates: in training mode it refuses instead of running the eval formula
    scripted = torch.jit.script(timm.create_model('sd_resnet20').eval())
    scripted(x)
    with pytest.raises(Exception, match='cannot train'):
        scripted.train()(x)


def _gate_sequence(seed, steps=30):
    model = timm.create_model('sd_resnet20', sd_seed=seed).train()
    x = torch.randn(2, 3, 8, 8)
    seq = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            seq.append(_gates(model))
    return seq


def test_same_seed_same_gates_independent_of_global_rng():
    torch.manual_seed(1)
    a = _gate_sequence(seed=3)
    torch.manual_seed(2)  # timm's train.py seeds every rank differently: gates must not care
    b = _gate_sequence(seed=3)
    c = _gate_sequence(seed=4)
    assert a == b
    assert a != c
    assert len(set(map(tuple, a))) > 10  # gates change from step to step


def test_set_gate_seed_restarts_the_sequence():
    model = timm.create_model('sd_resnet20', sd_seed=5).train()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = []
        for _ in range(10):
            model(x)
            first.append(_gates(model))
        set_gate_seed(model, 5, step=0)
        again = []
        for _ in range(10):
            model(x)
            again.append(_gates(model))
    assert first == again


@pytest.mark.parametrize('granularity', ['batch', 'subset'])
def test_grad_checkpointing_recomputes_with_the_same_gates(granularity):
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet32', sd_granularity=granularity, sd_seed=11).train()
    seen = check_checkpointing_recomputes_the_same_gates(model, torch.randn(6, 3, 16, 16))
    if granularity == 'subset':  # some block kept some samples only, so the masks were put to the test
        assert any(keep is not None and 0 < len(keep) < 6 for step in seen for _, keep in step)


def test_constant_depth_when_drop_path_rate_is_zero():
    model = timm.create_model('sd_resnet20', drop_path_rate=0.0).train()
    assert all(b.survival_prob == 1.0 and b.eval_scale.item() == 1.0 for b in stochastic_blocks(model))
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(2, 3, 8, 8))
            assert all(_gates(model))


def test_default_is_the_papers_linear_schedule():
    model = timm.create_model('sd_resnet110')
    probs = [b.survival_prob for b in stochastic_blocks(model)]
    assert len(probs) == 54
    assert sum(probs) == pytest.approx(40.25)
    assert [b.eval_scale.item() for b in stochastic_blocks(model)] == pytest.approx(probs)
    inverted = timm.create_model('sd_resnet110', sd_scaling='inverted')
    assert all(b.eval_scale.item() == 1.0 for b in stochastic_blocks(inverted))
