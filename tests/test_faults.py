"""Fault injection: bad inputs, kills and network faults, each against the real thing.

* a table of bad inputs to train / validate / publish / bench / torch.hub / timm.create_model: each must give a
  one-line error that names the problem (exit status 2 from the CLI, or the stated exception type);
* SIGKILLs of a real training run at many points, including inside the checkpoint save, each followed by
  --resume: no epoch lost or repeated in the logs, and final weights equal to an uninterrupted run's;
* a loopback Hub (real HTTP on 127.0.0.1) that refuses, hangs or drops the connection: a one-line error
  within a bounded time, and the staged files intact.
"""
import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import pytest
import timm
import torch
import yaml
from PIL import Image

import sd_zoo
from hub_server import closed_port_endpoint, start_hub, stop_hub
from sd_zoo.runs import RunFolder
from sd_zoo.cli import main
from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


class World:
    """The files the bad inputs refer to, made once per module (small: 32x32 images, 1-epoch run)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.data = make_image_folder(tmp / 'data')
        self.corrupt = make_image_folder(tmp / 'corrupt')
        self.bad_image = self.corrupt / 'train' / 'class3' / '1.png'
        self.bad_image.write_bytes(b'this is not a PNG file')
        self.truncated = make_image_folder(tmp / 'truncated')
        self.cut_image = self.truncated / 'train' / 'class5' / '2.png'
        self.cut_image.write_bytes(self.cut_image.read_bytes()[:300])
        self.other_classes = make_image_folder(tmp / 'other_classes', splits=(('train', 4),))
        make_image_folder(tmp / 'other_classes', classes=3, splits=(('test', 2),))
        (tmp / 'other_classes' / 'test' / 'class2').rename(tmp / 'other_classes' / 'test' / 'zebra')
        self.tiny = make_image_folder(tmp / 'tiny', size=1)
        self.loose = make_image_folder(tmp / 'loose', splits=(('test', 1),))
        Image.new('RGB', (32, 32)).save(self.loose / 'test' / 'stray.png')
        self.junk = tmp / 'junk.pth.tar'
        self.junk.write_bytes(b'not a checkpoint')
        self.a_file = tmp / 'a_file.txt'
        self.a_file.write_text('a file, not a folder')
        self.runs = tmp / 'runs'
        assert main(['train', *self.train_args(), '--experiment', 'run']) == 0
        self.run = self.runs / 'run'
        self.yaml = {}
        for name, text in (('float_epochs', 'epochs: 1.5\n'), ('unknown_key', 'not_a_flag: 3\n'),
                           ('a_list', '- epochs\n- 3\n'), ('broken', 'epochs: [1, 2\n'),
                           ('bad_choice', 'clip_mode: sideways\n'), ('str_lr', 'lr: fast\n'),
                           ('scale_scalar', 'scale: 0.5\n'), ('mean_empty', 'mean: []\n'),
                           ('nested_config', 'config: other.yaml\n')):
            self.yaml[name] = tmp / f'{name}.yaml'
            self.yaml[name].write_text(text)
        self.local = {}
        weights = tmp / 'weights.safetensors'
        from safetensors.torch import save_file
        save_file(timm.create_model('sd_resnet20').state_dict(), str(weights))
        for name, config in (('list', ['sd_resnet20']), ('unknown_arg', dict(architecture='sd_resnet20',
                                                                            model_args=dict(bogus_arg=1))),
                             ('no_arch', dict(model_args={})), ('unknown_arch', dict(architecture='resnet9000'))):
            folder = tmp / f'local_{name}'
            folder.mkdir()
            (folder / 'config.json').write_text(json.dumps(config))
            (folder / 'model.safetensors').write_bytes(weights.read_bytes())
            self.local[name] = folder
        self.foreign_out = tmp / 'foreign_out'
        self.foreign_out.mkdir()
        (self.foreign_out / 'thesis.tex').write_text('the user\'s own file')
        self.broken_run = tmp / 'broken_run'
        self.broken_run.mkdir()
        (self.broken_run / 'last.pth.tar').write_bytes((self.run / 'last.pth.tar').read_bytes())
        (self.broken_run / 'args.yaml').write_text('model: [unclosed\n')
        self.existing_results = tmp / 'earlier_results.json'  # a user's file: never replaced without --overwrite
        self.existing_results.write_text('{"top1": 91.0}')
        self.contradicting_run = tmp / 'contradicting_run'  # an args.yaml edited by hand: two drop-path rates
        self.contradicting_run.mkdir()
        (self.contradicting_run / 'last.pth.tar').write_bytes((self.run / 'last.pth.tar').read_bytes())
        values = yaml.safe_load((self.run / 'args.yaml').read_text())
        values.update(drop_path=0.1, model_kwargs=dict(drop_path_rate=0.2))
        (self.contradicting_run / 'args.yaml').write_text(yaml.safe_dump(values))
        self.odd_inputs_run = tmp / 'odd_inputs_run'  # args.yaml edited by hand: inputs no transform can take
        self.odd_inputs_run.mkdir()
        (self.odd_inputs_run / 'last.pth.tar').write_bytes((self.run / 'last.pth.tar').read_bytes())
        odd = dict(yaml.safe_load((self.run / 'args.yaml').read_text()), crop_pct=0, mean='x')
        (self.odd_inputs_run / 'args.yaml').write_text(yaml.safe_dump(odd))
        self.loose_best = tmp / 'best_alone' / 'model_best.pth.tar'  # kept for its accuracy, nothing says on what
        self.loose_best.parent.mkdir()
        self.loose_best.write_bytes((self.run / 'model_best.pth.tar').read_bytes())
        self.bad_summary_run = tmp / 'bad_summary_run'  # summary.csv edited by hand: text for a loss
        self.bad_summary_run.mkdir()
        for name in ('last.pth.tar', 'args.yaml', 'epochs.csv'):
            (self.bad_summary_run / name).write_bytes((self.run / name).read_bytes())
        rows = (self.run / 'summary.csv').read_text().splitlines()
        cells = rows[1].split(',')
        (self.bad_summary_run / 'summary.csv').write_text('\n'.join([rows[0], ','.join([cells[0], 'x', *cells[2:]])]))
        self.empty_run = tmp / 'empty_run'
        self.empty_run.mkdir()
        self.bare = tmp / 'bare_weights.pth'  # a state_dict alone: no epoch, no optimizer
        torch.save(_checkpoint(self.run / 'last.pth.tar')['state_dict'], self.bare)
        self.foreign = tmp / 'foreign_run' / 'last.pth.tar'  # a checkpoint without args.yaml beside it
        self.foreign.parent.mkdir()
        self.foreign.write_bytes((self.run / 'last.pth.tar').read_bytes())

    def train_args(self, data: Optional[Path] = None) -> List[str]:
        return ['--data-dir', str(data or self.data), '--model', 'sd_resnet20', '--epochs', '1', '-b', '8', '-j', '0',
                '--no-progress', '--cifar-aug', '--val-split', 'test', '--output', str(self.runs), '--lr', '0.05']

    def validate_args(self, data: Optional[Path] = None) -> List[str]:
        return ['--data-dir', str(data or self.data), '--split', 'test', '-j', '0', '-b', '8']


@pytest.fixture(scope='module')
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp('faults'))


class Bad(NamedTuple):
    """A bad input: a CLI argv (exit 2, one ``sd-zoo CMD: error:`` line), or a call that must raise ``error``;
    ``names``: what the message must say."""
    id: str
    make: Callable[[World], object]
    names: str
    error: Optional[type] = None  # None: a CLI argv


_names = itertools.count()


def T(w: World, *extra: str, data: Optional[Path] = None, experiment: str = '') -> List[str]:
    return ['train', *w.train_args(data), '--experiment', experiment or f'e{next(_names)}', *extra]


def V(w: World, *extra: str, data: Optional[Path] = None, model: str = 'sd_resnet20', weights: bool = True) -> List[str]:
    """``sd-zoo validate`` of ``model`` (with its pretrained weights, where it has any and no other weights are
    given) on the world's data."""
    return ['validate', '--model', model, *w.validate_args(data), *(['--pretrained'] if weights else []), *extra]


