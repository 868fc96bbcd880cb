"""Publishing to a real (loopback) Hub over HTTP, loading with hf-hub:, torch.hub and offline; bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_image_folder
from hub_server import start_hub
from sd_zoo.runs import RunFolder
from sd_zoo.cli import main
from sd_zoo.loading import load_model
from sd_zoo.hub import load_published
from sd_zoo.publishing import main as publish_main

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = 'sdzoo/tiny-sd-resnet20'

LOAD_SCRIPT = '''
import sys, torch, timm, sd_zoo
x = torch.load(sys.argv[1])
out = {}
out['timm'] = timm.create_model('hf-hub:%(repo)s', pretrained=True).eval()(x)
out['hub'] = torch.hub.load(%(root)r, 'sd_resnet20', source='local', pretrained=True, hub_id='%(repo)s').eval()(x)
# a registered config that carries the hub id (and no shipped file) loads through timm's own hub path
out['tag'] = timm.create_model('sd_resnet20.cifar10', pretrained=True,
                               pretrained_cfg_overlay=dict(hf_hub_id='%(repo)s', file=None)).eval()(x)
torch.save({k: v.detach() for k, v in out.items()}, sys.argv[2])
''' % dict(repo=REPO_ID, root=str(ROOT))


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """A real one-epoch sd-zoo train run on a small generated image folder (no downloads, no shared data)."""
    root = make_image_folder(tmp_path_factory.mktemp('data'), splits=(('train', 6), ('test', 2)))
    out = tmp_path_factory.mktemp('runs')
    assert main(['train', '--data-dir', str(root), '--model', 'sd_resnet20', '--epochs', '1', '-b', '16', '-j', '0',
                 '--no-progress', '--cifar-aug', '--train-split', 'train', '--val-split', 'test',
                 '--output', str(out), '--experiment', 'run', '--lr', '0.05']) == 0
    return out / 'run', root


def _env(endpoint, tmp_path, **extra):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN='hf_test_token', HF_HOME=str(tmp_path / 'hf_home'),
               HF_HUB_DISABLE_XET='1', HF_HUB_DISABLE_TELEMETRY='1', PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _publish(run_dir, staged, env, *extra):
    """The last epoch: the fixture's run chose model_best on its test split, which publish refuses."""
    out = ['--out', str(staged)] if staged else []
    return subprocess.run([sys.executable, '-m', 'sd_zoo.cli', 'publish', str(run_dir), '--repo-id', REPO_ID,
                           '--checkpoint', 'last', *out, *extra], capture_output=True, text=True, env=env,
                          timeout=300)


def _load_logits(tmp_path, env, x):
    torch.save(x, tmp_path / 'x.pt')
    res = subprocess.run([sys.executable, '-c', LOAD_SCRIPT, str(tmp_path / 'x.pt'), str(tmp_path / 'out.pt')],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / 'out.pt')


