"""Files from outside are data, never instructions: hostile or careless published folders and Hub repos.

Each case starts from a folder that ``sd-zoo publish`` stages (config.json + model.safetensors of a real
sd_resnet20) and changes one thing, as a hostile or careless publisher would. Loading it through every
route that reads a published folder (``local-dir:`` as sd-zoo validate and load_published take it, torch.hub's
``hub_id=``, and a real loopback Hub over HTTP) must end in a one-line ValueError naming the problem, with
nothing fetched: the loopback server records every request it gets.
"""
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Dict, NamedTuple

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import make_image_folder
from hub_server import start_hub, stop_hub
from sd_zoo.cli import main
from sd_zoo.loading import load_published

ROOT = Path(__file__).resolve().parents[1]
EVIL_URL = 'http://127.0.0.1:9/evil.pth'  # the discard port: nothing may ever try it


class Tamper(NamedTuple):
    name: str
    config: Callable[[dict], None]  # edits config.json in place
    weights: Callable[[Dict[str, torch.Tensor]], None]  # edits the state_dict in place
    message: str  # what the one-line error must say


def _set(path: str, value):
    """An edit that sets config[path] ('a.b' for nested keys)."""
    def edit(config: dict):
        keys = path.split('.')
        node = config
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return edit


def _keep(_):
    return None


def _nan(sd):
    sd['fc.weight'][0, 0] = float('nan')


def _inf(sd):
    sd['layer1.0.bn1.running_var'][0] = float('inf')


def _int64_bn(sd):
    sd['bn1.running_mean'] = sd['bn1.running_mean'].round().to(torch.int64)


def _half(sd):
    sd['conv1.weight'] = sd['conv1.weight'].half()


def _drop_eval_scales(sd):
    for key in [k for k in sd if k.endswith('eval_scale')]:
        del sd[key]


def _extra_key(sd):
    sd['backdoor.weight'] = torch.zeros(3)


def _shape(sd):
    sd['fc.bias'] = torch.zeros(11)


CASES = [
    # a config that steers the loader: never a download, never another model than the one named
    Tamper('pretrained-with-url', lambda c: (_set('model_args.pretrained', True)(c),
                                             _set('pretrained_cfg.url', EVIL_URL)(c)), _keep,
           "model_args has keys sd-zoo does not load: pretrained"),
    Tamper('url', _set('pretrained_cfg.url', EVIL_URL), _keep, 'pretrained_cfg has keys sd-zoo does not load: url'),
    Tamper('file', _set('pretrained_cfg.file', '/etc/passwd'), _keep, 'does not load: file'),
    Tamper('state-dict-source', _set('pretrained_cfg.source', 'hf-hub'), _keep, 'does not load: source'),
    Tamper('custom-load', _set('pretrained_cfg.custom_load', True), _keep, 'pretrained_cfg.custom_load is not'),
    Tamper('depth-override', _set('model_args.depth', 56), _keep, 'model_args.depth 56 contradicts its architecture'),
    Tamper('unknown-model-arg', _set('model_args.act_layer', 'gelu'), _keep, 'does not load: act_layer'),
    Tamper('string-rate', _set('model_args.drop_path_rate', '0.5'), _keep, 'drop_path_rate is not a valid value'),
    Tamper('rate-one', _set('model_args.drop_path_rate', 1.0), _keep, 'drop_path_rate is not a valid value'),
    Tamper('bool-classes', _set('model_args.num_classes', True), _keep, 'num_classes is not a valid value'),
    Tamper('granularity', _set('model_args.sd_granularity', 'layer'), _keep, 'sd_granularity is not a valid'),
    Tamper('imagenet-arch-cifar-arg', lambda c: (_set('architecture', 'sd_resnet18')(c),
                                                 c['model_args'].pop('drop_rate')), _keep,
           'which only the CIFAR models take'),
    Tamper('foreign-arch', _set('architecture', 'resnet18'), _keep, "'resnet18', is not an sd-zoo model"),
    Tamper('mean-length', _set('pretrained_cfg.mean', [0.5, 0.5]), _keep, 'mean has 2 values for 3 input'),
    Tamper('zero-std', _set('pretrained_cfg.std', [0.0, 0.2, 0.2]), _keep, 'pretrained_cfg.std is not a valid'),
    Tamper('labels-vs-classes', _set('label_names', ['cat', 'dog']), _keep, 'different class counts'),
    Tamper('nan-constant', _set('pretrained_cfg.crop_pct', math.nan), _keep, 'config.json is not JSON'),
    Tamper('top-level-extra', _set('hook', 'import os'), _keep, 'top level has keys sd-zoo does not load: hook'),
    # sizes that would exhaust memory before the weights could disagree: capped, and checked on the meta device
    Tamper('huge-classes', _set('model_args.num_classes', 10 ** 10), _keep, 'num_classes is not a valid value'),
    Tamper('huge-width', _set('model_args.channels', [16, 32, 10 ** 6]), _keep, 'channels is not a valid value'),
    Tamper('huge-input', _set('pretrained_cfg.input_size', [3, 10 ** 6, 10 ** 6]), _keep,
           'input_size is not a valid value'),
    Tamper('width-not-the-weights', _set('model_args.channels', [16, 32, 4000]), _keep,
           'weight layer3.0.conv1.weight is torch.float32 (64, 32, 3, 3), the model has torch.float32 (4000,'),
    Tamper('input-channels', _set('pretrained_cfg.input_size', [1, 32, 32]), _keep, 'input_size has 1 channels'),
    Tamper('tagged-arch', _set('architecture', 'sd_resnet20.cifar10'), _keep, "'sd_resnet20.cifar10' with a tag"),
    Tamper('repeated-labels', _set('label_names', ['cat'] * 10), _keep, "label_names repeat 'cat'"),
    Tamper('null-model-args', _set('model_args', None), _keep, "model_args is not a mapping"),
    # weights that are not the model's: never cast, defaulted or evaluated
    Tamper('nan-weights', _keep, _nan, 'weight fc.weight holds NaN or infinite values'),
    Tamper('inf-bn-stats', _keep, _inf, 'layer1.0.bn1.running_var holds NaN or infinite'),
    Tamper('int64-bn-stats', _keep, _int64_bn, 'bn1.running_mean is torch.int64'),
    Tamper('half-conv', _keep, _half, 'conv1.weight is torch.float16'),
    Tamper('no-eval-scales', _keep, _drop_eval_scales, 'missing layer1.0.eval_scale'),
    Tamper('extra-tensor', _keep, _extra_key, 'unexpected backdoor.weight'),
    Tamper('head-shape', _keep, _shape, 'fc.bias is torch.float32 (11,)'),
]