def P(w: World, *extra: str, source: Optional[Path] = None, out: Optional[Path] = None) -> List[str]:
    return ['publish', str(source or w.run), '--repo-id', 'org/faulty', '--dry-run',
            '--out', str(out or w.tmp / f'staged{next(_names)}'), *extra]


def B(w: World, *extra: str) -> List[str]:
    return ['bench', '--model', 'sd_resnet20', '--skip', 'ddp', 'eval', 'memory', '--steps', '1', '--warmup', '0',
            '--cost-steps', '1', '--batch-size', '2', '--json', str(w.tmp / f'bench{next(_names)}.json'), *extra]


def hub_load(*args, **kwargs):
    return lambda w: lambda: torch.hub.load(str(ROOT), *args, source='local', **kwargs)


def create(*args, forward: Optional[tuple] = None, **kwargs):
    def call():
        model = timm.create_model(*args, **kwargs).eval()
        if forward is not None:
            model(torch.zeros(*forward))
    return lambda w: call


BAD_INPUTS = [
    # sd-zoo train
    Bad('train-model-kwargs-unknown-key', lambda w: T(w, '--model-kwargs', 'bogus_key=1'), 'bogus_key'),
    Bad('train-model-kwargs-vs-drop-path', lambda w: T(w, '--drop-path', '0.5', '--model-kwargs',
                                                       'drop_path_rate=0.2'), 'disagree'),
    Bad('train-model-kwargs-bad-rule', lambda w: T(w, '--model-kwargs', 'sd_rule=zigzag'), "rule 'zigzag'"),
    Bad('train-drop-path-1', lambda w: T(w, '--drop-path', '1.0'), 'drop_path_rate must be in [0, 1)'),
    Bad('train-yaml-float-epochs', lambda w: T(w, '--config', str(w.yaml['float_epochs'])), 'epochs must be int'),
    Bad('train-yaml-nested-config', lambda w: T(w, '--config', str(w.yaml['nested_config'])),
        'has keys that sd-zoo train does not support: config'),
    Bad('train-milestones-unsorted', lambda w: T(w, '--sched', 'multistep', '--decay-milestones', '375', '250'),
        '--decay-milestones must increase, got 375 250'),
    Bad('train-yaml-unknown-key', lambda w: T(w, '--config', str(w.yaml['unknown_key'])), 'not_a_flag'),
    Bad('train-yaml-a-list', lambda w: T(w, '--config', str(w.yaml['a_list'])), 'must be a mapping'),
    Bad('train-yaml-broken', lambda w: T(w, '--config', str(w.yaml['broken'])), 'is not valid YAML'),
    Bad('train-yaml-bad-choice', lambda w: T(w, '--config', str(w.yaml['bad_choice'])), "got 'sideways'"),
    Bad('train-yaml-str-lr', lambda w: T(w, '--config', str(w.yaml['str_lr'])), "lr must be float, got 'fast'"),
    Bad('train-recipe-unknown', lambda w: T(w, '--config', 'no_such_recipe'), 'neither a file nor a recipe'),
    Bad('train-unknown-tag', lambda w: T(w, '--model', 'sd_resnet20.imagenet'), 'unknown tag'),
    Bad('train-unknown-model', lambda w: T(w, '--model', 'resnet9000'), "unknown model 'resnet9000'"),
    Bad('train-num-classes-5-on-10', lambda w: T(w, '--num-classes', '5'), 'has 10 classes but the model has 5'),
    Bad('train-num-classes-0', lambda w: T(w, '--num-classes', '0'), '--num-classes must be at least 1'),
    Bad('train-device-cuda', lambda w: T(w, '--device', 'cuda'), 'no CUDA GPU'),
    Bad('train-device-nonsense', lambda w: T(w, '--device', 'abacus'), "'abacus' is not a device"),
    Bad('train-img-size-1', lambda w: T(w, '--img-size', '1', '--loader', 'timm'), '1x1 pixels'),
    Bad('train-img-size-30', lambda w: T(w, '--img-size', '30', '--loader', 'timm'), '30x30 pixels'),
    Bad('train-1x1-images-in-memory', lambda w: T(w, '--loader', 'memory', data=w.tiny),
        'the images are 1x1 but the model takes 32x32'),
    Bad('train-data-dir-missing', lambda w: T(w, data=w.tmp / 'nowhere'), 'is not a folder'),
    Bad('train-split-missing', lambda w: T(w, '--train-split', 'trian'), "split 'trian' not found"),
    Bad('train-val-split-other-classes', lambda w: T(w, data=w.other_classes), 'differ from the training split'),
    Bad('train-epochs-0', lambda w: T(w, '--epochs', '0'), '--epochs must be at least 1'),
    Bad('train-batch-too-big', lambda w: T(w, '-b', '1000'), 'make no full batch of 1000'),
    Bad('train-val-subset-negative', lambda w: T(w, '--val-subset', '-5'), '--val-subset must be at least 0'),
    Bad('train-val-holdout-too-big', lambda w: T(w, '--val-holdout', '1000'), '--val-holdout 1000 must be between'),
    Bad('train-hflip-2', lambda w: T(w, '--hflip', '2'), '--hflip must be in [0, 1]'),
    Bad('train-smoothing-2', lambda w: T(w, '--smoothing', '2'), '--smoothing must be in [0, 1)'),
    Bad('train-crop-pct-0', lambda w: T(w, '--crop-pct', '0'), '--crop-pct must be in (0, 1]'),
    Bad('train-checkpoint-hist-0', lambda w: T(w, '--checkpoint-hist', '0'), '--checkpoint-hist must be at least 1'),
    Bad('train-resume-missing', lambda w: T(w, '--resume', str(w.tmp / 'gone' / 'last.pth.tar')),
        'no such checkpoint file'),
    Bad('train-resume-junk', lambda w: T(w, '--resume', str(w.junk)), 'cannot resume from'),
    Bad('train-resume-other-model', lambda w: T(w, '--model', 'sd_resnet32', '--resume', str(w.run / 'last.pth.tar')),
        "--model 'sd_resnet20' (now 'sd_resnet32')"),
    Bad('train-resume-foreign-other-model', lambda w: T(w, '--model', 'sd_resnet32', '--epochs', '2', '--resume',
                                                        str(w.foreign)), 'cannot resume from'),
    Bad('train-resume-bare-state-dict', lambda w: T(w, '--resume', str(w.bare)),
        'is not a training checkpoint (it has no epoch, state_dict, optimizer)'),
    Bad('train-resume-other-lr', lambda w: T(w, '--lr', '0.1', '--resume', str(w.run / 'last.pth.tar')),
        '--lr 0.05 (now 0.1)'),
    Bad('train-resume-other-opt', lambda w: T(w, '--opt', 'adamw', '--resume', str(w.run / 'last.pth.tar')),
        "--opt 'sgd' (now 'adamw')"),
    Bad('train-resume-other-holdout', lambda w: T(w, '--val-holdout', '10', '--seed', '3', '--resume',
                                                  str(w.run / 'last.pth.tar')), '--val-holdout 0 (now 10), --seed 42'),
    Bad('train-resume-other-classes', lambda w: T(w, '--num-classes', '12', '--resume', str(w.run / 'last.pth.tar')),
        '--num-classes 10 (now 12)'),
    Bad('train-resume-finished', lambda w: T(w, '--resume', str(w.run / 'last.pth.tar')),
        'the run already finished its 1 epoch (--resume'),
    Bad('train-resume-start-epoch-in-place', lambda w: ['train', *w.train_args(), '--epochs', '3', '--start-epoch', '0',
                                                        '--resume', str(w.run / 'last.pth.tar')],
        '--start-epoch with --resume in the run\'s own folder'),
    Bad('train-decay-epochs-0', lambda w: T(w, '--sched', 'step', '--decay-epochs', '0'),
        '--decay-epochs must be greater than 0'),
    Bad('train-decay-epochs-negative', lambda w: T(w, '--sched', 'step', '--decay-epochs', '-5'),
        '--decay-epochs must be greater than 0'),
    Bad('train-mean-two-values', lambda w: T(w, '--mean', '0.5', '0.5'),
        '--mean takes 1 value or one per input channel (3), got 2'),
    Bad('train-std-three-for-one-channel', lambda w: T(w, '--in-chans', '1', '--std', '0.2', '0.2', '0.2'),
        '--std takes 1 value or one per input channel (1), got 3'),
    Bad('train-yaml-scale-scalar', lambda w: T(w, '--config', str(w.yaml['scale_scalar'])), 'scale takes 2 values'),
    Bad('train-yaml-mean-empty', lambda w: T(w, '--config', str(w.yaml['mean_empty'])), 'mean takes at least one'),
    Bad('train-initial-checkpoint-junk', lambda w: T(w, '--initial-checkpoint', str(w.junk)),
        'is not a timm checkpoint'),
    Bad('train-reuse-experiment', lambda w: T(w, experiment='run'), 'already holds a run'),
    Bad('train-output-under-a-file', lambda w: ['train', *w.train_args(), '--output', str(w.a_file),
                                                 '--experiment', 'x'], 'is a file'),
    Bad('train-corrupt-image-memory', lambda w: T(w, '--loader', 'memory', data=w.corrupt), '1.png'),
    Bad('train-corrupt-image-timm', lambda w: T(w, '--loader', 'timm', data=w.corrupt), 'class3/1.png'),
    Bad('train-corrupt-image-timm-worker', lambda w: T(w, '--loader', 'timm', '-j', '1', data=w.corrupt),
        'class3/1.png'),
    Bad('train-truncated-image-memory', lambda w: T(w, '--loader', 'memory', data=w.truncated), 'class5/2.png'),
    Bad('train-truncated-image-timm', lambda w: T(w, '--loader', 'timm', data=w.truncated), 'class5/2.png'),
    Bad('train-unsupported-dataset', lambda w: T(w, '--dataset', 'torch/mnist'), "unsupported dataset 'torch/mnist'"),
    Bad('train-cifar-not-downloaded', lambda w: ['train', '--dataset', 'torch/cifar10', '--data-dir',
                                                  str(w.tmp / 'no_cifar'), '--model', 'sd_resnet20', '-j', '0',
                                                  '--output', str(w.runs), '--experiment', 'c'],
        '--dataset-download'),
    Bad('train-memory-with-timm-aug', lambda w: [a if a != '--cifar-aug' else '--no-cifar-aug'
                                                 for a in T(w, '--loader', 'memory')],
        'RandomResizedCrop'),
    Bad('train-optimizer-unknown', lambda w: T(w, '--opt', 'sgdd'), 'sgdd'),
    Bad('train-clip-mode', lambda w: T(w, '--clip-mode', 'sideways'), "invalid choice: 'sideways'"),
    # sd-zoo validate
    Bad('validate-results-file-missing-folder', lambda w: V(w, '--results-file', str(w.tmp / 'no' / 'r.json')),
        'does not exist'),
    Bad('validate-results-file-exists', lambda w: V(w, '--results-file', str(w.existing_results)),
        'exists: name another file, or add --overwrite'),
    Bad('validate-results-file-suffix', lambda w: V(w, '--results-file', str(w.tmp / 'r.txt')), '.json or .csv'),
    Bad('validate-checkpoint-missing', lambda w: V(w, '--checkpoint', str(w.tmp / 'nope.pth')), 'does not exist'),
    Bad('validate-checkpoint-junk', lambda w: V(w, '--checkpoint', str(w.junk)), 'is not a timm checkpoint'),
    Bad('validate-checkpoint-other-arch', lambda w: V(w, '--checkpoint', str(w.run / 'last.pth.tar'),
                                                      model='sd_resnet32'), 'do not fit'),
    Bad('validate-config-json-list', lambda w: V(w, model=f'local-dir:{w.local["list"]}'), 'not a timm model config'),
    Bad('validate-config-json-unknown-arg', lambda w: V(w, model=f'local-dir:{w.local["unknown_arg"]}'),
        'bogus_arg'),
    Bad('validate-config-json-no-arch', lambda w: V(w, model=f'local-dir:{w.local["no_arch"]}'),
        'no "architecture"'),
    Bad('validate-config-json-unknown-arch', lambda w: V(w, model=f'local-dir:{w.local["unknown_arch"]}'),
        "'resnet9000', which no installed package registers"),
    Bad('validate-local-dir-missing', lambda w: V(w, model=f'local-dir:{w.tmp / "nowhere"}'), 'is not a folder'),
    Bad('validate-hub-id-invalid', lambda w: V(w, model='hf-hub:not a repo!'), 'is not a Hub repository id'),
    Bad('validate-split-missing', lambda w: V(w, '--split', 'tset'), "split 'tset' not found"),
    Bad('validate-pretrained-num-classes-5', lambda w: V(w, '--num-classes', '5'),
        "pretrained weights have 10 classes: --num-classes 5 would evaluate a new, untrained head"),
    Bad('validate-use-ema-of-pretrained', lambda w: V(w, '--use-ema'), '--use-ema takes the EMA weights of a training'),
    Bad('validate-device-cuda', lambda w: V(w, '--device', 'cuda'), 'no CUDA GPU'),
    Bad('validate-unknown-tag', lambda w: V(w, model='sd_resnet20.imagenet'), 'unknown tag'),
    Bad('validate-corrupt-image', lambda w: V(w, '--split', 'train', data=w.corrupt), 'class3/1.png'),
    Bad('validate-batch-size-0', lambda w: V(w, '-b', '0'), '--batch-size must be at least 1'),
    Bad('validate-no-weights', lambda w: V(w, weights=False), 'no weights to evaluate'),
    Bad('validate-no-pretrained-weights', lambda w: V(w, model='sd_resnet110'), 'sd_resnet110 has no pretrained'),
    Bad('validate-use-ema-without-ema', lambda w: V(w, '--checkpoint', str(w.run / 'last.pth.tar'), '--use-ema'),
        'has no EMA weights'),
    Bad('validate-torch-cifar-validation-split', lambda w: V(w, '--dataset', 'torch/cifar10', '--split', 'validation'),
        "train and test, not 'validation'"),
    Bad('validate-images-outside-class-folders', lambda w: V(w, data=w.loose), "directly in the split folder"),
    Bad('validate-1x1-images-memory', lambda w: V(w, '--loader', 'memory', data=w.tiny), 'the images are 1x1'),
    # sd-zoo publish
    Bad('publish-out-is-a-file', lambda w: P(w, out=w.a_file), 'is a file, not a folder'),
    Bad('publish-out-holds-user-files', lambda w: P(w, out=w.foreign_out), 'thesis.tex'),
    Bad('publish-repo-id-no-org', lambda w: ['publish', str(w.run), '--repo-id', 'noslash', '--dry-run'],
        'is not a Hub repository id'),
    Bad('publish-source-missing', lambda w: P(w, source=w.tmp / 'nowhere'), 'does not exist'),
    Bad('publish-source-junk', lambda w: P(w, '--model', 'sd_resnet20', source=w.junk), 'is not a timm checkpoint'),
    Bad('publish-other-arch', lambda w: P(w, '--model', 'sd_resnet32'), 'do not fit'),
    Bad('publish-baseline-not-constant', lambda w: P(w, '--baseline', str(w.run)), 'constant-depth twin'),
    Bad('publish-args-yaml-broken', lambda w: P(w, source=w.broken_run), 'is not valid YAML'),
    Bad('publish-args-yaml-contradicts-itself', lambda w: P(w, source=w.contradicting_run),
        '--drop-path 0.1 and --model-kwargs drop_path_rate=0.2 disagree'),
    Bad('publish-args-yaml-odd-inputs', lambda w: P(w, source=w.odd_inputs_run), "args.yaml': crop_pct 0 is not a"),
    Bad('validate-args-yaml-odd-inputs', lambda w: V(w, '--checkpoint', str(w.odd_inputs_run / 'last.pth.tar')),
        "args.yaml': crop_pct 0 is not a valid value"),
    Bad('publish-best-without-args', lambda w: P(w, source=w.loose_best),
        'was kept for its accuracy on a split that nothing records'),
    Bad('publish-summary-csv-damaged', lambda w: P(w, source=w.bad_summary_run),
        "summary.csv: epoch '0' has train_loss 'x', not a non-negative number"),
    Bad('publish-split-without-data', lambda w: P(w, '--split', 'val'),
        '--split, --dataset-download and --data-note describe the evaluation'),
    Bad('publish-folder-without-checkpoint', lambda w: P(w, source=w.empty_run), 'has no last.pth.tar'),
    Bad('publish-ema-without-ema', lambda w: P(w, '--ema'), 'has no EMA weights'),
    Bad('publish-best-chosen-on-test', lambda w: P(w, '--checkpoint', 'best'), "kept for its accuracy on the 'test'"),
    # sd-zoo bench
    Bad('bench-model-not-sd', lambda w: B(w, '--model', 'resnet50'),
        'resnet50: not an sd-zoo model, and it has no timm ViT'),
    Bad('bench-model-unknown', lambda w: B(w, '--model', 'resnet_nope'), "unknown --model 'resnet_nope'"),
    Bad('bench-timm-model-compile', lambda w: B(w, '--model', 'convnext_atto', '--compile'),
        '--compile compares sd-zoo ResNets'),
    Bad('bench-steps-0', lambda w: B(w, '--steps', '0'), '--steps must be at least 1'),
    Bad('bench-device-cuda', lambda w: B(w, '--device', 'cuda'), 'no CUDA GPU'),
    Bad('bench-json-missing-folder', lambda w: B(w, '--json', str(w.tmp / 'no' / 'b.json')), 'does not exist'),
    Bad('bench-nothing-to-measure', lambda w: B(w, '--skip', 'train', 'ddp', 'eval', 'memory'), 'nothing to measure'),
    Bad('bench-json-exists', lambda w: B(w, '--json', str(w.run / 'args.yaml')), 'exists: name another file'),
    Bad('bench-torch-dataset-not-downloaded', lambda w: B(w, '--dataset', 'torch/cifar10', '--data-dir', str(w.tmp)),
        'add --dataset-download'),
    Bad('bench-drop-path-1.5', lambda w: B(w, '--drop-path', '1.5'), '--drop-path (1 - p_L) must be in [0, 1)'),
    Bad('bench-data-dir-missing', lambda w: B(w, '--data-dir', str(w.tmp / 'nowhere')), 'is not a folder'),
    Bad('bench-threads-0', lambda w: B(w, '--threads', '0'), '--threads must be at least 1'),
    Bad('bench-img-size-6', lambda w: B(w, '--img-size', '6'), '6x6 pixels'),
    Bad('bench-img-size-6-memory-only', lambda w: B(w, '--img-size', '6', '--skip', 'train', 'ddp', 'eval'),
        '6x6 pixels'),
    Bad('bench-data-images-under-a-batch', lambda w: B(w, '--data-dir', str(w.data), '--data-images', '1'),
        '--data-images 1 make no full batch'),
    # torch.hub (hubconf.py)
    Bad('hub-unknown-kwarg', hub_load('sd_resnet20', bogus_kwarg=1), 'bogus_kwarg', ValueError),
    Bad('hub-pretrained-unknown-kwarg', hub_load('sd_resnet20', pretrained=True, bogus_kwarg=1), 'bogus_kwarg',
        ValueError),
    Bad('hub-local-dir-unknown-kwarg', hub_load('sd_resnet20', pretrained=True, drop_pth_rate=0.1, hub_id=(
        f"local-dir:{sd_zoo.shipped_weights_dir('sd_resnet20.cifar10')}")),
        'sd_resnet20 does not take the argument drop_pth_rate=0.1', ValueError),
    Bad('hub-drop-path-1.5', hub_load('sd_resnet20', drop_path_rate=1.5), 'drop_path_rate must be in [0, 1)',
        ValueError),
    Bad('hub-no-published-weights', hub_load('sd_resnet110', pretrained=True), 'has no published weights',
        ValueError),
    Bad('hub-bad-hub-id', hub_load('sd_resnet20', pretrained=True, hub_id='not a repo!'),
        'is not a Hub repository id', ValueError),
    Bad('hub-unknown-entrypoint', hub_load('sd_resnet9000'), 'sd_resnet9000', RuntimeError),
    Bad('hub-hub-id-without-pretrained', hub_load('sd_resnet20', hub_id='org/some-model'), 'add pretrained=True',
        ValueError),
    # timm.create_model with sd-zoo's models
    Bad('timm-unknown-kwarg', create('sd_resnet20', bogus_kwarg=1), 'bogus_kwarg', TypeError),
    Bad('timm-bad-rule', create('sd_resnet20', sd_rule='zigzag'), "rule 'zigzag'", ValueError),
    Bad('timm-drop-path-string', create('sd_resnet20', drop_path_rate='0.5'), 'must be a number', ValueError),
    Bad('timm-shortcut-type', create('sd_resnet20', shortcut_type='conv'), "shortcut_type 'conv'", ValueError),
    Bad('timm-channels-one-int', create('sd_resnet20', channels=16), '3 positive integers, got 16', ValueError),
    Bad('timm-channels-decreasing', create('sd_resnet20', channels=(64, 32, 16)), 'must not decrease', ValueError),
    Bad('timm-forward-1x1', create('sd_resnet20', forward=(2, 3, 1, 1)), '1x1 pixels', ValueError),
    Bad('timm-forward-0x0', create('sd_resnet20', forward=(2, 3, 0, 0)), '0x0 pixels', ValueError),
    Bad('timm-forward-30x30', create('sd_resnet20', forward=(2, 3, 30, 30)), '30x30 pixels', ValueError),
    Bad('timm-forward-wrong-channels', create('sd_resnet20', forward=(2, 1, 32, 32)), 'set in_chans', ValueError),
    # the Python API
    Bad('api-train-unknown-option', lambda w: lambda: sd_zoo.train('smoke_sd', batchsize=8), 'no option batchsize',
        ValueError),
    Bad('api-validate-results-file', lambda w: lambda: sd_zoo.validate(
        'sd_resnet20', data_dir=str(w.data), results_file=str(w.tmp / 'no' / 'r.csv')), 'does not exist', ValueError),
]