@pytest.mark.slow
def test_publish_round_trip_over_http_then_offline(trained_run, tmp_path):
    run_dir, _ = trained_run
    server, state, endpoint = start_hub()
    try:
        staged = tmp_path / 'staged'
        res = _publish(run_dir, staged, _env(endpoint, tmp_path), '--commit-message', 'first weights')
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(state.commits) == 1  # one atomic commit
        repo, rev, summary, files = state.commits[0]
        assert (repo, rev, summary) == (REPO_ID, 'main', 'first weights')
        assert files == ['README.md', 'config.json', 'model.safetensors', 'survival_schedule.png',
                         'training_curves.png']
        config = json.loads((staged / 'config.json').read_text())
        assert config['model_args']['drop_path_rate'] == 0.5 and config['model_args']['sd_rule'] == 'linear'
        assert config['architecture'] == 'sd_resnet20' and config['pretrained_cfg']['hf_hub_id'] == REPO_ID
        card = (staged / 'README.md').read_text()
        assert card.startswith('---\nlibrary_name: timm') and 'stochastic depth' in card.lower()
        assert "hf-hub:" + REPO_ID in card and '@inproceedings{huang2016deep' in card

        trained = RunFolder.open(str(run_dir / 'last.pth.tar')).model('sd_resnet20')
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            expected = trained(x)
        online = _load_logits(tmp_path, _env(endpoint, tmp_path), x)
        assert torch.equal(online['timm'], expected) and torch.equal(online['hub'], expected)
        assert torch.equal(online['tag'], expected)
        assert any(m == 'GET' and 'resolve/main/model.safetensors' in p for m, p in state.requests)

        # publishing again updates the repository
        res = _publish(run_dir, staged, _env(endpoint, tmp_path), '--commit-message', 'again')
        assert res.returncode == 0, res.stderr[-3000:]
        assert [c[2] for c in state.commits] == ['first weights', 'again']
        # a publication without a training-curve plot removes the earlier one (the card would show another run's
        # curves); a file sd-zoo does not stage stays
        state.repos[REPO_ID]['main']['files']['notes.txt'] = b'the owner\'s'
        no_rows = tmp_path / 'no_rows'
        shutil.copytree(run_dir, no_rows)
        (no_rows / 'summary.csv').unlink()
        res = _publish(no_rows, tmp_path / 'staged_no_rows', _env(endpoint, tmp_path), '--commit-message', 'no rows')
        assert res.returncode == 0, res.stderr[-3000:]
        assert sorted(state.repos[REPO_ID]['main']['files']) == ['README.md', 'config.json', 'model.safetensors',
                                                                 'notes.txt', 'survival_schedule.png']
        # --revision pushes to a branch (created when missing) and leaves main alone
        main_sha = state.repos[REPO_ID]['main']['sha']
        res = _publish(run_dir, staged, _env(endpoint, tmp_path), '--revision', 'dev', '--commit-message', 'dev')
        assert res.returncode == 0, res.stderr[-3000:]
        assert state.commits[-1][:3] == (REPO_ID, 'dev', 'dev') and state.repos[REPO_ID]['main']['sha'] == main_sha
    finally:
        server.shutdown()
    # the server is gone: the pre-populated cache serves the files in offline mode
    offline = _load_logits(tmp_path, _env('http://127.0.0.1:9', tmp_path, HF_HUB_OFFLINE='1'), x)
    assert all(torch.equal(offline[k], expected) for k in ('timm', 'hub', 'tag'))


@pytest.mark.slow
def test_failed_commit_publishes_nothing_and_retry_succeeds(trained_run, tmp_path):
    run_dir, _ = trained_run
    server, state, endpoint = start_hub()
    try:
        state.fail_next_commits = 1
        staged = tmp_path / 'staged'
        res = _publish(run_dir, staged, _env(endpoint, tmp_path))
        assert res.returncode == 2
        assert 'staged files are intact' in res.stderr and str(staged) in res.stderr
        assert state.commits == [] and state.repos[REPO_ID]['main']['files'] == {}  # nothing half-published
        before = {p.name: p.read_bytes() for p in staged.iterdir()}
        assert 'model.safetensors' in before and 'README.md' in before
        res = _publish(run_dir, staged, _env(endpoint, tmp_path))
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(state.commits) == 1
        published = state.repos[REPO_ID]['main']['files']
        assert published['model.safetensors'] == before['model.safetensors']
    finally:
        server.shutdown()


@pytest.mark.slow
def test_dry_run_and_pre_populated_torch_hub_dir(trained_run, tmp_path):
    run_dir, _ = trained_run
    staged = tmp_path / 'staged'
    assert main(['publish', str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run',
                 '--out', str(staged)]) == 0
    assert (staged / 'model.safetensors').exists() and not list(staged.glob('*.bin'))
    hub_dir = tmp_path / 'torch_hub'
    cached = hub_dir / 'OWNER_sd-zoo_main'
    shutil.copytree(ROOT / 'sd_zoo', cached / 'sd_zoo')
    shutil.copy(ROOT / 'hubconf.py', cached / 'hubconf.py')
    torch.hub.set_dir(str(hub_dir))
    try:
        model = torch.hub.load('OWNER/sd-zoo:main', 'sd_resnet20', pretrained=True, hub_id=f'local-dir:{staged}',
                               trust_repo=True, skip_validation=True)
        # timm's behaviour: a model in training mode, and num_classes gives a new head
        rehead = torch.hub.load('OWNER/sd-zoo:main', 'sd_resnet20', pretrained=True, hub_id=f'local-dir:{staged}',
                                num_classes=7, trust_repo=True, skip_validation=True)
    finally:
        torch.hub.set_dir(str(tmp_path / 'unused'))
    assert model.training and rehead.num_classes == 7 and rehead.fc.out_features == 7
    assert torch.equal(rehead.conv1.weight, model.conv1.weight)
    model.eval()
    ref = RunFolder.open(str(run_dir / 'last.pth.tar')).model('sd_resnet20')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    local_dir = load_model(f'local-dir:{staged}')
    with torch.no_grad():
        assert torch.equal(local_dir(x), ref(x))