@pytest.fixture(scope='module')
def published(tmp_path_factory) -> Path:
    """A folder as sd-zoo publish stages it (the shipped sd_resnet20.cifar10 files)."""
    import sd_zoo
    return sd_zoo.shipped_weights_dir('sd_resnet20.cifar10')


def _tampered(published: Path, case: Tamper, folder: Path) -> Path:
    folder.mkdir()
    config = json.loads((published / 'config.json').read_text())
    case.config(config)
    (folder / 'config.json').write_text(json.dumps(config))  # NaN is written as the bare constant NaN
    sd = load_file(str(published / 'model.safetensors'))
    case.weights(sd)
    save_file(sd, str(folder / 'model.safetensors'))
    return folder


def _one_line(e: Exception) -> str:
    text = str(e)
    assert '\n' not in text and 'Traceback' not in text, text
    return text


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_tampered_local_folder_is_a_one_line_error(case: Tamper, published: Path, tmp_path, monkeypatch):
    folder = _tampered(published, case, tmp_path / case.name)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))  # where a timm download would land
    with pytest.raises(ValueError) as err:
        load_published(f'local-dir:{folder}')
    assert case.message in _one_line(err.value), err.value
    hub = pytest.importorskip('hubconf')
    with pytest.raises(ValueError) as err:
        hub.sd_resnet20(pretrained=True, hub_id=f'local-dir:{folder}')
    assert case.message in _one_line(err.value)
    assert not (tmp_path / 'torch_home').exists(), 'something was downloaded'


def test_what_timms_export_writes_loads_and_a_class_count_is_checked_against_the_weights(published: Path, tmp_path):
    # timm's save_for_hf writes pool_size null for a model saved at another input size than its architecture's
    folder = _tampered(published, Tamper('pool-null', _set('pretrained_cfg.pool_size', None), _keep, ''),
                       tmp_path / 'pool')
    assert load_published(f'local-dir:{folder}').num_classes == 10
    with pytest.raises(ValueError, match='revision'):  # a local folder has no revisions to pick from
        load_published(f'local-dir:{folder}', revision='v1')

    def classless(config):
        for section in (config, config['model_args'], config['pretrained_cfg']):
            section.pop('num_classes', None)
            section.pop('label_names', None)
    folder = _tampered(published, Tamper('classless', classless, _keep, ''), tmp_path / 'classless')
    assert load_published(f'local-dir:{folder}', num_classes=10).num_classes == 10  # sd_resnet20's default
    with pytest.raises(ValueError) as err:  # config.json does not say: the weights do, and they are 10-class
        load_published(f'local-dir:{folder}', num_classes=100)
    assert "has 10-class weights, not 100" in _one_line(err.value)


