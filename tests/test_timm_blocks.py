"""Compute-skipping stochastic depth for timm's ViTs and ConvNeXts: timm's eval outputs and keys, the masked
reference in training, timm's rates, zero gradients for dropped branches, the same gates under checkpointing."""
import copy

import pytest
import timm
import torch

from conftest import check_checkpointing_recomputes_the_same_gates
from sd_zoo import add_stochastic_depth
from sd_zoo.models.sd_timm_blocks import StochasticBranch, branch_rates

MODELS = {
    'vit': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, init_values=1e-2)),
    'vit_respost': ('vit_small_patch16_224', dict(img_size=32, patch_size=8, depth=3)),
    'convnext': ('convnext_atto', dict()),
}


def _model(kind, drop_path_rate=0.4):
    from timm.models.vision_transformer import ResPostBlock
    name, kwargs = MODELS[kind]
    extra = dict(block_fn=ResPostBlock) if kind == 'vit_respost' else {}
    return timm.create_model(name, num_classes=10, drop_path_rate=drop_path_rate, **kwargs, **extra)


def _gates(model):
    return [m for m in model.modules() if isinstance(m, StochasticBranch)]


@pytest.mark.parametrize('kind', sorted(MODELS))
@pytest.mark.parametrize('granularity', ['batch', 'subset'])
def test_eval_outputs_keys_and_rates_are_timms(kind, granularity):
    model = _model(kind).eval()
    converted = add_stochastic_depth(model, sd_granularity=granularity).eval()
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    # weights of the unconverted model (pretrained-style) load unchanged, strictly, and evaluate as timm's
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    converted.load_state_dict(weights)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    # timm's per-block rates: those of the DropPath each gate replaced, in forward order
    slots = [getattr(b, s) for b in model.modules() for s in ('drop_path1', 'drop_path2', 'drop_path')
             if type(b).__name__ in ('Block', 'ResPostBlock', 'ConvNeXtBlock') and hasattr(b, s)]
    assert branch_rates(converted) == pytest.approx([1.0 - getattr(m, 'drop_prob', 0.0) for m in slots])


def _masked_reference_vit(block, x, keeps, probs):
    """The unconverted block's math with the gates' masks: x + mask * branch(x) / p, per branch."""
    n = x.shape[0]
    masks = [torch.zeros(n, 1, 1).index_fill_(0, k, 1.0) if k is not None else torch.ones(n, 1, 1) for k in keeps]
    y = x + masks[0] * block.ls1(block.attn(block.norm1(x))) / probs[0]
    return y + masks[1] * block.ls2(block.mlp(block.norm2(y))) / probs[1]