@pytest.mark.slow
def test_bad_published_files_get_clear_errors(trained_run, tmp_path):
    run_dir, _ = trained_run
    staged = tmp_path / 'staged'
    assert main(['publish', str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run',
                 '--out', str(staged)]) == 0

    def variant(name):
        d = tmp_path / name
        shutil.copytree(staged, d)
        return d

    truncated = variant('truncated')
    data = (truncated / 'model.safetensors').read_bytes()
    (truncated / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='corrupt or truncated'):
        load_published("local-dir:" + str(truncated))
    corrupt = variant('corrupt')
    (corrupt / 'model.safetensors').write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='corrupt or truncated'):
        load_published("local-dir:" + str(corrupt))

    unknown = variant('unknown')
    cfg = json.loads((unknown / 'config.json').read_text())
    cfg['architecture'] = 'no_such_net'
    (unknown / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'no_such_net', which no installed package registers"):
        load_published("local-dir:" + str(unknown))

    with pytest.raises(ValueError, match='10-class weights, not 100'):
        load_published("local-dir:" + str(staged), num_classes=100)
    with pytest.raises(ValueError, match="'sd_resnet20' weights, not 'sd_resnet110'"):
        load_published("local-dir:" + str(staged), model_name='sd_resnet110')

    pickled = variant('pickled')
    torch.save(load_published("local-dir:" + str(staged)).state_dict(), pickled / 'pytorch_model.bin')
    (pickled / 'model.safetensors').unlink()
    with pytest.raises(ValueError, match='only pickle weights'):
        load_published("local-dir:" + str(pickled))

    junk = tmp_path / 'junk.pth.tar'
    junk.write_bytes(b'this is no checkpoint')
    assert main(['publish', str(junk), '--repo-id', REPO_ID, '--dry-run', '--model', 'sd_resnet20',
                 '--out', str(tmp_path / 'x')]) == 2
    assert main(['publish', str(tmp_path / 'nowhere'), '--repo-id', REPO_ID, '--dry-run']) == 2
    assert main(['publish', str(run_dir), '--repo-id', 'no-slash', '--dry-run']) == 2


@pytest.mark.slow
def test_card_compares_with_the_constant_depth_twin(trained_run, tmp_path):
    run_dir, data = trained_run
    out = tmp_path / 'runs'
    assert main(['train', '--data-dir', str(data), '--model', 'sd_resnet20', '--drop-path', '0', '--epochs', '1',
                 '-b', '16', '-j', '0', '--no-progress', '--cifar-aug', '--train-split', 'train', '--val-split',
                 'test', '--output', str(out), '--experiment', 'constant', '--lr', '0.05']) == 0
    staged = tmp_path / 'staged'
    # --model NAME.TAG names the data set (a generated image folder says nothing about it)
    result = publish_main([str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--out',
                           str(staged), '--model', 'sd_resnet20.cifar10', '--data-dir', str(data),
                           '--baseline', str(out / 'constant'), '--train-note', 'Trained on a test machine.'])
    card = (staged / 'README.md').read_text()
    base = result['baseline']
    # the twin was validated like the SD model: the same images, its own checkpoint
    assert base['results']['images'] == result['results']['images'] == 20
    ref = RunFolder.open(str(out / 'constant' / 'model_best.pth.tar')).model('sd_resnet20')
    # the twin is rebuilt as it trained (constant depth), its eval scales all 1
    assert ref.drop_path_rate == 0.0 and all(float(b.eval_scale) == 1.0 for b in ref.layer1)
    assert '## Stochastic depth vs. constant depth' in card and 'Trained on a test machine.' in card
    assert f'| test top-1 | {result["results"]["top1"]:.2f} | {base["results"]["top1"]:.2f} |' in card
    assert 'the same recipe except drop_path, and validated' in card
    assert ('Training time saved by stochastic depth:' in card or 'Stochastic depth saved no training time' in card)
    assert 'median epoch wall time' in card and 'blocks per step on average: ' in card

    assert 'trained with stochastic depth on CIFAR-10' in card and '- stochastic depth: p_L = 0.5' in card
    # beside the published ResNet-20 weights, with the difference in points
    assert '## Against published weights' in card
    assert f'| 91.25 | {result["results"]["top1"] - 91.25:+.2f} |' in card and '| 92.60 |' in card
    assert "akamaster/pytorch_resnet_cifar10's resnet20 (200 epochs, zero-padding shortcuts) | 91.73 |" in card
    # the twin's own card says what it is
    publish_main([str(out / 'constant'), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--out',
                  str(tmp_path / 'constant')])
    constant_card = (tmp_path / 'constant' / 'README.md').read_text()
    assert 'trained with constant depth' in constant_card and '- stochastic depth: off' in constant_card

    # a constant-depth run has no stochastic depth to compare with its twin
    with pytest.raises(ValueError, match='this run trained with constant depth too'):
        publish_main([str(out / 'constant'), '--repo-id', REPO_ID, '--dry-run', '--out', str(tmp_path / 'x'),
                      '--baseline', str(out / 'constant')])
    # a stochastic-depth run is no constant-depth baseline
    with pytest.raises(ValueError, match='trained with drop_path 0.5: the baseline must be the constant-depth twin'):
        publish_main([str(run_dir), '--repo-id', REPO_ID, '--dry-run', '--out', str(tmp_path / 'x'),
                      '--baseline', str(run_dir)])
    # a twin that ran another way (here another loader) is compared in accuracy, not in time
    twin_args = out / 'constant' / 'args.yaml'
    values = yaml.safe_load(twin_args.read_text())
    twin_args.write_text(yaml.safe_dump(dict(values, loader='timm' if values.get('loader') != 'timm' else 'memory')))
    publish_main([str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--out',
                  str(tmp_path / 'ran_differently'), '--model', 'sd_resnet20.cifar10', '--baseline', str(out / 'constant')])
    card = (tmp_path / 'ran_differently' / 'README.md').read_text()
    assert 'The training times are not compared: the runs differ in loader' in card
    assert 'Training time saved' not in card and 'saved no training time' not in card


def test_out_folder_with_only_a_user_readme_is_refused_and_kept(tmp_path):
    from sd_zoo.publishing import prepare_out_dir
    own = tmp_path / 'mine'
    own.mkdir()
    (own / 'README.md').write_text('my notes')  # a name sd-zoo stages, but not sd-zoo's file
    with pytest.raises(ValueError, match=r"holds files that sd-zoo did not stage \(README.md\)"):
        prepare_out_dir(str(own))
    assert (own / 'README.md').read_text() == 'my notes'
    # an earlier staging (config.json naming an sd-zoo architecture) is replaced with --overwrite only: its
    # origin is unknown (no marker)
    (own / 'config.json').write_text(json.dumps({'architecture': 'sd_resnet20'}))
    with pytest.raises(ValueError, match=r'holds another staging \(of unknown origin\): add --overwrite'):
        prepare_out_dir(str(own))
    assert prepare_out_dir(str(own), overwrite=True) == own and not any(own.iterdir())
    # a staging cut short before its first file left only sd-zoo's marker: the same run stages again into it,
    # another needs --overwrite; a marker that is not sd-zoo's is the user's file
    source = dict(run='r', run_digest='0123', checkpoint='last.pth.tar')
    prepare_out_dir(str(own), source)
    assert prepare_out_dir(str(own), source) == own
    with pytest.raises(ValueError, match=r"holds another staging \(of run 'r', last.pth.tar\)"):
        prepare_out_dir(str(own), dict(source, run='other'))
    # cut short after the weights, before config.json: still sd-zoo's (the marker comes first), replaced as above
    (own / 'model.safetensors').write_bytes(b'half written')
    with pytest.raises(ValueError, match=r"holds another staging \(of run 'r', last.pth.tar\)"):
        prepare_out_dir(str(own), dict(source, run='other'))
    assert prepare_out_dir(str(own), source) == own and [p.name for p in own.iterdir()] == ['.sd-zoo-staging.json']
    (own / '.sd-zoo-staging.json').write_text('my own notes')
    with pytest.raises(ValueError, match=r"holds files that sd-zoo did not stage \(.sd-zoo-staging.json\)"):
        prepare_out_dir(str(own), source)


def _train(data, out, name, *extra):
    """A one-epoch sd_resnet20 run on the generated folder, validated on its test split (no holdout)."""
    assert main(['train', '--data-dir', str(data), '--model', 'sd_resnet20', '--epochs', '1', '-b', '16', '-j', '0',
                 '--no-progress', '--cifar-aug', '--train-split', 'train', '--val-split', 'test',
                 '--output', str(out), '--experiment', name, '--lr', '0.05', *extra]) == 0
    return out / name


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow
def test_best_checkpoint_chosen_on_the_test_split_is_refused(trained_run, tmp_path):
    run_dir, data = trained_run
    staged = tmp_path / 'staged'
    for extra in (['--data-dir', str(data)], []):  # measured on that split, or not measured: test data either way
        with pytest.raises(ValueError, match=r"kept for its accuracy on the 'test' split .*\(--checkpoint "
                                             r"last\), or train with --val-holdout"):
            publish_main([str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'best', '--dry-run', '--out',
                          str(staged), *extra])
        assert not staged.exists()  # refused before anything was written
    publish_main([str(run_dir), '--repo-id', REPO_ID, '--dry-run', '--out', str(staged)])  # the default: last
    assert '`last.pth.tar`' in (staged / 'README.md').read_text()
    # chosen on held-out training images: model_best is fine, and the card says which weights it shows
    held_out = _train(data, tmp_path / 'runs', 'held_out', '--val-holdout', '10')
    result = publish_main([str(held_out), '--repo-id', REPO_ID, '--checkpoint', 'best', '--dry-run', '--out',
                           str(staged), '--data-dir', str(data), '--overwrite'])  # another run's staging there
    assert result['results']['images'] == 20 and '`model_best.pth.tar`' in (staged / 'README.md').read_text()
    # timm's kept checkpoint-N files are its best few by that accuracy too; the last epoch's one is the last epoch
    two = _train(data, tmp_path / 'runs', 'two_epochs', '--epochs', '2')
    with pytest.raises(ValueError, match=r"checkpoint-0.pth.tar' was kept for its accuracy on the 'test' split"):
        publish_main([str(two / 'checkpoint-0.pth.tar'), '--repo-id', REPO_ID, '--dry-run', '--out', str(staged),
                      '--overwrite'])
    publish_main([str(two / 'checkpoint-1.pth.tar'), '--repo-id', REPO_ID, '--dry-run', '--out', str(staged),
                  '--overwrite'])


@pytest.mark.slow
def test_a_bad_input_leaves_an_earlier_staging_untouched(trained_run, tmp_path):
    run_dir, data = trained_run
    staged = tmp_path / 'staged'
    publish_main([str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--out', str(staged)])
    before = _files(staged)
    (tmp_path / 'empty').mkdir()
    bad = [(['--data-dir', str(tmp_path / 'nowhere')], 'is not a folder'),
           (['--data-dir', str(data), '--split', 'tset'], "split 'tset' not found"),
           (['--dataset', 'torch/cifar10', '--data-dir', str(tmp_path / 'empty')], 'add --dataset-download'),
           (['--baseline', str(tmp_path / 'nowhere')], 'does not exist')]
    for extra, names in bad:
        with pytest.raises(ValueError, match=names):
            publish_main([str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run',
                          '--out', str(staged), *extra])
        assert _files(staged) == before, extra
    # the flag the torchvision error suggests is one publish has, as validate does
    from sd_zoo.publishing import build_publish_parser
    assert build_publish_parser().parse_args(['run', '--repo-id', REPO_ID, '--dataset-download']).dataset_download


@pytest.mark.slow
def test_card_names_the_data_set_only_when_known(trained_run, tmp_path):
    run_dir, data = trained_run
    common = [str(run_dir), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--data-dir', str(data)]
    # a generated 10-class folder is not CIFAR-10: the card and config name no data set
    unknown = tmp_path / 'unknown'
    assert publish_main([*common, '--out', str(unknown)])['tag'] is None
    card, config = (unknown / 'README.md').read_text(), json.loads((unknown / 'config.json').read_text())
    meta = card.split('---')[1]
    assert 'CIFAR-10' not in card and 'datasets:' not in meta and 'model-index' not in meta
    assert '## Against published weights' not in card and 'an image data set that the run does not name' in card
    assert '| test split | 20 |' in card
    # the outputs' classes are the run's own (its folder's class names), which name no data set
    assert config['label_names'] == [f'class{i}' for i in range(10)] and 'tag' not in config['pretrained_cfg']
    # --model NAME.TAG names it; the input normalization stays the one the run trained with (CIFAR-10's)
    svhn = tmp_path / 'svhn'
    assert publish_main([*common, '--out', str(svhn), '--model', 'sd_resnet20.svhn'])['tag'] == 'svhn'
    card, config = (svhn / 'README.md').read_text(), json.loads((svhn / 'config.json').read_text())
    assert 'trained with stochastic depth on SVHN' in card and 'CIFAR-10' not in card
    assert config['pretrained_cfg']['tag'] == 'svhn' and config['label_names'][0] == 'class0'
    assert config['pretrained_cfg']['mean'] == [0.4914, 0.4822, 0.4465]
    # a tag that contradicts the weights or another statement is an error
    with pytest.raises(ValueError, match='says the run trained on cifar100 \\(100 classes\\), but the weights have 10'):
        publish_main([*common, '--out', str(tmp_path / 'x'), '--tag', 'cifar100'])
    with pytest.raises(ValueError, match='stated two ways \\(--tag says svhn, --model says cifar10\\)'):
        publish_main([*common, '--out', str(tmp_path / 'x'), '--tag', 'svhn', '--model', 'sd_resnet20.cifar10'])
    assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_config_carries_the_runs_own_normalization(trained_run, tmp_path):
    _, data = trained_run
    run = _train(data, tmp_path / 'runs', 'own_norm', '--mean', '0.5', '0.5', '0.5', '--std', '0.25', '0.25', '0.25')
    staged = tmp_path / 'staged'
    publish_main([str(run), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--out', str(staged)])
    config = json.loads((staged / 'config.json').read_text())['pretrained_cfg']
    assert config['mean'] == [0.5] * 3 and config['std'] == [0.25] * 3 and config['input_size'] == [3, 32, 32]
    model = load_model(f'local-dir:{staged}')  # what the card's measurement and users resolve
    import timm
    assert tuple(timm.data.resolve_data_config(model=model)['mean']) == (0.5, 0.5, 0.5)


@pytest.mark.slow
def test_baseline_is_validated_exactly_like_the_model(trained_run, tmp_path):
    import sd_zoo
    run_dir, data = trained_run
    runs = tmp_path / 'runs'
    c100 = ['--model', 'sd_resnet20.cifar100', '--model-ema', '--model-ema-decay', '0.5']
    model = _train(data, runs, 'sd', *c100)
    twin = _train(data, runs, 'constant', *c100, '--drop-path', '0')
    common = [str(model), '--repo-id', REPO_ID, '--checkpoint', 'last', '--dry-run', '--ema', '--data-dir', str(data)]
    result = publish_main([*common, '--out', str(tmp_path / 'staged'), '--baseline', str(twin)])
    # the twin's EMA weights, with CIFAR-100's normalization, as validate measures them
    expected = sd_zoo.validate('sd_resnet20.cifar100', checkpoint=str(twin / 'last.pth.tar'), use_ema=True,
                               data_dir=str(data), split='test', workers=0, device='cpu', quiet=True)
    measured = result['baseline']['results']
    assert measured['top1'] == expected['top1'] and measured['loss'] == pytest.approx(expected['loss'], abs=1e-5)
    # a twin without EMA weights, or one that finished another number of epochs, is refused
    with pytest.raises(ValueError, match='has no EMA weights'):
        publish_main([*common, '--out', str(tmp_path / 'x'), '--baseline', str(run_dir)])
    longer = _train(data, runs, 'longer', *c100, '--drop-path', '0', '--epochs', '2')
    with pytest.raises(ValueError, match='finished 2 epochs, this run 1: compare runs that finished the same'):
        publish_main([*common, '--out', str(tmp_path / 'x'), '--baseline', str(longer)])
    assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_private_push_to_an_existing_public_repo_is_refused(trained_run, tmp_path):
    run_dir, _ = trained_run
    server, state, endpoint = start_hub()
    try:
        state.repos[REPO_ID] = {'main': {'sha': '0' * 40, 'files': {}}}  # made public earlier
        staged = tmp_path / 'staged'
        res = _publish(run_dir, staged, _env(endpoint, tmp_path), '--private')
        assert res.returncode == 2 and f"--private: '{REPO_ID}' already exists and is public" in res.stderr
        assert state.commits == [] and not staged.exists()  # checked before staging
    finally:
        server.shutdown()


@pytest.mark.slow
def test_push_removes_only_its_temporary_staging_folder(trained_run, tmp_path):
    run_dir, data = trained_run
    server, state, endpoint = start_hub()
    temp = tmp_path / 'tmp'
    temp.mkdir()
    (temp / 'someone_elses.txt').write_text('kept')
    # a staging that fails half way (a corrupt test image met while measuring) leaves no temporary folder
    bad_data = tmp_path / 'bad_data'
    shutil.copytree(data, bad_data)
    (bad_data / 'test' / 'class4' / '1.png').write_bytes(b'not an image')
    res = _publish(run_dir, None, _env(endpoint, tmp_path, TMPDIR=str(temp)), '--dry-run', '--data-dir',
                   str(bad_data))
    assert res.returncode == 2 and 'class4/1.png' in res.stderr, res.stderr[-3000:]
    assert not list(temp.glob('sd-zoo-*'))
    try:
        res = _publish(run_dir, None, _env(endpoint, tmp_path, TMPDIR=str(temp)), '--private')
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(state.commits) == 1 and state.private[REPO_ID] is True  # a new repo, created private
    finally:
        server.shutdown()
    assert not list(temp.glob('sd-zoo-*')) and (temp / 'someone_elses.txt').read_text() == 'kept'


def test_the_data_set_a_run_trained_on_beats_the_tag_it_started_from():
    """A run fine-tuned from a tagged name (sd_resnet20.cifar10) on CIFAR-100 is a CIFAR-100 model; on a folder
    that names no data set it names none, whatever the model name's tag (the user's own 100 classes are not
    CIFAR-100); a folder named after a data set names it."""
    import timm
    from sd_zoo.publishing import dataset_tag
    model = timm.create_model('sd_resnet20', num_classes=100)
    assert dataset_tag(model, dict(model='sd_resnet20.cifar10', dataset='torch/cifar100'), None, None) == 'cifar100'
    assert dataset_tag(model, dict(model='sd_resnet20.cifar10', data_dir='/data/flowers'), None, None) is None
    assert dataset_tag(model, dict(model='sd_resnet20.cifar100', data_dir='/data/flowers'), None, None) is None
    assert dataset_tag(model, dict(model='sd_resnet20', data_dir='/work/data/cifar100/'), None, None) == 'cifar100'
    assert dataset_tag(model, dict(model='sd_resnet20.cifar100', config='cifar100_resnet110_sd'), None,
                       None) == 'cifar100'
    with pytest.raises(ValueError, match=r'--tag says the run trained on cifar10 \(10 classes\), but the weights'):
        dataset_tag(model, dict(model='sd_resnet20.cifar100'), None, 'cifar10')