@pytest.mark.parametrize('name', ['pretrained-with-url', 'depth-override', 'nan-weights', 'no-eval-scales'])
def test_tampered_hub_repo_fetches_nothing_else(name: str, published: Path, tmp_path, hub_env, monkeypatch):
    """The same over real HTTP: the loader asks the loopback Hub for config.json and model.safetensors of
    that repo only, and the URL in the config is never requested."""
    case = next(c for c in CASES if c.name == name)
    folder = _tampered(published, case, tmp_path / name)
    if name == 'pretrained-with-url':  # the URL points at the Hub server itself, so a request would be seen
        config = json.loads((folder / 'config.json').read_text())
    server, state, endpoint = start_hub()
    hub_env(endpoint)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    try:
        if name == 'pretrained-with-url':
            config['pretrained_cfg']['url'] = endpoint + '/evil.pth'
            (folder / 'config.json').write_text(json.dumps(config))
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        state.repos['org/hostile'] = {'main': {'sha': 'b' * 40, 'files': files}}
        with pytest.raises(ValueError) as err:
            load_published('hf-hub:org/hostile')
        assert case.message in _one_line(err.value)
    finally:
        stop_hub(server)
    paths = {p.split('?')[0] for _, p in state.requests}
    assert all(p.startswith('/org/hostile/resolve/main/') for p in paths if '/resolve/' in p), paths
    assert not any('evil' in p for p in paths) and not (tmp_path / 'torch_home').exists()


