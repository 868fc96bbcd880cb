"""The application layer's contracts: model names with tags everywhere, one model rebuild for any run
(ImageNet family, other class counts, in_chans), keyword Python APIs, recipes by name, the card's metadata."""
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import sd_zoo
from sd_zoo.runs import RunFolder
from sd_zoo.cli import main
from sd_zoo.loading import check_model_name, load_model, parse_source


def _train(data, out, name, *extra):
    assert main(['train', '--data-dir', str(data), '--epochs', '1', '-b', '8', '-j', '0', '--no-progress',
                 '--cifar-aug', '--train-split', 'train', '--val-split', 'test', '--output', str(out),
                 '--experiment', name, '--lr', '0.05', *extra]) == 0
    return out / name


def test_model_names_and_tags():
    assert check_model_name('sd_resnet20.cifar100') == 'sd_resnet20.cifar100'
    with pytest.raises(ValueError, match=r"unknown tag in 'sd_resnet20.imagenet'.*sd_resnet20.cifar10"):
        check_model_name('sd_resnet20.imagenet')
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        check_model_name('resnet9000')
    # a Hub name may pin a revision as in timm's hf-hub: names; a folder is local-dir:, never a Hub id
    assert parse_source('hf-hub:org/sd_resnet20@v1.0') == ('hub', 'org/sd_resnet20', 'v1.0')
    assert parse_source('org/sd_resnet20') == ('hub', 'org/sd_resnet20', None)


def test_train_with_a_tagged_name_takes_the_tag_config(tiny_folder, tmp_path):
    run = _train(tiny_folder, tmp_path, 'tagged', '--model', 'sd_resnet20.cifar100')
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert args['model'] == 'sd_resnet20.cifar100' and args['num_classes'] == 100
    assert args['mean'] is None  # mean/std come from the tag's config, not repeated by the user
    state = timm.models.load_state_dict(str(run / 'last.pth.tar'))
    assert state['fc.weight'].shape == (100, 64)
    model = RunFolder.open(str(run / 'last.pth.tar')).model('sd_resnet20.cifar100')
    assert model.num_classes == 100 and model.pretrained_cfg['mean'] == (0.5071, 0.4865, 0.4409)


def test_a_checkpoint_is_validated_with_its_runs_normalization(tiny_folder, tmp_path):
    """A run of sd_resnet20.cifar100 validated as plain sd_resnet20 (whose default tag is cifar10) still uses
    the CIFAR-100 mean/std it trained with, as publish does: the same numbers under either name."""
    run = _train(tiny_folder, tmp_path, 'c100', '--model', 'sd_resnet20.cifar100')
    common = dict(checkpoint=str(run / 'last.pth.tar'), data_dir=str(tiny_folder), split='test', workers=0,
                  quiet=True)
    assert sd_zoo.validate('sd_resnet20', **common) == {**sd_zoo.validate('sd_resnet20.cifar100', **common),
                                                      'model': 'sd_resnet20', 'seconds': pytest.approx(0, abs=1e9)}


def test_fine_tuning_at_another_rate_evaluates_with_the_new_schedule(tiny_folder, tmp_path):
    """The shipped weights (p_L 0.9) fine-tuned at p_L 0.5: the model and its EMA copy evaluate with the new
    schedule's p_l (the paper's test rule for the rate the weights now train with), not the loaded one."""
    run = _train(tiny_folder, tmp_path, 'ft', '--model', 'sd_resnet20.cifar10', '--pretrained',
                 '--drop-path', '0.5', '--model-ema')
    for use_ema in (False, True):
        state = timm.models.load_state_dict(str(run / 'last.pth.tar'), use_ema=use_ema)
        scales = [float(v) for k, v in state.items() if k.endswith('eval_scale')]
        assert scales == pytest.approx(sd_zoo.survival_schedule(9, 0.5)), use_ema


