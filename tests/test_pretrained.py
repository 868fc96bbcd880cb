"""The weights that ship inside the package: listed by timm, loaded offline three ways, accurate."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import sd_zoo
from sd_zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Top-1 of the shipped weights on a fixed 2000-image subset of the shared CIFAR-10 test split
# (`sd-zoo validate --model <name> --pretrained --split test --subset 2000 --seed 0`), as in README.md.
# The test allows 0.5 points for JPEG decoding differences between Pillow builds.
STATED_SUBSET_TOP1 = {'sd_resnet20.cifar10': 89.15, 'sd_resnet56.cifar10': 91.15}

OFFLINE_SCRIPT = '''
import json, sys, torch, timm, sd_zoo
name, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
models = {
    'timm': timm.create_model(name, pretrained=True),
    'timm_default_tag': timm.create_model(name.split('.')[0], pretrained=True),
    'local_dir': timm.create_model('local-dir:' + str(sd_zoo.shipped_weights_dir(name)), pretrained=True),
    'torch_hub': torch.hub.load(root, name.split('.')[0], source='local', pretrained=True),
}
with torch.no_grad():
    logits = {k: m.eval()(x) for k, m in models.items()}
torch.save(logits, out)
print(json.dumps({k: m.pretrained_cfg.get('hf_hub_id') for k, m in models.items()}))
'''


def test_list_pretrained_is_exactly_the_shipped_weights():
    assert timm.list_pretrained('sd_*') == sorted(sd_zoo.SHIPPED_WEIGHTS)
    shipped_dirs = sorted(p.name for p in (ROOT / 'sd_zoo' / 'weights').iterdir() if p.is_dir())
    assert shipped_dirs == sorted(sd_zoo.SHIPPED_WEIGHTS)
    for name in sd_zoo.SHIPPED_WEIGHTS:
        cfg = timm.models.get_pretrained_cfg(name)
        weights = Path(cfg.file)
        assert weights == sd_zoo.shipped_weights_dir(name) / 'model.safetensors' and weights.is_file()
        assert weights.stat().st_size < 4 * 2 ** 20, 'shipped weights must stay small (a few MB)'
        assert cfg.hf_hub_id == f'sd-zoo/{name}'
        config = json.loads((weights.parent / 'config.json').read_text())
        assert config['architecture'] == name.split('.')[0]
        assert config['pretrained_cfg']['hf_hub_id'] == cfg.hf_hub_id
        assert config['pretrained_cfg']['mean'] == list(cfg.mean)
        assert (weights.parent / 'README.md').read_text().startswith('---\n')


def test_every_shipped_weight_states_its_accuracy():
    assert sorted(STATED_SUBSET_TOP1) == sorted(sd_zoo.SHIPPED_WEIGHTS)


def test_unshipped_name_is_a_clear_error():
    with pytest.raises(ValueError, match='no weights ship with sd-zoo for .sd_resnet110.cifar10.'):
        sd_zoo.shipped_weights_dir('sd_resnet110.cifar10')
    with pytest.raises(RuntimeError, match='No pretrained weights exist'):
        timm.create_model('sd_resnet110.cifar10', pretrained=True)


@pytest.mark.parametrize('name', sd_zoo.SHIPPED_WEIGHTS)
def test_shipped_weights_load_offline_through_timm_local_dir_and_torch_hub(name, tmp_path):
    # a fresh process with no reachable Hub and empty caches: anything that tried the network would fail
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'),
               TORCH_HOME=str(tmp_path / 'torch'), PYTHONPATH=str(ROOT))
    out = tmp_path / 'logits.pt'
    proc = subprocess.run([sys.executable, '-c', OFFLINE_SCRIPT, name, str(ROOT), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub_ids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hub_ids['timm'] == hub_ids['timm_default_tag'] == f'sd-zoo/{name}'
    assert not (tmp_path / 'hf' / 'hub').exists() or not any((tmp_path / 'hf' / 'hub').iterdir())

    reference = timm.create_model(name.split('.')[0]).eval()
    reference.load_state_dict(load_file(str(sd_zoo.shipped_weights_dir(name) / 'model.safetensors')))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    logits = torch.load(out)
    assert set(logits) == {'timm', 'timm_default_tag', 'local_dir', 'torch_hub'}
    for source, value in logits.items():
        assert torch.equal(value, expected), source
    # trained weights: eval scales stored in the weights are the schedule's, and the BN statistics are real
    config = json.loads((sd_zoo.shipped_weights_dir(name) / 'config.json').read_text())
    p_last = 1.0 - config['model_args']['drop_path_rate']
    assert p_last < 1.0 and torch.allclose(reference.layer3[-1].eval_scale, torch.tensor(p_last))
    assert reference.bn1.running_var.mean() != 1.0


@pytest.mark.parametrize('name', sd_zoo.SHIPPED_WEIGHTS)
def test_shipped_weights_fine_tune_with_a_new_head(name):
    model = timm.create_model(name, pretrained=True, num_classes=100, drop_path_rate=0.3)
    ref = timm.create_model(name, pretrained=True)
    assert model.fc.out_features == 100
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert not torch.equal(model.fc.weight[:10], ref.fc.weight)
    feats = timm.create_model(name, pretrained=True, features_only=True)
    assert torch.equal(feats.model.conv1.weight, ref.conv1.weight)  # timm's getter wrapper (forward_intermediates)
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 32, 32))] == [16, 16, 32, 64]


@pytest.mark.parametrize('name', sorted(STATED_SUBSET_TOP1))
def test_shipped_weights_reach_the_stated_accuracy(name, cifar10_dir, tmp_path):
    results = tmp_path / 'results.json'
    assert main(['validate', '--model', name, '--pretrained', '--data-dir', str(cifar10_dir), '--split', 'test',
                 '--subset', '2000', '--seed', '0', '-j', '0', '--results-file', str(results)]) == 0
    measured = json.loads(results.read_text())
    assert measured['images'] == 2000
    assert measured['top1'] >= STATED_SUBSET_TOP1[name] - 0.5, measured


INSTALLED_SCRIPT = '''
import sys, torch, timm, sd_zoo
print(sd_zoo.__file__)
for name in sd_zoo.SHIPPED_WEIGHTS:
    print(timm.create_model(name, pretrained=True).eval().pretrained_cfg['file'])
'''


@pytest.mark.slow
def test_built_wheel_ships_the_weights_and_loads_them_offline(tmp_path):
    # build from a copy of what the package is made of, install the wheel elsewhere, load from there
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (ROOT / name).exists():
            (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / 'sd_zoo', src / 'sd_zoo', ignore=shutil.ignore_patterns('__pycache__'))
    pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(tmp_path / 'dist'), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / 'dist').glob('sd_zoo-*.whl'))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for name in sd_zoo.SHIPPED_WEIGHTS:
        for f in ('model.safetensors', 'config.json', 'README.md'):
            assert f'sd_zoo/weights/{name}/{f}' in names, (f, sorted(names))
    target = tmp_path / 'site'
    subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'),
               PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, '-c', INSTALLED_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, *weights_files = proc.stdout.strip().splitlines()[-1 - len(sd_zoo.SHIPPED_WEIGHTS):]
    assert module_file.startswith(str(target)) and len(weights_files) == len(sd_zoo.SHIPPED_WEIGHTS)
    assert all(f.startswith(str(target)) for f in weights_files), weights_files