def test_validate_command_names_the_problem(published: Path, tmp_path, capsys):
    folder = _tampered(published, next(c for c in CASES if c.name == 'nan-weights'), tmp_path / 'nan')
    assert main(['validate', '--model', f'local-dir:{folder}', '--data-dir', str(tmp_path), '--split', 'test']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds NaN or infinite values' in err[0], err


def test_the_untampered_folder_loads_with_its_own_settings(published: Path):
    """The schema lets through everything sd-zoo publish writes, and the model is the one it describes."""
    model = load_published(f'local-dir:{published}')
    reference = timm.create_model('sd_resnet20.cifar10', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model.pretrained_cfg['mean'] == reference.pretrained_cfg['mean']
    assert not any(model.pretrained_cfg.get(k) for k in ('url', 'file', 'hf_hub_id', 'state_dict'))
    assert model.pretrained_cfg['label_names'][0] == 'airplane'


# ---------------------------------------------------------------------------------------------- data splits


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp('splits') / 'data')
    (root / 'to_root').symlink_to(root, target_is_directory=True)  # a split that would hold every split
    (root / 'val').symlink_to(root / 'train', target_is_directory=True)  # the training images again
    return root


def _validate(root: Path, split: str):
    return ['validate', '--model', 'sd_resnet20.cifar10', '--pretrained', '--data-dir', str(root), '--split', split,
            '-j', '0']


def _train(root: Path, *extra: str):
    return ['train', '--model', 'sd_resnet20', '--data-dir', str(root), '--epochs', '1', '-b', '8', '-j', '0',
            '--no-progress', *extra]


BAD_SPLITS = [
    ('validate-dot', lambda r: _validate(r, '.'), "split '.' is not a split name"),
    ('validate-parent', lambda r: _validate(r, '..'), "split '..' is not a split name"),
    ('validate-path', lambda r: _validate(r, 'train/../test'), 'is not a split name'),
    ('validate-absolute', lambda r: _validate(r, str(r / 'test')), 'is not a split name'),
    ('validate-link-to-root', lambda r: _validate(r, 'to_root'), 'links to the data folder'),
    ('train-val-dot', lambda r: _train(r, '--val-split', '.'), "split '.' is not a split name"),
    ('train-val-is-train', lambda r: _train(r, '--val-split', 'train'), "--val-split 'train' is the training split"),
    ('train-val-linked-to-train', lambda r: _train(r, '--val-split', 'val'), "--val-split 'val' is the training"),
    ('train-test-is-train', lambda r: _train(r, '--val-split', 'test', '--test-split', 'train'),
     "--test-split 'train' is the training split"),
    ('train-split-parent', lambda r: _train(r, '--train-split', '..', '--val-split', 'test'), 'is not a split name'),
]


@pytest.mark.parametrize('argv,message', [b[1:] for b in BAD_SPLITS], ids=[b[0] for b in BAD_SPLITS])
def test_a_split_is_a_named_folder_of_its_own(argv, message, image_folder: Path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train's default output folder
    assert main(argv(image_folder)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'output').exists() or not any((tmp_path / 'output').rglob('*.pth.tar'))


# ---------------------------------------------------------------------------------------------- numbers


NOT_NUMBERS = [('--lr', 'nan'), ('--lr', 'inf'), ('--momentum', 'nan'), ('--weight-decay', '-inf'),
               ('--warmup-lr', 'nan'), ('--smoothing', 'nan'), ('--drop-path', 'nan'), ('--clip-grad', 'inf')]


@pytest.mark.parametrize('flag,value', NOT_NUMBERS, ids=[f'{f}={v}' for f, v in NOT_NUMBERS])
def test_non_finite_hyperparameters_are_errors(flag, value, image_folder: Path, capsys, tmp_path):
    assert main(_train(image_folder, '--val-split', 'test', '--output', str(tmp_path), f'{flag}={value}')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{flag} must be a finite number, got {value}' in err[0], err
    assert not any(tmp_path.rglob('*.pth.tar'))


@pytest.mark.parametrize('flag,value', [('--lr', '-0.1'), ('--weight-decay', '-1e-4'), ('--momentum', '-0.9')])
def test_negative_optimizer_settings_are_errors(flag, value, image_folder: Path, capsys, tmp_path):
    assert main(_train(image_folder, '--val-split', 'test', '--output', str(tmp_path), f'{flag}={value}')) == 2
    assert f'{flag} must be at least 0' in capsys.readouterr().err


def test_a_loss_that_diverges_stops_the_run_at_the_last_good_checkpoint(image_folder: Path, capsys, tmp_path):
    """Epoch 0 warms up at lr 0.01 and is saved; epoch 1 runs at lr 1e30 and its loss overflows: the run stops
    with a one-line error naming epoch 0's checkpoint, which still holds finite weights."""
    argv = _train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--experiment', 'diverge',
                  '--epochs', '3', '--sched', 'step', '--warmup-epochs', '1', '--warmup-lr', '0.01', '--lr', '1e30',
                  '--decay-epochs', '100')
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / 'diverge'
    assert len(err) == 1 and 'the training loss is' in err[0] and 'at epoch 1' in err[0], err
    assert f'the last good checkpoint is {run / "last.pth.tar"} (epoch 0)' in err[0]
    from timm.utils import load_checkpoint_metadata
    from sd_zoo.loading import read_state_dict
    assert load_checkpoint_metadata(str(run / 'last.pth.tar'))['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in read_state_dict(str(run / 'last.pth.tar')).values()
               if v.is_floating_point())
    assert not (run / 'checkpoint-1.pth.tar').exists()
    assert [line.split(',')[0] for line in (run / 'summary.csv').read_text().splitlines()[1:]] == ['0']


# ---------------------------------------------------------------------------------------------- Python API


def _api_cases():
    import sd_zoo
    return [
        ('train-config-fd', lambda: sd_zoo.train(config=1), TypeError, 'config must be a recipe name'),
        ('train-config-int', lambda: sd_zoo.train(config=123), TypeError, 'config must be a recipe name'),
        ('train-epochs-str', lambda: sd_zoo.train('smoke_sd', epochs='2'), TypeError, "epochs must be an int, got '2'"),
        ('train-epochs-bool', lambda: sd_zoo.train('smoke_sd', epochs=True), TypeError, 'epochs must be an int'),
        ('train-lr-str', lambda: sd_zoo.train('smoke_sd', lr='0.1'), TypeError, 'lr must be a number'),
        ('train-amp-str', lambda: sd_zoo.train('smoke_sd', amp='yes'), TypeError, 'amp must be a bool'),
        ('train-mean-scalar', lambda: sd_zoo.train('smoke_sd', mean=0.5), TypeError, 'mean must be a list of numbers'),
        ('train-kwargs-list', lambda: sd_zoo.train('smoke_sd', model_kwargs=['a']), TypeError,
         'model_kwargs must be a dict'),
        ('validate-none', lambda: sd_zoo.validate(None), TypeError, 'model must be a model name'),
        ('validate-module', lambda: sd_zoo.validate(torch.nn.Linear(1, 1)), TypeError, 'got Linear'),
        ('publish-none', lambda: sd_zoo.publish(None, repo_id='org/x'), TypeError, 'source must be a run folder'),
        ('add-sd-none', lambda: sd_zoo.add_stochastic_depth(None), TypeError, 'model must be a torch.nn.Module'),
        ('add-sd-str', lambda: sd_zoo.add_stochastic_depth('resnet50'), TypeError, 'got str'),
    ]


@pytest.mark.parametrize('index', range(13))
def test_public_functions_name_a_wrong_argument(index, capfd):
    name, call, kind, message = _api_cases()[index]
    with pytest.raises(kind) as err:
        call()
    assert message in _one_line(err.value), (name, err.value)
    print('still open', flush=True)  # train(config=1) must not have closed this process's stdout
    assert 'still open' in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------- configs


def test_yaml_scientific_notation_is_a_number(tmp_path):
    from sd_zoo.training import parse_train_args
    (tmp_path / 'c.yaml').write_text('lr: 1e-3\nweight_decay: 5E-4\nmean: [1e-1, 0.5, 5e-1]\n')
    args = parse_train_args(['--config', str(tmp_path / 'c.yaml')])
    assert args.lr == 1e-3 and args.weight_decay == 5e-4 and args.mean == [0.1, 0.5, 0.5]


@pytest.mark.parametrize('text,message', [('amp: "true"\n', 'amp must be true or false'),
                                          ('epochs: 1e2\n', 'epochs must be int'),
                                          ('lr: 1e-3x\n', 'lr must be float')])
def test_yaml_values_of_the_wrong_kind_are_errors(text, message, tmp_path):
    from sd_zoo.training import parse_train_args
    (tmp_path / 'c.yaml').write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_train_args(['--config', str(tmp_path / 'c.yaml')])


def test_a_local_file_named_like_a_recipe_is_not_silently_the_recipe(tmp_path, monkeypatch):
    from sd_zoo.recipes import RECIPES_DIR, resolve_recipe
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'smoke_sd').write_text('epochs: 1\n')
    with pytest.raises(ValueError, match=r"both a recipe name and a file here: write \./smoke_sd"):
        resolve_recipe('smoke_sd')
    assert resolve_recipe('./smoke_sd') == './smoke_sd'
    assert resolve_recipe('smoke_sd.yaml') == os.path.join(RECIPES_DIR, 'smoke_sd.yaml')  # no such file here


# ---------------------------------------------------------------------------------------------- run folders


def test_run_folder_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    import signal
    import subprocess
    import sys
    from sd_zoo.runs import LOCK_NAME, RunFolderLock
    folder = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from sd_zoo.runs import RunFolderLock; '
                               f'RunFolderLock({str(folder)!r}); print("held", flush=True); time.sleep(300)'],
                              stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(ValueError, match=rf'in use by another training process \(pid {holder.pid}\)'):
            RunFolderLock(str(folder))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (folder / LOCK_NAME).exists()  # the file stays behind a kill; the lock does not
    RunFolderLock(str(folder)).release()