def run_cli(argv: List[str], capsys) -> tuple:
    """(exit status, stderr) of ``sd-zoo ARGV`` run in this process (argparse errors exit by SystemExit)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def show(label: str, message: str) -> None:
    """To read the messages themselves: SD_ZOO_SHOW_ERRORS=1 pytest -s tests/test_faults.py"""
    if os.environ.get('SD_ZOO_SHOW_ERRORS'):
        print(f'\n{label}: {message}', file=sys.__stdout__)


def error_lines(err: str, command: str) -> List[str]:
    return [line for line in err.splitlines() if line.startswith(f'sd-zoo {command}: error:')]


@pytest.mark.parametrize('bad', BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(bad: Bad, world: World, capsys):
    made = bad.make(world)
    if bad.error is None:
        rc, err = run_cli(made, capsys)
        assert 'Traceback' not in err, err[-3000:]
        lines = error_lines(err, made[0])
        assert rc == 2 and len(lines) == 1, err[-3000:]
        assert bad.names in lines[0], lines[0]
        message = lines[0]
    else:
        with pytest.raises(bad.error) as info:
            made()
        message = str(info.value)
        assert bad.names in message and '\n' not in message.strip(), message
    show(bad.id, message)


def test_the_table_is_large_and_covers_every_entry_point():
    assert len(BAD_INPUTS) >= 40 and len({b.id for b in BAD_INPUTS}) == len(BAD_INPUTS)
    kinds = {b.id.split('-')[0] for b in BAD_INPUTS}
    assert {'train', 'validate', 'publish', 'bench', 'hub', 'timm', 'api'} <= kinds


def test_results_file_is_checked_before_evaluating(world: World, capsys, monkeypatch):
    import sd_zoo.evaluation as evaluation

    def no_evaluation(*a, **k):
        raise AssertionError('evaluated although the results file cannot be written')
    monkeypatch.setattr(evaluation, 'evaluate', no_evaluation)
    rc, err = run_cli(V(world, '--results-file', str(world.tmp / 'missing' / 'r.json')), capsys)
    assert rc == 2 and 'does not exist' in err


def test_corrupt_image_is_never_replaced_by_a_neighbour(world: World):
    """timm's ImageDataset would log a warning and return the next image; sd-zoo's names the file."""
    from sd_zoo.data import DataSource, read_split
    ds = read_split(DataSource(root=str(world.corrupt)), 'train')
    bad = [i for i, (path, _) in enumerate(ds.reader.samples) if path == str(world.bad_image)][0]
    img, label = ds[bad - 1]  # its neighbours read fine
    assert img.size == (32, 32)
    with pytest.raises(ValueError, match='class3/1.png'):
        ds[bad]


def test_reused_output_folder_is_untouched(world: World, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in world.run.iterdir()}
    rc, err = run_cli(T(world, experiment='run'), capsys)
    assert rc == 2 and f'--resume {world.run / "last.pth.tar"}' in err
    assert {p.name: p.stat().st_mtime_ns for p in world.run.iterdir()} == before


# ---------------------------------------------------------------------------------------------- resume and runs


def _files(folder: Path) -> Dict[str, tuple]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_resume_of_a_run_without_ema_starts_the_ema_from_its_weights(world: World, tmp_path: Path):
    """With a decay of 1 the EMA never moves: it must hold the resumed weights, not the untrained ones."""
    assert main(['train', *world.train_args(), '--output', str(tmp_path), '--experiment', 'ema', '--epochs', '2',
                 '--model-ema', '--model-ema-decay', '1.0', '--resume', str(world.run / 'last.pth.tar')]) == 0
    resumed, ema = _state(world.run / 'last.pth.tar'), _checkpoint(tmp_path / 'ema' / 'last.pth.tar')['state_dict_ema']
    floats = [k for k, v in resumed.items() if v.is_floating_point()]
    assert floats and all(torch.equal(ema[k], resumed[k]) for k in floats)


def test_resume_of_a_finished_run_is_an_error_that_touches_nothing(world: World, capsys):
    before = _files(world.run)
    rc, err = run_cli(['train', *world.train_args(), '--resume', str(world.run / 'last.pth.tar')], capsys)
    lines = error_lines(err, 'train')
    assert rc == 2 and len(lines) == 1 and 'the run already finished its 1 epoch' in lines[0], err[-3000:]
    assert 'give a larger --epochs' in lines[0] and _files(world.run) == before  # results.json not rewritten


def test_test_split_of_a_local_dir_model_is_evaluated(world: World, tmp_path: Path):
    """--val-holdout reports the test split at the best epoch, with the model built as for training."""
    from timm.models import save_for_hf
    folder = tmp_path / 'local_sd_resnet20'
    save_for_hf(timm.create_model('sd_resnet20'), folder, safe_serialization=True)  # config.json with 32x32 input
    assert main(['train', *world.train_args(), '--model', f'local-dir:{folder}', '--val-holdout', '10',
                 '--model-ema', '--output', str(tmp_path), '--experiment', 'local']) == 0
    results = json.loads((tmp_path / 'local' / 'results.json').read_text())
    assert results['test']['split'] == 'test' and results['test']['epoch'] == results['best_epoch'] == 0
    assert 0 <= results['test']['top1'] <= 100


def test_sched_none_keeps_the_lr_through_epochs_and_a_resume(world: World, tmp_path: Path):
    args = [*world.train_args(), '--output', str(tmp_path), '--sched', 'none', '--warmup-epochs', '1']
    assert main(['train', *args, '--experiment', 'none', '--epochs', '2']) == 0
    assert main(['train', *args, '--epochs', '3', '--resume', str(tmp_path / 'none' / 'last.pth.tar')]) == 0
    rows = _rows(tmp_path / 'none' / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1', '2'] and {float(r['lr']) for r in rows} == {0.05}


def test_in_place_resume_from_an_older_checkpoint_keeps_the_later_epochs(world: World, tmp_path: Path, capsys):
    args = [*world.train_args(), '--output', str(tmp_path), '--epochs', '2']
    assert main(['train', *args, '--experiment', 'run']) == 0
    run = tmp_path / 'run'
    before = _files(run)
    rc, err = run_cli(['train', *args, '--epochs', '3', '--resume', str(run / 'checkpoint-0.pth.tar')], capsys)
    lines = error_lines(err, 'train')
    assert rc == 2 and len(lines) == 1 and 'would drop epoch 1 ' in lines[0] and '--experiment NAME' in lines[0]
    assert _files(run) == before  # no row dropped, no checkpoint replaced
    # from that epoch in a new folder, and the run itself from its last.pth.tar, both work
    assert main(['train', *args, '--experiment', 'branch', '--resume', str(run / 'checkpoint-0.pth.tar')]) == 0
    assert [r['epoch'] for r in _rows(tmp_path / 'branch' / 'summary.csv')] == ['1']
    assert main(['train', *args, '--epochs', '3', '--resume', str(run / 'last.pth.tar')]) == 0
    assert [r['epoch'] for r in _rows(run / 'summary.csv')] == ['0', '1', '2']


# ---------------------------------------------------------------------------------------------- kills


KILL_ARGS = ['--model', 'sd_resnet20', '--epochs', '3', '-b', '16', '-j', '0', '--no-progress', '--log-interval', '1',
             '--cifar-aug', '--loader', 'memory', '--seed', '7', '--val-split', 'test', '--lr', '0.05',
             '--sched', 'multistep', '--decay-milestones', '2']


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _env(**extra) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    env.update(extra)
    return env


def _run_until(cmd: List[str], marker: str, timeout: float = 300) -> str:
    """Start ``cmd`` with a pause at each point of an epoch's save (tests/slow_save.py), SIGKILL it the moment
    ``marker`` appears in its output; returns that output."""
    cmd = [sys.executable, str(ROOT / 'tests' / 'slow_save.py'), *cmd[3:]]  # cmd: python -m sd_zoo.cli ...
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_env())
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, 'the marker never came'
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = ''.join(seen)
    assert marker in out, out[-3000:]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out


def _train_cmd(data: Path, out: Path, *extra: str) -> List[str]:
    return [sys.executable, '-m', 'sd_zoo.cli', 'train', '--data-dir', str(data), *KILL_ARGS, '--output', str(out),
            *extra]


def _checkpoint(path: Path) -> Dict:
    from timm.utils import load_checkpoint_metadata  # weights_only, with timm's allowlist (argparse.Namespace)
    return load_checkpoint_metadata(str(path))


def _state(path: Path) -> Dict[str, torch.Tensor]:
    return _checkpoint(path)['state_dict']


@pytest.fixture(scope='module')
def kill_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('kill_data'), splits=(('train', 6), ('test', 2)), seed=3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kills_at_many_points_lose_and_repeat_nothing(kill_data: Path, tmp_path: Path):
    # an uninterrupted pair first: the run is deterministic, so "equal to an uninterrupted run" means something
    out = tmp_path / 'runs'
    for name in ('ref', 'ref2'):
        res = subprocess.run(_train_cmd(kill_data, out, '--experiment', name), capture_output=True, text=True,
                             env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    ref = _state(out / 'ref' / 'last.pth.tar')
    assert all(torch.equal(ref[k], v) for k, v in _state(out / 'ref2' / 'last.pth.tar').items())
    assert (out / 'ref' / 'summary.csv').read_text() == (out / 'ref2' / 'summary.csv').read_text()

    run = out / 'killed'
    resume = [*_train_cmd(kill_data, out, '--experiment', 'killed'), '--resume', str(run / 'last.pth.tar')]
    kill_points = [  # (where the run is killed, the checkpoint's epoch and the logged epochs right after)
        ('SLOW_SAVE checkpoint-saved epoch 0', 0, []),  # checkpoint in place, its rows not written
        ('epoch 1 [2/3]', 0, [0]),  # in the middle of an epoch (the resume restored row 0 first)
        ('SLOW_SAVE checkpoint-written epoch 1', 0, [0]),  # complete in tmp.pth.tar, not in place
        ('SLOW_SAVE checkpoint-written epoch 2', 1, [0, 1]),
        ('SLOW_SAVE logs-written epoch 2', 2, [0, 1, 2]),  # all rows, no results.json yet
    ]
    survived = 0
    for i, (marker, checkpoint_epoch, logged) in enumerate(kill_points):
        _run_until(resume if i else _train_cmd(kill_data, out, '--experiment', 'killed'), marker)
        assert _checkpoint(run / 'last.pth.tar')['epoch'] == checkpoint_epoch
        for name in ('summary.csv', 'epochs.csv'):
            epochs = [int(r['epoch']) for r in _rows(run / name)] if (run / name).exists() else []
            assert epochs == logged, (marker, name, epochs)  # never a repeated row, even right after a kill
        survived += 1
    assert not (run / 'results.json').exists()
    res = subprocess.run(resume, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ('summary.csv', 'epochs.csv'):
        assert [int(r['epoch']) for r in _rows(run / name)] == [0, 1, 2], name  # none lost, none repeated
    # the resumed run computed exactly what the uninterrupted one did: the same rows, the same weights
    assert (run / 'summary.csv').read_text() == (out / 'ref' / 'summary.csv').read_text()
    final = _state(run / 'last.pth.tar')
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref)
    results = json.loads((run / 'results.json').read_text())
    assert results['best_epoch'] == json.loads((out / 'ref' / 'results.json').read_text())['best_epoch']
    assert survived == len(kill_points)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_in_the_first_save_leaves_a_resume_error_that_says_what_is_left(kill_data: Path, tmp_path: Path,
                                                                              capsys):
    out = tmp_path / 'runs'
    _run_until(_train_cmd(kill_data, out, '--experiment', 'first'), 'SLOW_SAVE checkpoint-written epoch 0')
    run = out / 'first'
    assert not (run / 'last.pth.tar').exists() and (run / 'tmp.pth.tar').exists()
    rc, err = run_cli(['train', '--data-dir', str(kill_data), *KILL_ARGS, '--resume', str(run / 'last.pth.tar')],
                      capsys)
    lines = error_lines(err, 'train')
    assert rc == 2 and len(lines) == 1 and 'tmp.pth.tar' in lines[0] and 'no epoch finished' in lines[0]
    # and the folder is not reused by accident either
    rc, err = run_cli(['train', '--data-dir', str(kill_data), *KILL_ARGS, '--output', str(out), '--experiment',
                       'first'], capsys)
    assert rc == 2 and 'already holds a run' in err


def test_resume_reconciles_logs_with_the_checkpoint(tmp_path: Path):
    """Rows after the checkpoint's epoch go (they run again); a missing row of its epoch comes back from the
    record written before the checkpoint."""
    from sd_zoo.runs import append_log_rows, reconcile_logs, write_epoch_record
    records = [dict(epoch=e, train_metrics=dict(loss=1.0 / (e + 1)), lr=0.1, eval_metrics=dict(loss=2.0, top1=10.0 * e,
                                                                                                  top5=50.0),
                    stats=dict(loss=1.0 / (e + 1), wall_s=1.5, images_per_s=100.0, mean_active_blocks=7.0,
                               num_blocks=9)) for e in range(4)]
    for r in records:
        append_log_rows(str(tmp_path), r)
    full = {n: (tmp_path / n).read_text() for n in ('summary.csv', 'epochs.csv')}
    # an older sd-zoo wrote rows 2 and 3 before a kill took their checkpoints: the checkpoint is epoch 1
    reconcile_logs(str(tmp_path), 1)
    assert [r['epoch'] for r in _rows(tmp_path / 'summary.csv')] == ['0', '1']
    assert [r['epoch'] for r in _rows(tmp_path / 'epochs.csv')] == ['0', '1']
    # the kill came between checkpoint 2 and its rows: the record restores them, byte for byte
    write_epoch_record(str(tmp_path), records[2])
    reconcile_logs(str(tmp_path), 2)
    for r in records[3:]:
        append_log_rows(str(tmp_path), r)
    assert {n: (tmp_path / n).read_text() for n in full} == full
    # a record of another epoch restores nothing
    reconcile_logs(str(tmp_path), 3)
    write_epoch_record(str(tmp_path), records[1])
    (tmp_path / 'summary.csv').write_text(''.join(full['summary.csv'].splitlines(keepends=True)[:-1]))
    reconcile_logs(str(tmp_path), 3)
    assert [r['epoch'] for r in _rows(tmp_path / 'summary.csv')] == ['0', '1', '2']


# ---------------------------------------------------------------------------------------------- network


HUB_FAULTS = [('refuse', ''), ('hang', '/api/repos/create'), ('hang', '/commit/'), ('drop', '/api/repos/create'),
              ('drop', '/commit/')]


def _faulty_hub(mode: str, path: str):
    if mode == 'refuse':
        return None, None, closed_port_endpoint()
    server, state, endpoint = start_hub()
    state.fault, state.fault_path = mode, path
    return server, state, endpoint


@pytest.mark.parametrize('mode,path', HUB_FAULTS, ids=[f'{m}{p.replace("/", "-")}' for m, p in HUB_FAULTS])
def test_publish_to_a_faulty_hub(mode: str, path: str, world: World, hub_env, capsys, tmp_path):
    server, state, endpoint = _faulty_hub(mode, path)
    hub_env(endpoint)
    staged = tmp_path / 'staged'
    try:
        start = time.monotonic()
        rc, err = run_cli(['publish', str(world.run), '--repo-id', 'org/faulty', '--checkpoint', 'last',
                           '--out', str(staged), '--token', 'hf_test'], capsys)
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            stop_hub(server)
    lines = error_lines(err, 'publish')
    assert rc == 2 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    show(f'publish-{mode}{path} ({elapsed:.1f} s)', lines[0])
    assert "pushing to 'org/faulty' failed" in lines[0] and f'intact in {staged}' in lines[0]
    assert elapsed < 40, elapsed  # staging takes a few seconds; the Hub may take SD_ZOO_HUB_TIMEOUT (2 s) more
    if state is not None:
        assert state.faulted >= 1 and state.commits == []  # the fault was met; nothing was half-published
    # the staged files are intact: they load and reproduce the trained model
    from sd_zoo.loading import load_model
    from sd_zoo.publishing import STAGED_FILES, STAGING_MARKER
    assert sorted(p.name for p in staged.iterdir()) == sorted(STAGED_FILES + (STAGING_MARKER,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trained = RunFolder.open(str(world.run / 'last.pth.tar')).model('sd_resnet20')
        assert torch.equal(load_model(f'local-dir:{staged}')(x), trained(x))


DOWNLOAD_FAULTS = [('refuse', '', 'Connection refused'), ('hang', '/resolve/', 'gave no answer in 2 s'),
                   ('drop', '/resolve/', 'Server disconnected'), ('offline', '', 'HF_HUB_OFFLINE is set')]


@pytest.mark.parametrize('mode,path,names', DOWNLOAD_FAULTS, ids=[d[0] for d in DOWNLOAD_FAULTS])
def test_loading_from_a_faulty_hub_says_so(mode: str, path: str, names: str, world: World, hub_env, capsys):
    """An offline or unreachable Hub is never reported as 'not a timm model repository'."""
    server, state, endpoint = _faulty_hub('refuse' if mode == 'offline' else mode, path)
    hub_env(endpoint, offline=mode == 'offline')
    try:
        start = time.monotonic()
        rc, err = run_cli(V(world, model='hf-hub:org/some-model'), capsys)
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            stop_hub(server)
    lines = error_lines(err, 'validate')
    assert rc == 2 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    show(f'download-{mode} ({elapsed:.1f} s)', lines[0])
    assert names in lines[0] and 'not a timm model repository' not in lines[0], lines[0]
    assert elapsed < 30, elapsed
    assert state is None or state.faulted >= 1  # the request did reach the faulty loopback Hub


@pytest.mark.slow
def test_publish_command_against_a_hanging_hub_exits_in_bounded_time(world: World, tmp_path):
    """The real command in its own process: no thread left waiting on the silent Hub keeps it alive."""
    server, state, endpoint = _faulty_hub('hang', '/commit/')
    staged = tmp_path / 'staged'
    env = _env(HF_ENDPOINT=endpoint, HF_TOKEN='hf_test', HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', SD_ZOO_HUB_TIMEOUT='3')
    try:
        start = time.monotonic()
        res = subprocess.run([sys.executable, '-m', 'sd_zoo.cli', 'publish', str(world.run), '--repo-id', 'org/hang',
                              '--checkpoint', 'last', '--out', str(staged)], capture_output=True, text=True, env=env,
                             timeout=300)
        elapsed = time.monotonic() - start
    finally:
        stop_hub(server)
    assert res.returncode == 2 and 'gave no answer in 3 s' in res.stderr, res.stderr[-3000:]
    assert elapsed < 120 and state.faulted >= 1 and state.commits == []
    assert (staged / 'model.safetensors').is_file()


def test_a_hub_repo_with_pickle_weights_only_is_named_without_downloading_them(hub_env):
    """The error lists the repo's pickle files from their metadata: sd-zoo never downloads (nor unpickles)
    them. A pinned revision (hf-hub:ORG/NAME@REV) is the revision read."""
    from sd_zoo.loading import load_published
    server, state, endpoint = start_hub()
    hub_env(endpoint)
    config = json.dumps(dict(architecture='sd_resnet20', num_classes=10)).encode()
    state.repos['org/pickled'] = {'main': {'sha': 'a' * 40, 'files': {'config.json': config,
                                                                     'pytorch_model.bin': b'pickle bytes'}}}
    try:
        with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\)"):
            load_published('hf-hub:org/pickled')
        assert ('GET', '/org/pickled/resolve/main/pytorch_model.bin') not in state.requests
        with pytest.raises(ValueError, match="no revision 'v2'"):
            load_published('hf-hub:org/pickled@v2')
    finally:
        stop_hub(server)
