"""ImageNet-style SD ResNets: timm's keys and outputs, the paper's ResNet-152, and SD for any timm ResNet."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from sd_zoo import add_stochastic_depth, fold_survival_scale, plain_state_dict, stochastic_blocks

PAIRS = [('sd_resnet18', 'resnet18'), ('sd_resnet34', 'resnet34'), ('sd_resnet50', 'resnet50'),
         ('sd_resnet101', 'resnet101'), ('sd_resnet152', 'resnet152')]


@pytest.mark.parametrize('sd_name,timm_name', PAIRS)
def test_keys_match_timm_and_timm_weights_load(sd_name, timm_name):
    sd = timm.create_model(sd_name, device='meta')
    ref = timm.create_model(timm_name, device='meta')
    sd_keys = set(sd.state_dict())
    assert {k for k in sd_keys if not k.endswith('.eval_scale')} == set(ref.state_dict())
    assert len(sd_keys) - len(ref.state_dict()) == len(stochastic_blocks(sd))
    assert sum(p.numel() for p in sd.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize('scaling', ['inverted', 'paper'])
def test_timm_weights_give_timm_outputs(scaling):
    torch.manual_seed(0)
    ref = timm.create_model('resnet50').train()
    with torch.no_grad():
        ref(torch.randn(4, 3, 64, 64))  # non-trivial BN statistics
    ref.eval()
    sd = timm.create_model('sd_resnet50', sd_scaling=scaling)
    sd.load_state_dict(ref.state_dict())  # strict: a plain ResNet's state_dict evaluates unscaled
    sd.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(sd(x), ref(x))


def test_paper_scaled_model_folds_into_timm_resnet():
    sd = timm.create_model('sd_resnet18').train()
    with torch.no_grad():
        sd(torch.randn(4, 3, 64, 64))
    sd.eval()
    plain = timm.create_model('resnet18').eval()
    plain.load_state_dict(plain_state_dict(sd))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), sd(x), rtol=1e-5, atol=1e-5)


def test_resnet152_is_the_papers_imagenet_model():
    model = timm.create_model('sd_resnet152', device='meta')
    blocks = stochastic_blocks(model)
    assert len(blocks) == 50 and model.pretrained_cfg['input_size'] == (3, 224, 224)
    assert [b.survival_prob for b in blocks][-1] == pytest.approx(0.5)
    assert sum(b.survival_prob for b in blocks) == pytest.approx(50 - 0.5 * 51 / 2)
    projections = [n for n, b in model.named_modules() if b in blocks and b.downsample is not None]
    assert projections == ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    assert isinstance(model.layer2[0].downsample[0], nn.Conv2d)


def _calls(model):
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.register_forward_hook(lambda mod, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return calls


def _check_mechanism(model, steps=6):
    """Dropped branches are not computed and get zero grads; shortcuts still run; all params get grads."""
    calls = _calls(model)
    x = torch.randn(2, 3, 64, 64)
    named = [(n, m) for n, m in model.named_modules() if m in stochastic_blocks(model)]
    seen_drop = False
    for _ in range(steps):
        calls.clear()
        model.zero_grad()
        model(x).logsumexp(1).mean().backward()
        for name, block in named:
            for sub in ('conv1', 'bn1', 'conv2', 'bn2'):
                assert calls.get(f'{name}.{sub}', 0) == (1 if block.last_gate else 0), (name, sub)
            if block.downsample is not None:
                assert calls.get(f'{name}.downsample.0', 0) == 1  # the projection shortcut always runs
            if not block.last_gate:
                seen_drop = True
                for p in block.branch_parameters():
                    assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        assert all(p.grad is not None for p in model.parameters())
    assert seen_drop


def test_sd_resnet50_mechanism():
    _check_mechanism(timm.create_model('sd_resnet50', drop_path_rate=0.5).train())


def test_a_dropped_block_is_its_activation_of_the_shortcut():
    """A dropped block outputs act(shortcut + 0): ReLU of a post-ReLU input is the input itself (not
    recomputed), SiLU of it is not; under SiLU training still backpropagates (nothing overwritten in place)."""
    x = torch.randn(2, 64, 8, 8)
    relu_block = timm.create_model('sd_resnet18').layer1[1]
    assert relu_block.dropped_output(x) is x
    silu = timm.create_model('sd_resnet18', act_layer='silu', drop_path_rate=0.9)
    assert torch.equal(silu.layer1[1].dropped_output(x), torch.nn.functional.silu(x))
    _check_mechanism(silu.train())


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnext50_32x4d', 'seresnet50'])
def test_add_stochastic_depth_to_timm_models(name):
    torch.manual_seed(0)
    base = timm.create_model(name).eval()
    converted = add_stochastic_depth(base, drop_path_rate=0.5)
    assert converted is not base and not stochastic_blocks(base)
    assert list(converted.state_dict()) == list(base.state_dict())  # keys unchanged (inverted scaling)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), base(x))  # eval unchanged
    blocks = stochastic_blocks(converted)
    assert blocks[-1].survival_prob == pytest.approx(0.5)
    _check_mechanism(converted.train())
    # drop frequency follows the schedule
    drops = torch.zeros(len(blocks))
    with torch.no_grad():
        for _ in range(120):
            converted(torch.randn(2, 3, 32, 32))
            drops += torch.tensor([not b.last_gate for b in blocks], dtype=torch.float)
    expected = torch.tensor([1 - b.survival_prob for b in blocks]) * 120
    assert (drops - expected).abs().max() < 5 * (120 * 0.25) ** 0.5
    if name == 'seresnet50':
        fold_survival_scale(copy.deepcopy(converted))  # inverted scaling: every eval scale 1, nothing to fold
        paper = add_stochastic_depth(base, drop_path_rate=0.5, sd_scaling='paper')
        paper.train()(x)  # its first training step (grad enabled) takes p_l as the eval scale
        with pytest.raises(ValueError, match='attention'):
            fold_survival_scale(paper)


def test_add_stochastic_depth_in_place_and_errors():
    model = timm.create_model('resnet18')
    reference = copy.deepcopy(model).eval()
    assert add_stochastic_depth(model, inplace=True, sd_scaling='paper') is model
    assert any(k.endswith('eval_scale') for k in model.state_dict())  # paper scaling saves its eval scales
    # weights trained without stochastic depth evaluate as they are until the converted model trains
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))
    model.train()(x)  # a training step (grad enabled) takes the block's own p_l
    blocks = stochastic_blocks(model)
    assert [float(b.eval_scale) for b in blocks] == pytest.approx([b.survival_prob for b in blocks])
    assert blocks[-1].survival_prob == pytest.approx(0.5)
    with pytest.raises(ValueError, match='no timm BasicBlock'):
        add_stochastic_depth(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with_drop_path = timm.create_model('resnet18', drop_path_rate=0.1)  # timm gives its first block none
    with pytest.raises(ValueError, match='DropPath'):
        add_stochastic_depth(with_drop_path, inplace=True)
    assert not stochastic_blocks(with_drop_path)  # refused before any block was converted
    with pytest.raises(ValueError, match='p_L'):
        add_stochastic_depth(timm.create_model('resnet18'), drop_path_rate=1.0)