def test_a_second_writer_of_a_training_run_is_refused(image_folder: Path, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / 'busy'
    argv = _train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--epochs', '400', '--sched',
                  'step', '--decay-epochs', '1000')
    argv_new = argv + ['--experiment', 'busy']
    first = subprocess.Popen([sys.executable, '-m', 'sd_zoo.cli', *argv_new], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        deadline = time.time() + 240
        while not (run / 'last.pth.tar').exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (run / 'last.pth.tar').exists(), 'the first run never saved an epoch'
        for second in (argv + ['--resume', str(run / 'last.pth.tar')],  # a second --resume of the same run
                       argv_new):  # the same command again: a second new run into the same folder
            assert main(second) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and (f'is in use by another training process (pid {first.pid})' in err[0]
                                      or 'already holds a run' in err[0]), err
        assert first.poll() is None, 'the first run was disturbed'
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    epochs = [line.split(',')[0] for line in (run / 'summary.csv').read_text().splitlines()[1:]]
    assert epochs == [str(i) for i in range(len(epochs))]  # one writer: no epoch twice


@pytest.mark.parametrize('lost', ['summary.csv', 'args.yaml'])
def test_a_resume_whose_record_was_deleted_is_refused(lost, image_folder: Path, tmp_path, capsys):
    argv = _train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--sched', 'step',
                  '--decay-epochs', '100')
    assert main(argv + ['--experiment', 'r', '--epochs', '2']) == 0  # epoch 0's rows are in no other record
    (tmp_path / 'r' / lost).unlink()
    capsys.readouterr()
    assert main(argv + ['--epochs', '3', '--resume', str(tmp_path / 'r' / 'last.pth.tar')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'has lost its {lost}' in err[0] and 'epochs 0-1' in err[0], err


def test_links_and_damaged_records_in_a_run_folder_are_refused_not_followed(image_folder: Path, tmp_path, capsys):
    from timm.utils import load_checkpoint_metadata
    from sd_zoo.runs import read_epoch_record
    argv = _train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--sched', 'step',
                  '--decay-epochs', '100')
    assert main(argv + ['--experiment', 'r', '--epochs', '1']) == 0
    run, victim = tmp_path / 'r', tmp_path / 'victim.txt'
    victim.write_text('mine')
    resume = argv + ['--epochs', '2', '--resume', str(run / 'last.pth.tar')]
    capsys.readouterr()
    # a log the run appends to, or its lock file, made a link to another file: refused, that file untouched
    for name in ('epochs.csv', '.sd-zoo-train.lock'):
        os.replace(run / name, run / 'aside')
        (run / name).symlink_to(victim)
        assert main(resume) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'holds symbolic links where the run writes its files ({name})' in err[0], err
        assert victim.read_text() == 'mine'
        os.replace(run / 'aside', run / name)
    # a damaged checkpoint record: one line at the start, not a TypeError an epoch later
    checkpoint = load_checkpoint_metadata(str(run / 'last.pth.tar'))
    for key, value, message in (('saver', dict(checkpoint['saver'], best_metric='high'), 'saver record'),
                                 ('epoch', -1, 'is not a training checkpoint (it has no epoch)'),
                                 ('epoch', True, 'is not a training checkpoint (it has no epoch)')):
        torch.save(dict(checkpoint, **{key: value}), tmp_path / 'damaged.pth.tar')
        os.replace(tmp_path / 'damaged.pth.tar', run / 'last.pth.tar')  # a new file: the read one is memory-mapped
        assert main(resume) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    record = json.loads((run / 'last_epoch.json').read_text())
    assert read_epoch_record(str(run)) == record
    del record['stats']  # damaged: no record (its rows are not restored from it), not a KeyError on resume
    (run / 'last_epoch.json').write_text(json.dumps(record))
    assert read_epoch_record(str(run)) is None


def test_an_atomic_write_never_follows_a_link_planted_under_its_temporary_name(tmp_path):
    from sd_zoo.checks import write_atomic
    victim, target = tmp_path / 'victim.txt', tmp_path / 'results.json'
    victim.write_text('mine')
    (tmp_path / f'results.json.{os.getpid()}.tmp').symlink_to(victim)  # the predictable name, taken first
    write_atomic(str(target), '{}')
    assert target.read_text() == '{}' and not target.is_symlink() and victim.read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json', 'victim.txt']


# ---------------------------------------------------------------------------------------------- labels


def _cifar_like(root: Path, classes, per_class: int = 20) -> Path:
    """A test split of real CIFAR-10 images (the shipped weights' own test images) under the given folder names:
    ``classes`` maps a folder name to the CIFAR-10 class whose images it holds."""
    from conftest import SHARED_CIFAR10, extract_cifar10
    if not SHARED_CIFAR10.exists():
        pytest.skip(f'the shared CIFAR-10 archive is absent ({SHARED_CIFAR10})')
    source = extract_cifar10() / 'test'
    for folder, cifar_class in classes.items():
        (root / 'test' / folder).mkdir(parents=True)
        for image in sorted((source / cifar_class).iterdir())[:per_class]:
            (root / 'test' / folder / image.name).write_bytes(image.read_bytes())
    return root


def _top1(root: Path, model: str = 'sd_resnet20.cifar10') -> float:
    import sd_zoo
    return sd_zoo.validate(model, pretrained=not model.startswith('local-dir:'), data_dir=str(root), split='test',
                           workers=0, quiet=True)['top1']


CIFAR10 = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def test_labels_are_matched_by_name(tmp_path):
    """Fewer classes, or the same classes under folder names in another sort order, evaluate on their own
    labels: the same accuracy as the full, ordered split's images of those classes."""
    full = _top1(_cifar_like(tmp_path / 'full', {c: c for c in CIFAR10}))
    assert full > 70  # the shipped weights on 200 of their test images
    three = _top1(_cifar_like(tmp_path / 'three', {c: c for c in ('cat', 'ship', 'truck')}))
    assert three > 60, three  # by position, cat/ship/truck would be scored as airplane/automobile/bird: ~0%
    shipped = __import__('sd_zoo').shipped_weights_dir('sd_resnet20.cifar10')
    assert _top1(tmp_path / 'three', f'local-dir:{shipped}') == three  # published folders carry the names too


@pytest.mark.parametrize('rename', [{'airplane': 'plane'}, {'truck': 'lorry', 'cat': 'kitten'}])
def test_a_class_the_weights_do_not_know_is_an_error(rename, tmp_path):
    root = _cifar_like(tmp_path / 'renamed', {rename.get(c, c): c for c in CIFAR10}, per_class=2)
    with pytest.raises(ValueError, match='has classes the weights do not know: ' + ', '.join(sorted(rename.values()))):
        _top1(root)


# ---------------------------------------------------------------------------------------------- publish --out


@pytest.fixture(scope='module')
def two_runs(image_folder: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    for name in ('a', 'b'):
        assert main(_train(image_folder, '--val-split', 'test', '--output', str(out), '--experiment', name,
                           '--sched', 'step', '--decay-epochs', '100')) == 0
    return out / 'a', out / 'b'


def _publish(run: Path, out: Path, *extra: str):
    return ['publish', str(run), '--repo-id', 'org/x', '--dry-run', '--out', str(out), *extra]


def test_publish_replaces_only_a_staging_of_the_same_run(two_runs, tmp_path, capsys):
    from sd_zoo.publishing import STAGING_MARKER
    run_a, run_b = two_runs
    out = tmp_path / 'staged'
    assert main(_publish(run_a, out)) == 0
    first = (out / 'model.safetensors').read_bytes()
    # the outputs' classes are the run's training classes, not the architecture's default data set's
    assert json.loads((out / 'config.json').read_text())['label_names'] == [f'class{i}' for i in range(10)]
    assert main(_publish(run_a, out)) == 0  # the same run again: its own staging is replaced
    capsys.readouterr()
    assert main(_publish(run_b, out)) == 2  # another run: refused, the staging kept
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another staging (of run 'a', last.pth.tar): add --overwrite" in err[0], err
    assert (out / 'model.safetensors').read_bytes() == first
    assert main(_publish(run_b, out, '--overwrite')) == 0
    assert json.loads((out / STAGING_MARKER).read_text())['run'] == 'b'
    assert str(run_b) not in (out / STAGING_MARKER).read_text()  # the marker names the run, not its full path


def test_publish_never_replaces_a_copy_of_published_weights(two_runs, published: Path, tmp_path, capsys):
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(published, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert main(_publish(two_runs[0], copy)) == 2
    assert 'holds another staging (of unknown origin)' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_publish_never_follows_or_replaces_links(two_runs, published: Path, tmp_path, capsys):
    cache = tmp_path / 'hub_cache_snapshot'  # laid out like the Hub cache: links to blobs
    blobs = tmp_path / 'blobs'
    blobs.mkdir()
    cache.mkdir()
    for f in published.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (cache / f.name).symlink_to(blobs / f.name)
    loop = tmp_path / 'loop'
    loop.symlink_to(loop)
    linked = tmp_path / 'linked'
    linked.symlink_to(tmp_path / 'elsewhere')
    for out, message in ((cache, 'holds symbolic links'), (loop, 'is a symbolic link'),
                         (linked, 'is a symbolic link')):
        assert main(_publish(two_runs[0], out, '--overwrite')) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert all((cache / f.name).is_symlink() for f in published.iterdir())
    assert not (tmp_path / 'elsewhere').exists()


# ---------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize('extra,expected', [((), "pad + random crop + flip (sd_resnet20 is a CIFAR model"),
                                            (('--no-cifar-aug',), "timm's RandomResizedCrop"),
                                            (('--cifar-aug',), 'pad + random crop + flip (--cifar-aug)')])
def test_a_cifar_model_trains_with_its_family_augmentation(extra, expected, image_folder: Path, tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger='sd_zoo')
    assert main(_train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--experiment', 'aug',
                       '--sched', 'step', '--decay-epochs', '100', *extra)) == 0
    lines = [m for m in caplog.messages if m.startswith('augmentation:')]
    assert len(lines) == 1 and expected in lines[0], lines
    loader = [m for m in caplog.messages if 'train /' in m and 'loader' in m]
    assert ('(memory loader)' in loader[0]) == ('timm' not in expected), loader  # the in-memory path with it