@pytest.mark.parametrize('granularity', ['subset', 'fixed_subset'])
def test_subset_keeps_the_masked_reference_and_its_gradients(granularity):
    torch.manual_seed(0)
    model = _model('vit', drop_path_rate=0.6)
    ref_block = copy.deepcopy(model.blocks[-1]).train()
    converted = add_stochastic_depth(model, sd_granularity=granularity, sd_seed=3)
    block = converted.blocks[-1].train()
    seen_partial = False
    for _ in range(6):
        x = torch.randn(8, 17, 192, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out = block(x)
        keeps = [g.last_keep for g in (block.drop_path1, block.drop_path2)]
        seen_partial |= any(k is not None and 0 < len(k) < 8 for k in keeps)
        probs = [len(k) / 8 if granularity == 'fixed_subset' else g.survival_prob  # fixed: scaled by n / k
                 for k, g in zip(keeps, (block.drop_path1, block.drop_path2))]
        if granularity == 'fixed_subset':
            assert [len(k) for k in keeps] == [int(8 * g.survival_prob) for g in (block.drop_path1, block.drop_path2)]
        ref = _masked_reference_vit(ref_block, x_ref, keeps, probs)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(block.named_parameters(), ref_block.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
        block.zero_grad()
        ref_block.zero_grad()
    assert seen_partial


@pytest.mark.parametrize('kind', ['vit', 'convnext'])
def test_batch_gates_follow_the_rates_skip_compute_and_give_zero_gradients(kind):
    model = add_stochastic_depth(_model(kind, drop_path_rate=0.5), sd_granularity='batch', sd_seed=1).train()
    gates = _gates(model)
    steps, kept = 300, torch.zeros(len(gates))
    calls = []
    victim = gates[-1]
    owner = victim.__dict__['_owner']
    handle = getattr(owner, 'mlp').register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    dropped_grads_checked = False
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(step < 20):
            out = model(x)
        kept += torch.tensor([float(g.last_gate) for g in gates])
        if step < 20:
            out.sum().backward()
            if not victim.last_gate:  # a dropped branch: its parameters get exactly zero, not None
                grads = [p.grad for p in victim.branch_parameters()]
                assert grads and all(g is not None and not g.any() for g in grads)
                dropped_grads_checked = True
    handle.remove()
    rates = torch.tensor(branch_rates(model))
    assert torch.allclose(kept / steps, rates, atol=0.1), (kept / steps, rates)
    assert len(calls) == int(kept[-1])  # the dropped MLP branch never ran
    assert dropped_grads_checked or kept[-1] == steps


@pytest.mark.parametrize('granularity', ['batch', 'subset'])
def test_grad_checkpointing_recomputes_with_the_same_gates(granularity):
    model = add_stochastic_depth(_model('vit', drop_path_rate=0.5), sd_granularity=granularity, sd_seed=5).train()
    seen = check_checkpointing_recomputes_the_same_gates(model, torch.randn(6, 3, 32, 32))
    # some branch dropped for the batch, or kept for some samples only: the gates were put to the test
    assert any(not gate or (keep is not None and 0 < len(keep) < 6) for step in seen for gate, keep in step)


def test_conversion_errors_name_the_problem():
    with pytest.raises(ValueError, match='no timm BasicBlock'):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="sd_scaling='inverted'"):
        add_stochastic_depth(_model('vit'), sd_scaling='paper')
    with pytest.raises(ValueError, match='computes every branch'):
        add_stochastic_depth(_model('vit'), sd_granularity='sample')
    with pytest.raises(ValueError, match='needs a drop_path_rate'):
        add_stochastic_depth(_model('vit'), sd_rule='uniform')
    model = _model('convnext', drop_path_rate=0.0)
    assert branch_rates(add_stochastic_depth(model, drop_path_rate=0.3)) [-1] == pytest.approx(0.7)
    assert branch_rates(add_stochastic_depth(model, drop_path_rate=0.3, sd_rule='uniform')) == \
        pytest.approx([0.7] * len(model.stages[0].blocks + model.stages[1].blocks + model.stages[2].blocks +
                                  model.stages[3].blocks))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('granularity', ['batch', 'subset'])
def test_compiled_branches_match_eager_with_a_bounded_number_of_graphs(granularity):
    import torch._dynamo
    from torch._dynamo.utils import counters
    from sd_zoo import compile_blocks
    torch._dynamo.reset()
    counters.clear()
    model = add_stochastic_depth(_model('vit', drop_path_rate=0.5), sd_granularity=granularity, sd_seed=2).train()
    compiled = compile_blocks(copy.deepcopy(model))
    x = torch.randn(8, 3, 32, 32)
    for _ in range(6):
        out = compiled(x)
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
        out.sum().backward()
    # two branch kinds (attention, MLP) of one shape: a static, a dynamic-batch and a batch-of-1 graph at most each
    assert 1 <= counters['stats']['unique_graphs'] <= 6


def test_an_attention_mask_reaches_the_attention_branch_and_is_not_kept():
    import weakref
    model = _model('vit', drop_path_rate=0.5)
    converted = add_stochastic_depth(copy.deepcopy(model), sd_granularity='batch', sd_seed=0).train()
    block, plain = converted.blocks[0], model.blocks[0].eval()
    for gate in _gates(block):
        gate.survival_prob = 1.0  # both branches kept: timm's forward, mask included
    x = torch.randn(2, 5, 192)
    mask = torch.full((5, 5), float('-inf')).triu(1)  # causal
    with torch.no_grad():
        out = block(x, attn_mask=mask)
        torch.testing.assert_close(out, plain(x, attn_mask=mask))
        assert not torch.allclose(out, plain(x))
    freed = weakref.ref(mask)
    del mask
    assert freed() is None  # the block keeps no reference to the step's mask
    subset = add_stochastic_depth(copy.deepcopy(model), sd_granularity='subset').train()
    with pytest.raises(ValueError, match="subset gates with an attention mask"):
        subset.blocks[0](x, attn_mask=torch.zeros(5, 5))


@pytest.mark.parametrize('kind', sorted(MODELS))
def test_torchscript_and_fx_at_eval_give_timms_outputs(kind):
    from timm.models import create_feature_extractor
    model = _model(kind).eval()
    converted = add_stochastic_depth(model, sd_granularity='subset').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scripted = torch.jit.script(converted)
        assert torch.equal(scripted(x), model(x))
        with pytest.raises(Exception, match='cannot train'):  # not timm's forward without gates: it refuses
            scripted.train()(x)
        node = 'head' if kind != 'convnext' else 'head.fc'
        traced = create_feature_extractor(converted, return_nodes=[node])
        assert torch.equal(traced(x)[node], model(x))


@pytest.mark.parametrize('base', ['vit_tiny_patch16_224', 'convnext_atto'])
def test_named_models_are_timms_converted(base):
    """NAME_sd (timm's train.py: --model NAME_sd --device-modules sd_zoo) is timm's NAME with its own rates, keys
    and eval outputs, its gates skipping compute."""
    kwargs = dict(drop_path_rate=0.3, num_classes=10, **(dict(img_size=32, patch_size=8) if 'vit' in base else {}))
    model = timm.create_model(base, **kwargs).eval()
    named = timm.create_model(f'{base}_sd', sd_granularity='subset', **kwargs).eval()
    assert named.pretrained_cfg['architecture'] == f'{base}_sd' and not named.pretrained_cfg.get('hf_hub_id')
    named.load_state_dict(model.state_dict())
    assert list(named.state_dict()) == list(model.state_dict())
    assert branch_rates(named) == branch_rates(add_stochastic_depth(model))
    assert {g.granularity for g in _gates(named)} == {'subset'}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(named(x), model(x))


def test_sd_zoo_train_validates_a_named_vit(tiny_folder, tmp_path):
    """sd-zoo train --model vit_tiny_patch16_224_sd, and validate --checkpoint rebuilds it as it trained."""
    from sd_zoo.cli import main
    from sd_zoo.evaluation import validate
    assert main(['train', '--data-dir', str(tiny_folder), '--model', 'vit_tiny_patch16_224_sd', '--model-kwargs',
                 'img_size=32', 'patch_size=8', 'sd_granularity=subset', '--drop-path', '0.3', '--img-size', '32',
                 '--epochs', '1', '-b', '8', '-j', '0', '--no-progress', '--train-split', 'train', '--val-split',
                 'test', '--opt', 'adamw', '--lr', '1e-3', '--output', str(tmp_path), '--experiment', 'vit']) == 0
    result = validate('vit_tiny_patch16_224_sd', checkpoint=str(tmp_path / 'vit' / 'last.pth.tar'),
                      data_dir=str(tiny_folder), split='test', workers=0, device='cpu', quiet=True)
    assert result['images'] == 20 and 0.0 <= result['top1'] <= 100.0
    # publish stages sd-zoo ResNets only: a one-line refusal before anything is written
    from sd_zoo.publishing import publish
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224_sd is not an sd-zoo ResNet.*push_to_hf_hub"):
        publish(str(tmp_path / 'vit'), repo_id='someone/vit', dry_run=True, out=str(tmp_path / 'staged'))
    assert not (tmp_path / 'staged').exists()


def test_named_model_takes_timm_train_py_pretrained_path(tmp_path):
    """timm's train.py --pretrained-path sends pretrained_cfg_overlay=dict(file=...): NAME_sd loads that file (not
    NAME's Hub weights; the head is timm's to adapt, 10 classes against the config's 1000) and keeps no weight
    source in its own config."""
    from safetensors.torch import save_file
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    source = timm.create_model('vit_tiny_patch16_224', **kwargs)
    save_file(source.state_dict(), str(tmp_path / 'mine.safetensors'))
    named = timm.create_model('vit_tiny_patch16_224_sd', pretrained=True, drop_path_rate=0.2, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'mine.safetensors'), mean=(0.5,) * 3))
    for key, value in source.state_dict().items():  # the head too, where the class counts match
        assert torch.equal(named.state_dict()[key], value) or key.startswith('head.'), key
    cfg = named.pretrained_cfg
    assert cfg['architecture'] == 'vit_tiny_patch16_224_sd' and 'file' not in cfg and cfg['mean'] == (0.5,) * 3