@pytest.mark.slow
def test_publish_imagenet_family_checkpoint_without_args_yaml(tmp_path):
    model = timm.create_model('sd_resnet18', num_classes=10, drop_path_rate=0.3).eval()
    ckpt = tmp_path / 'ckpt' / 'sd18.pth.tar'
    ckpt.parent.mkdir()
    torch.save({'arch': 'sd_resnet18', 'state_dict': model.state_dict(), 'epoch': 3}, ckpt)
    staged = tmp_path / 'staged'
    res = sd_zoo.publish(str(ckpt), repo_id='org/sd18', dry_run=True, out=str(staged))
    # 10 classes and no args.yaml: nothing names the data set, so the card names none (not ImageNet-1k)
    assert res['architecture'] == 'sd_resnet18' and res['tag'] is None
    config = json.loads((staged / 'config.json').read_text())
    assert config['model_args']['num_classes'] == 10 and config['model_args']['in_chans'] == 3
    assert 'depth' not in config['model_args']
    card = (staged / 'README.md').read_text()
    assert 'ImageNet-style ResNet' in card and 'CIFAR-style' not in card
    loaded = timm.create_model(f'local-dir:{staged}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_publish_a_one_channel_run_with_model_index(tiny_folder, tmp_path):
    run = _train(tiny_folder, tmp_path, 'gray', '--model', 'sd_resnet20', '--in-chans', '1')
    staged = tmp_path / 'staged'
    # a 1-channel model is not validated on RGB images: publish without data_dir, then check the files
    res = sd_zoo.publish(str(run), repo_id='org/gray20', checkpoint='last', dry_run=True, out=str(staged))
    config = json.loads((staged / 'config.json').read_text())
    assert config['model_args']['in_chans'] == 1 and res['tag'] is None  # a generated folder names no data set
    # the weights are as readable as the other staged files (safetensors alone writes them owner-only)
    assert (staged / 'model.safetensors').stat().st_mode & 0o777 == (staged / 'config.json').stat().st_mode & 0o777
    model = load_model(f'local-dir:{staged}')
    assert model.conv1.weight.shape[1] == 1


def test_model_card_carries_model_index(tiny_folder, tmp_path):
    run = _train(tiny_folder, tmp_path, 'rgb', '--model', 'sd_resnet20')
    staged = tmp_path / 'staged'
    # the last epoch (model_best was chosen on this test split); --model NAME.TAG names the data set
    res = sd_zoo.publish(str(run), repo_id='org/rgb20', model='sd_resnet20.cifar10', checkpoint='last', dry_run=True,
                         out=str(staged), data_dir=str(tiny_folder), split='test')
    card = (staged / 'README.md').read_text()
    meta = yaml.safe_load(card.split('---')[1])
    entry = meta['model-index'][0]
    assert entry['name'] == 'rgb20'
    result = entry['results'][0]
    assert result['task']['type'] == 'image-classification'
    assert result['dataset'] == {'name': 'CIFAR-10', 'type': 'cifar10', 'split': 'test'}
    top1 = [m for m in result['metrics'] if m['name'] == 'top-1 accuracy'][0]
    assert top1['value'] == round(res['results']['top1'], 2)
    # the Python validate API gives the same number as the card
    again = sd_zoo.validate(f'local-dir:{staged}', data_dir=str(tiny_folder), split='test', quiet=True)
    assert again['top1'] == res['results']['top1'] and again['images'] == 20


def test_python_train_api(tiny_folder, tmp_path):
    res = sd_zoo.train('smoke_sd', dataset='', data_dir=str(tiny_folder), train_split='train', val_split='test',
                       train_subset=0, batch_size=8, workers=0, no_progress=True, output=str(tmp_path),
                       experiment='api')
    assert res['epochs'] == 1 and Path(res['output_dir']).name == 'api'
    assert 0 <= res['last_eval']['top1'] <= 100
    with pytest.raises(ValueError, match='no option batchsize'):
        sd_zoo.train('smoke_sd', batchsize=8)


def test_recipes_by_name(capsys):
    from sd_zoo.recipes import list_recipes, resolve_recipe
    recipes = list_recipes()
    assert 'cifar10_resnet110_sd' in recipes and 'Table 1' in recipes['cifar10_resnet110_sd']
    assert main(['recipes']) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in recipes)
    assert main(['recipes', '--path', 'smoke_sd']) == 0
    assert Path(capsys.readouterr().out.strip()) == Path(resolve_recipe('smoke_sd'))
    from sd_zoo.training import parse_train_args
    args = parse_train_args(['--config', 'cifar10_resnet110_sd'])
    assert args.model == 'sd_resnet110' and args.epochs == 500 and args.decay_milestones == [250, 375]
    assert main(['train', '--config', 'no_such_recipe']) == 2
    assert 'neither a file nor a recipe name' in capsys.readouterr().err


def test_public_timm_helpers_we_rely_on():
    """The few timm helpers outside timm's top-level API that sd-zoo uses: fail here, not in a user's run."""
    from timm.task import ClassificationTask, resume_task_checkpoint  # noqa: F401
    from timm.utils import CheckpointSaver, load_checkpoint_metadata  # noqa: F401
    from timm.models import get_arch_name, is_model, save_for_hf  # noqa: F401
    from timm.models._features import feature_take_indices  # noqa: F401  (sd_resnet_cifar: forward_intermediates)
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    assert {'samples', 'class_to_idx'} <= set(ReaderImageFolder.__init__.__code__.co_names)  # data.py reads both