# ---------------------------------------------------------------------------------------------- derived files


def _raw_png_folder(root: Path, size: int = 32, splits=(('train', 3), ('test', 2)), test_size=None) -> Path:
    """Uncompressed PNG images: a file's byte size depends on the image size only, so one can be swapped for
    another of the same size."""
    return make_image_folder(root, classes=('c0', 'c1', 'c2'), splits=splits, size=size, seed=1,
                             split_sizes=dict(test=test_size) if test_size else None, compress_level=0)


def _decode(root: Path, split: str, caplog):
    from sd_zoo.data import DataSource, decode_split
    caplog.clear()
    return decode_split(DataSource('', str(root)), split, workers=1)


def _fresh(root: Path, split: str):
    from sd_zoo.data import DataSource, decode_split
    return decode_split(DataSource('', str(root)), split, workers=1, use_cache=False)


def _entry(root: Path, split: str) -> Path:
    from sd_zoo.data import cache_dir, folder_cache_key
    return Path(cache_dir()) / f'{folder_cache_key(str(root / split))}.safetensors'


@pytest.fixture
def private_cache(tmp_path, monkeypatch, caplog):
    import logging
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    caplog.set_level(logging.INFO, logger='sd_zoo')


def _same(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_a_cache_entry_copied_from_another_split_is_not_used(tmp_path, private_cache, caplog):
    root = _raw_png_folder(tmp_path / 'data', splits=(('train', 2), ('test', 2)))
    _decode(root, 'train', caplog), _decode(root, 'test', caplog)
    _entry(root, 'test').write_bytes(_entry(root, 'train').read_bytes())  # same count, shape and classes
    got = _decode(root, 'test', caplog)
    assert any('was made from other files than this split' in m for m in caplog.messages), caplog.messages
    assert _same(got, _fresh(root, 'test'))


def test_a_cache_entry_with_shifted_labels_or_edited_images_is_not_used(tmp_path, private_cache, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file
    root = _raw_png_folder(tmp_path / 'data')
    _decode(root, 'train', caplog)
    entry = _entry(root, 'train')
    with safe_open(str(entry), 'pt') as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for edit, doubt in ((lambda t: t.update(labels=(t['labels'] + 1) % 3), 'labels that are not the folder'),
                        (lambda t: t['images'][0].fill_(0), 'images that are not the ones it was written with')):
        edited = {k: v.clone() for k, v in tensors.items()}
        edit(edited)
        save_file(edited, str(entry), metadata=meta)  # the metadata as it was: only a check of the content sees it
        got = _decode(root, 'train', caplog)
        assert any(doubt in m for m in caplog.messages), caplog.messages
        assert _same(got, _fresh(root, 'train'))


def test_a_swapped_image_with_size_and_mtime_restored_is_noticed(tmp_path, private_cache, caplog):
    import os as _os
    root = _raw_png_folder(tmp_path / 'data')
    before = _decode(root, 'train', caplog)
    a, b = root / 'train' / 'c0' / '0.png', root / 'train' / 'c2' / '1.png'
    stat_a, stat_b = a.stat(), b.stat()
    assert stat_a.st_size == stat_b.st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    _os.utime(a, ns=(stat_a.st_atime_ns, stat_a.st_mtime_ns))
    _os.utime(b, ns=(stat_b.st_atime_ns, stat_b.st_mtime_ns))
    assert _entry(root, 'train').exists()  # the key (names, sizes, mtimes) is the same: the same entry
    got = _decode(root, 'train', caplog)
    assert any('was made from other files' in m for m in caplog.messages), caplog.messages
    assert not torch.equal(got.images, before.images) and _same(got, _fresh(root, 'train'))


@pytest.mark.parametrize('loader', ['memory', 'auto'])
def test_validation_images_of_another_size_are_never_fed_unresized(loader, tmp_path, private_cache, caplog,
                                                                   capsys):
    root = _raw_png_folder(tmp_path / 'data', test_size=40)
    rc = main(_train(root, '--val-split', 'test', '--loader', loader, '--output', str(tmp_path), '--experiment',
                     'sizes', '--sched', 'step', '--decay-epochs', '100'))
    if loader == 'memory':
        assert rc == 2 and 'the images are 40x40 but the model takes 32x32' in capsys.readouterr().err
    else:  # timm's loader for every split: its eval transform resizes the 40-pixel images
        assert rc == 0 and any('(timm loader)' in m for m in caplog.messages), caplog.messages


# ---------------------------------------------------------------------------------------------- hints


def test_a_run_killed_before_its_first_checkpoint_names_no_checkpoint(image_folder: Path, tmp_path, capsys):
    (tmp_path / 'early').mkdir()
    (tmp_path / 'early' / 'args.yaml').write_text('model: sd_resnet20\n')  # what a run writes before epoch 0 ends
    assert main(_train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--experiment', 'early')) == 2
    err = capsys.readouterr().err
    assert 'it stopped before its first checkpoint, so there is nothing to resume' in err and 'last.pth.tar' not in err


def test_a_truncated_last_checkpoint_points_to_the_intact_one(image_folder: Path, tmp_path, capsys):
    argv = _train(image_folder, '--val-split', 'test', '--output', str(tmp_path), '--sched', 'step',
                  '--decay-epochs', '100', '--checkpoint-hist', '2')
    assert main(argv + ['--experiment', 'cut', '--epochs', '2']) == 0
    last = tmp_path / 'cut' / 'last.pth.tar'
    last.write_bytes(last.read_bytes()[:4096])
    capsys.readouterr()
    assert main(argv + ['--epochs', '3', '--resume', str(last)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # checkpoint-1 is a link to last.pth.tar (cut with it) where the file system allows: then checkpoint-0
    found = re.search(r'the newest intact checkpoint of the run is (\S+) \(epoch (\d)\): resume from it', err[0])
    assert len(err) == 1 and found, err
    intact = Path(found.group(1))
    assert intact.parent == last.parent and not os.path.samefile(intact, last)
    assert main(argv + ['--epochs', '3', '--resume', str(intact)]) == 0  # and it does resume


def test_a_checkpoint_with_nan_weights_is_not_evaluated(image_folder: Path, tmp_path, capsys):
    from sd_zoo.loading import read_state_dict
    from safetensors.torch import save_file
    sd = read_state_dict(str(ROOT / 'sd_zoo' / 'weights' / 'sd_resnet20.cifar10' / 'model.safetensors'))
    sd['layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    save_file(sd, str(tmp_path / 'nan.safetensors'))
    assert main(['validate', '--model', 'sd_resnet20', '--checkpoint', str(tmp_path / 'nan.safetensors'),
                 '--data-dir', str(image_folder), '--split', 'test', '-j', '0']) == 2
    assert 'hold NaN or infinite values (layer2.0.conv1.weight)' in capsys.readouterr().err


def test_an_ema_entry_set_to_none_is_no_ema_weights(tmp_path):
    from sd_zoo.loading import check_has_ema
    path = tmp_path / 'no_ema.pth.tar'
    torch.save(dict(epoch=0, state_dict={'w': torch.zeros(1)}, state_dict_ema=None), path)
    with pytest.raises(ValueError, match='has no EMA weights'):  # timm would quietly return the plain weights
        check_has_ema(str(path))
    torch.save(dict(epoch=0, state_dict={'w': torch.zeros(1)}, state_dict_ema={'w': torch.ones(1)}), path)
    check_has_ema(str(path))
