"""What a timm user expects of any timm model, on the sd models."""
import os

import pytest
import timm
import timm.data
import torch

import sd_zoo
from sd_zoo import stochastic_blocks

CIFAR_MODELS = ['sd_resnet20', 'sd_resnet32', 'sd_resnet44', 'sd_resnet56', 'sd_resnet110', 'sd_resnet1202',
                'sd_resnet152_cifar']
PARAMS_M = [0.27, 0.46, 0.66, 0.85, 1.73, 19.4, 2.41]


def test_registry_and_parameter_counts():
    assert set(CIFAR_MODELS) <= set(timm.list_models('sd_*'))
    for name, params_m in zip(CIFAR_MODELS, PARAMS_M):
        model = timm.create_model(name, device='meta')
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        assert round(millions, 1 if millions > 10 else 2) == params_m, (name, millions)  # as the paper rounds


def test_no_config_points_at_missing_weights():
    assert timm.list_pretrained('sd_*') == sorted(sd_zoo.SHIPPED_WEIGHTS)  # tests/test_pretrained.py loads them
    for name in timm.list_models('sd_*', include_tags=True):
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url, name
        if name in sd_zoo.SHIPPED_WEIGHTS:
            assert cfg.hf_hub_id == f'sd-zoo/{name}' and os.path.isfile(cfg.file), name
        else:
            assert not cfg.hf_hub_id and not cfg.file, name
        assert cfg.paper_ids == 'arXiv:1603.09382' and cfg.license == 'apache-2.0'
        if name.split('.')[0] in CIFAR_MODELS:
            assert cfg.input_size == (3, 32, 32) and cfg.crop_pct == 1.0
        else:
            assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.tag == 'in1k'


@pytest.mark.parametrize('tag,num_classes,mean0', [('cifar10', 10, 0.4914), ('cifar100', 100, 0.5071),
                                                   ('svhn', 10, 0.4377)])
def test_dataset_tags(tag, num_classes, mean0):
    model = timm.create_model(f'sd_resnet20.{tag}')
    assert model.num_classes == num_classes
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg['input_size'] == (3, 32, 32) and cfg['mean'][0] == mean0 and cfg['crop_pct'] == 1.0
    assert timm.create_model('sd_resnet152_cifar').pretrained_cfg['tag'] == 'svhn'


def test_head_and_classifier_api():
    model = timm.create_model('sd_resnet20', drop_rate=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8) and model.num_features == model.head_hidden_size == 64
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0, '')
    assert model(x).shape == (2, 64, 8, 8)


def test_features_only_and_intermediates():
    model = timm.create_model('sd_resnet20', features_only=True).train()
    assert model.feature_info.channels() == [16, 16, 32, 64]
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    outs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    # the model's input check holds under the feature wrapper too (a 30x30 image is not a multiple of 4)
    with pytest.raises(ValueError, match='30x30 pixels'):
        model(torch.randn(2, 3, 30, 30))
    # gates are drawn inside the blocks, so they stay live under timm's feature wrapper
    base = timm.create_model('sd_resnet20')
    final, inter = base.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[1, 3])
    assert len(inter) == 2 and final.shape == (1, 64, 8, 8)


def test_layer_decay_groups():
    model = timm.create_model('sd_resnet20')
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.7)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) >= 10  # stem, 9 blocks, head
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_device_dtype_kwargs_and_unknown_kwargs():
    model = timm.create_model('sd_resnet20', device='meta', dtype=torch.bfloat16)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(TypeError):
        timm.create_model('sd_resnet20', not_an_arg=1)


@pytest.mark.parametrize('kwargs,match', [
    (dict(drop_path_rate=1.0), r'p_L'),
    (dict(drop_path_rate=-0.5), r'p_L'),
    (dict(sd_rule='exp'), r"rule 'exp'"),
    (dict(sd_granularity='layer'), r"granularity 'layer'"),
    (dict(sd_scaling='none'), r"scaling 'none'"),
    (dict(depth=21), r'sd_resnet20 has depth 20, not 21'),
    (dict(depth=56), r'sd_resnet20 has depth 20, not 56'),  # the name fixes the depth
    (dict(shortcut_type='conv'), r"shortcut_type 'conv'"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('sd_resnet20', **kwargs)


def test_depth_must_be_6n_plus_2():
    from sd_zoo.models.sd_resnet_cifar import SDCifarResNet
    with pytest.raises(ValueError, match=r'6n \+ 2'):
        SDCifarResNet(depth=21)


def test_wrong_input_channels_is_a_value_error():
    model = timm.create_model('sd_resnet20').eval()
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\).*\[2, 1, 32, 32\]'):
        model(torch.randn(2, 1, 32, 32))
    gray = timm.create_model('sd_resnet20', in_chans=1).eval()
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_subsample_shortcut_option():
    avg = timm.create_model('sd_resnet20', shortcut_type='avg').eval()
    sub = timm.create_model('sd_resnet20', shortcut_type='subsample').eval()
    sub.load_state_dict(avg.state_dict())
    x = torch.rand(1, 16, 8, 8)
    t_avg, t_sub = avg.layer2[0].shortcut(x), sub.layer2[0].shortcut(x)
    assert t_avg.shape == t_sub.shape == (1, 32, 4, 4)
    torch.testing.assert_close(t_avg[:, :16], torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(t_sub[:, :16], x[:, :, ::2, ::2])
    assert t_avg[:, 16:].abs().sum() == 0 and t_sub[:, 16:].abs().sum() == 0
    assert not any(p for n, p in avg.named_parameters() if 'shortcut' in n)


def test_torchscript_eval_matches_eager():
    model = timm.create_model('sd_resnet20').eval()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_feature_extraction_keeps_live_gates():
    from timm.models import create_feature_extractor
    model = timm.create_model('sd_resnet20').train()
    fx = create_feature_extractor(model, return_nodes={'layer3': 'out'})
    x = torch.randn(2, 3, 32, 32)
    patterns = set()
    for _ in range(15):
        fx(x)['out'].sum().backward()
        patterns.add(tuple(b.last_gate for b in stochastic_blocks(fx)))
    assert len(patterns) > 1


def test_channels_last_and_bf16_autocast_training():
    model = timm.create_model('sd_resnet20').to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(model(x).float()).all()


def test_hubconf_exposes_registered_models():
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(repo), 'sd_resnet110', source='local', num_classes=100, drop_path_rate=0.2)
    assert model.num_classes == 100
    assert min(b.survival_prob for b in stochastic_blocks(model)) == pytest.approx(0.8)
    import hubconf
    assert 'stochastic depth' in hubconf.sd_resnet110.__doc__
    assert set(timm.list_models('sd_*')) <= {n for n in dir(hubconf) if not n.startswith('_')}