def test_bad_rule_or_rate_for_a_vit_is_a_one_line_error():
    model = _model('vit', drop_path_rate=0.1)
    with pytest.raises(ValueError, match="rule"):
        add_stochastic_depth(model, sd_rule='Uniform')
    with pytest.raises(ValueError, match=r"drop_path_rate \(1 - p_L\) must be a number"):
        add_stochastic_depth(model, drop_path_rate='0.1')


def test_droppath_left_outside_converted_blocks_is_reported(caplog):
    """CrossViT's cross-attention blocks are not ViT Blocks: their DropPath stays, and the conversion says so."""
    model = timm.create_model('crossvit_tiny_240', drop_path_rate=0.1, img_size=[48, 56], num_classes=10)
    with caplog.at_level('WARNING', logger='sd_zoo.models.sd_timm_blocks'):
        add_stochastic_depth(model, sd_granularity='subset')
    assert any('DropPath module(s) outside the converted blocks' in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level('WARNING', logger='sd_zoo.models.sd_timm_blocks'):
        add_stochastic_depth(_model('vit', drop_path_rate=0.1))
    assert not [r for r in caplog.records if r.name == 'sd_zoo.models.sd_timm_blocks']


def test_single_kept_sample_at_1x1_runs_a_layernorm_branch():
    """The 1x1 single-sample drop is BatchNorm's limit: a ConvNeXt branch (LayerNorm) at 1x1 runs its one sample,
    while a ResNet block at 1x1 counts as dropped."""
    model = add_stochastic_depth(_model('convnext', drop_path_rate=0.5), sd_granularity='fixed_subset').train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # 32 px: the last stage is 1x1; k = int(2 p) = 1 there
    last = [g for g in model.stages[3].modules() if isinstance(g, StochasticBranch)]
    assert last and all(g.last_gate and g.last_keep.numel() == 1 for g in last)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stages[3].blocks[-1].mlp.parameters())
    resnet = timm.create_model('sd_resnet20', drop_path_rate=0.5, sd_granularity='fixed_subset').train()
    resnet(torch.randn(2, 3, 4, 4))  # 4 px: the last stage is 1x1
    single = [b for b in resnet.layer3 if int(2 * b.survival_prob) == 1]
    assert single and all(not b.last_gate and b.last_keep.numel() == 0 for b in single)