def test_card_lists_milestones_only_for_step_schedules():
    from sd_zoo.card import _training_lines
    recipe = dict(epochs=50, decay_milestones=[250, 375])  # timm's args.yaml holds the default milestones
    assert '| decay_milestones | [250, 375] |' in _training_lines(dict(recipe, sched='multistep'), None, '')
    assert not any('decay_milestones' in line for line in _training_lines(dict(recipe, sched='cosine'), None, ''))
    # a step schedule (the ImageNet recipes): its decay_epochs and decay_rate, not multistep's default milestones
    step = '\n'.join(_training_lines(dict(recipe, sched='step', decay_epochs=30, decay_rate=0.1, warmup_epochs=0,
                                           warmup_lr=1e-5), None, ''))
    assert '| decay_epochs | 30 |' in step and '| decay_rate | 0.1 |' in step
    assert 'decay_milestones' not in step and 'warmup_lr' not in step


def test_card_says_how_many_epochs_ran_and_what_one_update_saw():
    from sd_zoo.card import _training_lines
    lines = '\n'.join(_training_lines(dict(epochs=50, batch_size=128, world_size=2, grad_accum_steps=2), None, '',
                                      finished_epochs=16))
    assert '| epochs | 16 of 50 planned (stopped early) |' in lines
    assert '| batch_size | 128 per process x 2 processes x 2 accumulated = 512 per update |' in lines
    lines = '\n'.join(_training_lines(dict(epochs=50, batch_size=128, world_size=1), None, '', finished_epochs=50))
    assert '| epochs | 50 |' in lines and '| batch_size | 128 |' in lines
    # a checkpoint without args.yaml: no recipe rows, but the measured time and the note are kept
    times = dict(total_s=7200.0, epochs=10, median_epoch_s=700.0)
    lines = '\n'.join(_training_lines({}, times, 'Trained on 2 cores.'))
    assert '2.00 h over 10 epochs' in lines and 'Trained on 2 cores.' in lines and '| epochs |' not in lines
    assert _training_lines({}, None, '') == []


def test_card_lists_settings_only_where_they_were_read():
    from sd_zoo.card import _training_lines
    recipe = dict(epochs=200, sched='cosine', model_ema=False, model_ema_decay=0.9998, amp=True, channels_last=True)
    off = '\n'.join(_training_lines(recipe, None, ''))
    assert '| model_ema | False |' in off and 'model_ema_decay' not in off and '| channels_last | True |' in off
    on = '\n'.join(_training_lines(dict(recipe, model_ema=True), None, ''))
    assert '| model_ema_decay | 0.9998 |' in on


def test_card_says_how_the_schedule_counts_its_epochs():
    from sd_zoo.card import _training_lines
    # sd_resnet56's recipe warms up per step; a cooldown or a warm-up prefix adds epochs to --epochs in timm
    recipe = dict(epochs=200, sched='cosine', warmup_epochs=1, warmup_lr=0.01, warmup_prefix=False,
                  cooldown_epochs=0, sched_on_updates=True)
    plain = '\n'.join(_training_lines(recipe, None, ''))
    assert '| sched_on_updates | True |' in plain and '| warmup_lr | 0.01 |' in plain
    assert 'warmup_prefix' not in plain and 'cooldown_epochs' not in plain
    extended = '\n'.join(_training_lines(dict(recipe, warmup_prefix=True, cooldown_epochs=10), None, ''))
    assert '| warmup_prefix | True |' in extended and '| cooldown_epochs | 10 |' in extended
    # no warm-up: no prefix, whatever args.yaml holds
    assert 'warmup_prefix' not in '\n'.join(_training_lines(dict(recipe, warmup_epochs=0, warmup_prefix=True),
                                                             None, ''))


def test_card_time_line_says_a_slower_epoch_and_the_gates_limit():
    from sd_zoo.card import time_saving_line
    base = dict(median_epoch_s=100.0, total_s=1000.0, epochs=10)
    faster = time_saving_line(dict(base, median_epoch_s=80.0, mean_active_blocks=6.5, num_blocks=9), base)
    assert faster.startswith('Training time saved by stochastic depth: 20.0% per epoch')
    assert 'kept 6.50 of 9 blocks per step on average: 27.8% of the blocks\' work was skipped' in faster
    slower = time_saving_line(dict(base, median_epoch_s=102.6), base)
    assert slower.startswith('Stochastic depth saved no training time here: its median epoch took 2.6% longer')
    assert '-' not in slower.split('(')[0] and 'blocks per step' not in slower
    # a difference that rounds to 0.0% is no loss; a zero baseline time says nothing
    assert time_saving_line(dict(base, median_epoch_s=100.04), base).startswith('Training time saved by stochastic '
                                                                              'depth: 0.0% per epoch')
    assert time_saving_line(base, dict(base, median_epoch_s=0.0)) == ''


