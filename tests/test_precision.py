"""bfloat16 training on CPU: --amp autocasts to bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX)
and trains in float32 elsewhere, saying which; the loops run in the dtype they are given."""
import json
import logging

import pytest
import timm
import torch
import torch.nn as nn
import yaml

import sd_zoo.engine as engine
from sd_zoo.cli import main
from sd_zoo.training import parse_train_args

from test_training import RECIPES, SMALL


def test_training_dtype_follows_the_device_and_the_cpu():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert engine.training_dtype(cpu, amp=False) == (None, 'precision: float32 (no --amp)')
    dtype, line = engine.training_dtype(cpu, amp=True, native_bf16=True)
    assert dtype == torch.bfloat16 and 'bfloat16 autocast' in line
    dtype, line = engine.training_dtype(cpu, amp=True, amp_dtype='float16', native_bf16=False)
    assert dtype is None and line.startswith('precision: float32') and 'no native bfloat16' in line
    assert engine.training_dtype(cuda, amp=True)[0] == torch.float16  # as timm: float16 unless asked
    assert engine.training_dtype(cuda, amp=True, amp_dtype='bfloat16')[0] == torch.bfloat16
    assert engine.autocast_dtype(cpu, amp=True, amp_dtype='float16') == torch.bfloat16  # CPU autocast: bf16 only


def test_the_training_loss_is_float32_under_cpu_autocast():
    """CPU autocast computes log_softmax in bfloat16: label smoothing and mixup's soft targets would be bf16."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    torch.manual_seed(0)
    logits, target = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
    soft = torch.softmax(torch.randn(8, 10), -1)
    for loss, y in ((LabelSmoothingCrossEntropy(0.1), target), (SoftTargetCrossEntropy(), soft)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16_logits = logits.to(torch.bfloat16)  # what the model's last layer gives under autocast
            if y is target:  # what the wrapper is for (soft targets: a bf16 log_softmax promoted afterwards)
                assert loss(bf16_logits, y).dtype == torch.bfloat16
            out = engine.Float32Loss(loss)(bf16_logits, y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, loss(bf16_logits.float(), y))
        out.backward()
        assert logits.grad is not None and logits.grad.dtype == torch.float32


class _Batches(list):
    """A loader: a list of (images, labels) batches."""


def _conv_dtypes(model: nn.Module):
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_loops_run_in_the_dtype_they_are_given(dtype):
    from timm.task import ClassificationTask
    model = timm.create_model('sd_resnet20', num_classes=10)
    seen = _conv_dtypes(model)
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), device=torch.device('cpu'))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = _Batches([(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)])
    stats = engine.train_one_epoch(task, batches, opt, epoch=0, device=torch.device('cpu'), num_updates=0,
                                   dtype=dtype, channels_last=True)
    assert stats['num_updates'] == 2 and seen == [dtype or torch.float32] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32
    seen.clear()
    metrics = engine.evaluate(model, batches, torch.device('cpu'), dtype=dtype)
    assert seen == [dtype or torch.float32] * 2 and 0 <= metrics['top1'] <= 100


@pytest.mark.slow
@pytest.mark.parametrize('native', [True, False])
def test_amp_run_says_its_precision(cifar10_dir, tmp_path, caplog, monkeypatch, native):
    if native and not engine.cpu_has_native_bf16():
        pytest.skip('this CPU has no native bfloat16 (AVX512-BF16 / AMX)')
    monkeypatch.setattr(engine, 'cpu_has_native_bf16', lambda: native)  # the other kind of CPU, where this is one
    caplog.set_level(logging.INFO, logger='sd_zoo')
    assert main(['train', '--data-dir', str(cifar10_dir), *SMALL, '--train-subset', '256', '--epochs', '1',
                 '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--device', 'cpu',
                 '--output', str(tmp_path), '--experiment', 'amp']) == 0
    results = json.loads((tmp_path / 'amp' / 'results.json').read_text())
    precision = [m for m in caplog.messages if m.startswith('precision:')]
    assert len(precision) == 1
    if native:
        assert results['autocast'] == 'bfloat16' and 'bfloat16 autocast' in precision[0]
    else:
        assert results['autocast'] is None and precision[0].startswith('precision: float32')


def test_cpu_cifar_recipes_train_in_bfloat16():
    for name in ('cifar10_resnet20_sd', 'cifar10_resnet56_sd', 'cifar10_resnet20_cpu_sd',
                 'cifar10_resnet20_cpu_constant'):
        cfg = yaml.safe_load((RECIPES / f'{name}.yaml').read_text())
        assert cfg['amp'] is True and cfg['amp_dtype'] == 'bfloat16' and cfg['channels_last'] is True, name
        assert parse_train_args(['--config', name]).amp is True
        assert parse_train_args(['--config', name, '--no-amp']).amp is False  # a recipe's amp can be undone
        assert parse_train_args(['--config', name, '--no-channels-last']).channels_last is False