def test_plain_state_dict_of_a_converted_vit_is_its_own():
    """Converted branches scale in training (inverted), so there is nothing to fold: timm's keys and tensors."""
    from sd_zoo import plain_state_dict
    model = add_stochastic_depth(_model('vit', drop_path_rate=0.2), sd_granularity='subset')
    plain = plain_state_dict(model)
    assert list(plain) == list(model.state_dict())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_named_model_loads_its_own_folder_and_takes_a_tag(tmp_path, monkeypatch):
    """local-dir: of a saved NAME_sd loads that folder's weights (not NAME's Hub weights: offline here, where a
    download fails), converted; NAME_sd.TAG is NAME.TAG's config."""
    from safetensors.torch import load_file
    from timm.models import save_for_hf
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    save_for_hf(timm.create_model('vit_tiny_patch16_224_sd', **kwargs), str(tmp_path), safe_serialization=True,
                model_args=kwargs)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    saved = load_file(str(tmp_path / 'model.safetensors'))
    assert set(loaded.state_dict()) == set(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert any(isinstance(m, StochasticBranch) for m in loaded.modules())
    tagged = timm.create_model('vit_tiny_patch16_224_sd.augreg_in21k', img_size=32, patch_size=8, depth=2)
    assert tagged.num_classes == 21843 and tagged.pretrained_cfg['architecture'] == 'vit_tiny_patch16_224_sd'