def test_training_times_reads_the_active_blocks_and_refuses_a_bad_row(tmp_path):
    from sd_zoo.runs import training_times
    head = 'epoch,wall_s,images_per_s,mean_active_blocks,num_blocks,train_loss,eval_top1\n'
    (tmp_path / 'epochs.csv').write_text(head + '0,10.0,100,6.0,9,2.0,\n1,30.0,100,7.0,9,1.5,\n2,12.0,100,8.0,9,1.2,\n')
    assert training_times(tmp_path) == dict(epochs=3, total_s=52.0, median_epoch_s=12.0, mean_active_blocks=7.0,
                                            num_blocks=9)
    (tmp_path / 'epochs.csv').write_text(head + '0,10.0,100,0.0,0,2.0,\n')  # a model without gates
    assert training_times(tmp_path) == dict(epochs=1, total_s=10.0, median_epoch_s=10.0)
    (tmp_path / 'epochs.csv').write_text(head + '0,ten,100,6.0,9,2.0,\n')
    with pytest.raises(ValueError, match=r"epochs.csv: epoch '0' has wall_s 'ten', not a non-negative number"):
        training_times(tmp_path)
    for bad in ('0,10.0,100,9.5,9,2.0,\n', '0,10.0,100,6.0,9.7,2.0,\n'):  # more active than blocks; part blocks
        (tmp_path / 'epochs.csv').write_text(head + bad)
        with pytest.raises(ValueError, match='mean_active_blocks at most num_blocks'):
            training_times(tmp_path)


def test_card_describes_the_models_own_gates_and_scaling():
    from sd_zoo.card import _model_lines
    for kwargs, says, not_said in ((dict(), ('not computed', 'each branch scaled by p_l'), 'unscaled'),
                                   (dict(sd_granularity='subset', sd_scaling='inverted'),
                                    ('only for the samples that keep it', 'run unscaled'), 'scaled by p_l')):
        model = timm.create_model('sd_resnet20', drop_path_rate=0.5, **kwargs)
        text = '\n'.join(_model_lines(model, 'sd_resnet20', 'cifar10', 'last.pth.tar', False))
        assert all(s in text for s in says) and not_said not in text, kwargs


REBUILD_CASES = {
    'gp_max': ('--gp', 'max', '--drop', '0.2'),
    'subsample_subset': ('--model-kwargs', 'shortcut_type=subsample', 'sd_granularity=subset', 'sd_rule=uniform',
                         '--drop-path', '0.3'),
}


@pytest.mark.parametrize('case', sorted(REBUILD_CASES))
def test_one_rebuild_for_training_validation_and_publishing(case, tiny_folder, tmp_path):
    """A run trained with non-default model arguments is the same model when validate --checkpoint and publish
    rebuild it (one rebuild: RunFolder.model), and when users load the published folder through timm."""
    import math
    from timm.models import load_checkpoint
    from sd_zoo.evaluation import validate
    from sd_zoo.publishing import publish
    run = _train(tiny_folder, tmp_path, case, '--model', 'sd_resnet20', *REBUILD_CASES[case])
    checkpoint = run / 'last.pth.tar'
    # the trained model, built here from what the flags mean (not through sd-zoo's rebuild)
    expected_kwargs = dict(gp_max=dict(global_pool='max', drop_rate=0.2),
                           subsample_subset=dict(shortcut_type='subsample', sd_granularity='subset',
                                                 sd_rule='uniform', drop_path_rate=0.3))[case]
    trained = timm.create_model('sd_resnet20', num_classes=10, **expected_kwargs)
    load_checkpoint(trained, str(checkpoint), weights_only=True)
    trained.eval()
    default = timm.create_model('sd_resnet20', num_classes=10).eval()
    load_checkpoint(default, str(checkpoint), weights_only=True)  # the same weights fit the default model too
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(x)
        assert not torch.allclose(default(x), want, atol=1e-4)  # so the arguments matter to the logits
        rebuilt = RunFolder.open(str(checkpoint)).model('sd_resnet20')
        assert torch.equal(rebuilt(x), want)
        staged = tmp_path / 'staged'
        publish(str(run), repo_id='someone/rebuild', checkpoint='last', dry_run=True, out=str(staged))
        published = timm.create_model(f'local-dir:{staged}', pretrained=True).eval()
        assert torch.equal(published(x), want)
    # validate --checkpoint evaluates that model: its loss is the trained model's on the same images
    result = validate('sd_resnet20', checkpoint=str(checkpoint), data_dir=str(tiny_folder), split='test',
                      workers=0, device='cpu', quiet=True)
    data = timm.data.create_dataset('', root=str(tiny_folder), split='test')
    cfg = timm.data.resolve_data_config({}, model=trained)
    transform = timm.data.create_transform(**cfg)
    images = torch.stack([transform(img) for img, _ in data])
    labels = torch.tensor([label for _, label in data])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(trained(images), labels).item()
    assert math.isclose(result['loss'], loss, rel_tol=1e-4), (result['loss'], loss)
