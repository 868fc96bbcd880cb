"""``sd-zoo train``: a training command built on timm's library.

timm does the work: ``timm.data`` (datasets, transforms, mixup), ``timm.optim``, ``timm.scheduler``,
``timm.task`` (loss, DDP wrapping, EMA, checkpoint state) and ``timm.utils`` (CheckpointSaver, summary,
distributed set-up). Flags and ``--config`` YAML keys use timm train.py's names, and the output folder has
timm's layout (args.yaml, summary.csv, last.pth.tar, model_best.pth.tar), so checkpoints move freely
between this command and timm's scripts. What sd-zoo adds for the paper's recipes:

* ``--cifar-aug``: 4-pixel zero padding + random 32x32 crop + horizontal flip (timm has no such transform);
* ``--val-holdout N``: hold N training images out for validation, and report the test split at the best
  validation epoch (the paper's protocol);
* the wall-clock time of every epoch and the mean number of active blocks, in ``epochs.csv``;
* resume continues the gate sequence where it stopped.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import yaml
from timm.utils import CheckpointSaver, ParseKwargs

from .data import DATASET_CHOICES_HELP, LOADERS, Augmentation, DataSource, build_loaders, check_class_count, \
    TORCH_DATASETS, image_mode, resolve_data_config, set_loader_epoch
from .engine import NonFiniteLoss, default_device, evaluate, train_one_epoch, training_dtype
from .loading import check_model_name, load_weights
from .models.sd_resnet_cifar import arch_depth
from .recipes import resolve_recipe
from .runs import EPOCH_RECORD, RunFolder, RunFolderLock, append_log_rows, create_run_model, epochs_done, \
    model_kwargs_of, read_epoch_record, reconcile_logs, write_atomic, write_epoch_record
from .stochastic_depth import compile_blocks, set_gate_seed

_logger = logging.getLogger('sd_zoo.train')

def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='sd-zoo train', description='Train a model with timm\'s library (timm train.py flag names).')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML config: keys are train.py flag names')
    g = p.add_argument_group('dataset')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (image folder with splits)')
    g.add_argument('--dataset', default='', help=f'dataset type: {DATASET_CHOICES_HELP}')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--test-split', default=None, help='evaluated at the best validation epoch (with --val-holdout'
                                                      ' it defaults to --val-split)')
    g.add_argument('--dataset-download', action='store_true', default=False, help='download torch/* datasets')
    g.add_argument('--loader', default='auto', choices=LOADERS,
                   help='memory: decode the data set once, hold it on the device and augment whole batches there; '
                        'timm: timm\'s DataLoader with PIL transforms in workers; auto (default): memory where it '
                        'gives the same images and the data fits')
    g.add_argument('--val-holdout', type=int, default=0, metavar='N',
                   help='hold N training images out as the validation set (the paper holds out 5000)')
    g.add_argument('--train-subset', type=int, default=0, metavar='N', help='train on N random images only')
    g.add_argument('--val-subset', type=int, default=0, metavar='N', help='validate/test on N random images only')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='sd_resnet110')
    g.add_argument('--pretrained', action='store_true', default=False)
    g.add_argument('--initial-checkpoint', default='', metavar='PATH')
    g.add_argument('--resume', default='', metavar='PATH', help='resume model, optimizer and epoch from checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', default=False)
    g.add_argument('--num-classes', type=int, default=None)
    g.add_argument('--gp', default=None, help='global pool type')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--in-chans', type=int, default=None)
    g.add_argument('--input-img-mode', default=None, choices=('RGB', 'L'),
                   help='PIL mode of the images (default: L for --in-chans 1, else RGB)')
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('-b', '--batch-size', type=int, default=128)
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                   help='channels_last memory format (--no-channels-last undoes a recipe\'s)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='compile the residual branches (sd_zoo.compile_blocks) with this backend')
    g.add_argument('--device', default=None, help="'cpu', 'cuda' (default: cuda if available)")
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='modules to import first')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision: on a CPU, bfloat16 autocast where the CPU computes it natively (AVX512-BF16 '
                        '/ AMX), float32 elsewhere (the log says which); --no-amp undoes a recipe\'s')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--opt-eps', default=None, type=float)
    g.add_argument('--opt-betas', default=None, type=float, nargs='+')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)
    g = p.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='multistep')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--epochs', type=int, default=500)
    g.add_argument('--start-epoch', type=int, default=None)
    g.add_argument('--decay-milestones', default=[250, 375], type=int, nargs='+')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--patience-epochs', type=int, default=10)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    g = p.add_argument_group('augmentation and regularization')
    g.add_argument('--cifar-aug', action=argparse.BooleanOptionalAction, default=None,
                   help='4-pixel pad + random 32x32 crop + horizontal flip (the paper) instead of timm\'s transform '
                        '(default: on for the CIFAR-family models, off for the others)')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='RandomResizedCrop scale (timm aug)')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='RandomResizedCrop ratio')
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier (drop_rate)')
    g.add_argument('--drop-path', type=float, default=None, help='1 - p_L (model default 0.5; 0: constant depth)')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                   help='keep an EMA of the weights (--no-model-ema undoes a recipe\'s)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, help='log every N batches when there is no progress bar')
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--output', default='', metavar='DIR', help='parent of the experiment folder (./output/train)')
    g.add_argument('--experiment', default='', help='experiment folder name (default: date-model)')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    g.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags, with ``--config`` YAML values (a recipe name or a file) as defaults. Unsupported keys are
    an error, never ignored."""
    parser = build_train_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    pre, remaining = config_parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    return parser.parse_args(remaining)


def make_train_args(config: str = '', **options) -> argparse.Namespace:
    """The arguments of a Python ``train()`` call: flag defaults, then the recipe, then ``options``, each of
    the type its flag takes (``epochs='2'`` is a TypeError naming it, not a crash deep inside)."""
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f'train(): config must be a recipe name or a YAML file path, got {type(config).__name__}')
    parser = build_train_parser()
    values = vars(parser.parse_args([]))
    if config:
        values.update(load_config(os.fspath(config), parser), config=os.fspath(config))
    unknown = sorted(k for k in options if k not in values)
    if unknown:
        raise ValueError(f'train() has no option {", ".join(unknown)} (options are sd-zoo train\'s flags with _)')
    actions = {a.dest: a for a in parser._actions}
    for key, value in options.items():
        _check_option_type(actions[key], key, value)
    values.update(options)
    return argparse.Namespace(**values)


def _check_option_type(action: argparse.Action, key: str, value: Any) -> None:
    """A Python option has its flag's type: int (not bool) for an int flag, a number for a float flag, a bool
    for an on/off flag, a list of them for a flag of several values; None only where the flag's default is."""
    if value is None and action.default is None:
        return
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        ok, want = isinstance(value, bool), 'a bool'
    elif isinstance(action, ParseKwargs):
        ok, want = isinstance(value, dict), 'a dict'
    else:
        kind = action.type or str
        one = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
            (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else \
            (lambda v: isinstance(v, (str, os.PathLike)))
        several = action.nargs not in (None, '?')
        ok = all(one(v) for v in value) if several and isinstance(value, (list, tuple)) else \
            not several and one(value)
        name = dict(int='an int', float='a number', str='a str')[kind.__name__]
        want = f'a list of {name.split()[1]}s' if several else name
    if not ok:
        raise TypeError(f'train(): {key} must be {want}, got {value!r:.80}')


_YAML11_FLOAT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')  # 1e-3: a float that YAML 1.1 reads as text


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value as the flag would parse it (``epochs: 1.5`` is an error, not a crash later; ``lr: 1e-3``,
    which YAML 1.1 reads as a string, is the number it means)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)) and \
            not isinstance(value, bool):
        raise ValueError(f'config file {path!r}: {key} must be true or false, got {value!r}')
    if value is None or action.type is None or isinstance(action, argparse._StoreConstAction):
        return value
    values = _nargs_values(action, key, value, path)
    try:
        out = []
        for v in values:
            if action.type is float and isinstance(v, str) and _YAML11_FLOAT.fullmatch(v):
                v = float(v)
            if action.type in (int, float) and isinstance(v, (bool, str)) or (action.type is int and v != int(v)):
                raise ValueError(v)
            out.append(action.type(v))
    except (TypeError, ValueError):
        raise ValueError(f'config file {path!r}: {key} must be {action.type.__name__}, got {value!r}') from None
    return out[0] if action.nargs in (None, '?') else out


def _nargs_values(action: argparse.Action, key: str, value: Any, path: str) -> List[Any]:
    """The YAML value as the list of values the flag takes on the command line: a scalar of a list flag
    (``decay_milestones: 250``) is a one-element list; a flag of a fixed count gets exactly that many."""
    if action.nargs in (None, '?'):
        if isinstance(value, list):
            raise ValueError(f'config file {path!r}: {key} takes one value, not a list')
        return [value]
    values = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise ValueError(f'config file {path!r}: {key} takes {action.nargs} values, got {value!r}')
    if action.nargs == '+' and not values:
        raise ValueError(f'config file {path!r}: {key} takes at least one value, got []')
    return values


def _check_choice(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value of a flag with choices must be one of them, as on the command line."""
    if action.choices is not None and value is not None:
        for v in value if isinstance(value, list) else [value]:
            if v not in action.choices:
                raise ValueError(f'config file {path!r}: {key} must be one of {", ".join(map(str, action.choices))}'
                                 f', got {v!r}')
    return value


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    path = resolve_recipe(path)
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'config file {path!r} is not valid YAML: {str(e).splitlines()[0]}') from e
    if not isinstance(cfg, dict):
        raise ValueError(f'config file {path!r} must be a mapping of train.py flag names to values')
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in actions)
    if unknown:
        raise ValueError(f'config file {path!r} has keys that sd-zoo train does not support: {", ".join(unknown)}'
                         f' (keys are train.py flag names with - as _; see sd-zoo train --help)')
    return {k: _check_choice(actions[k], k, _coerce(actions[k], k, v, path), path) for k, v in cfg.items()}


# the least value of each count (None: unset is fine), and the range of each probability
_AT_LEAST = dict(lr=0.0, warmup_lr=0.0, min_lr=0.0, weight_decay=0.0, momentum=0.0, batch_size=1, epochs=1,
                 grad_accum_steps=1, checkpoint_hist=1, workers=0, val_holdout=0,
                 train_subset=0, val_subset=0, warmup_epochs=0, cooldown_epochs=0, log_interval=0, num_classes=1,
                 in_chans=1, img_size=1, validation_batch_size=1, start_epoch=0)
_IN_RANGE = dict(hflip=(0.0, 1.0, True), smoothing=(0.0, 1.0, False), drop=(0.0, 1.0, False),
                 mixup=(0.0, float('inf'), False), cutmix=(0.0, float('inf'), False))


def check_train_args(args: argparse.Namespace) -> None:
    """Every bad value is an error before any work; never a crash or an AssertionError an epoch later, and
    never a silent change (a negative --val-subset would slice off images, a NaN --lr trains on NaN)."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f'--{name.replace("_", "-")} must be a finite number, got {bad[0]}')
    for name, least in _AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f'--{name.replace("_", "-")} must be at least {least}, got {value}')
    for name, (low, high, closed) in _IN_RANGE.items():
        value = getattr(args, name)
        if value is not None and not (low <= value <= high if closed else low <= value < high):
            raise ValueError(f'--{name.replace("_", "-")} must be in [{low:g}, {high:g}{"]" if closed else ")"}, '
                             f'got {value}')
    if args.decay_epochs is not None and args.decay_epochs <= 0:
        raise ValueError(f'--decay-epochs must be greater than 0, got {args.decay_epochs:g}')
    if args.sched == 'plateau' and args.sched_on_updates:
        raise ValueError('--sched plateau steps once per epoch: drop --sched-on-updates')
    _check_normalization(args)
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume {args.resume!r}: no such checkpoint file{_left_behind(args.resume)}')
    if not args.model.startswith(('hf-hub:', 'local-dir:')):
        check_model_name(args.model)


def _check_normalization(args) -> None:
    """--mean/--std take one value (for every channel) or one per input channel, as timm's data config
    asserts (its channel count: --in-chans, else 3)."""
    channels = args.in_chans or 3
    for flag, values in (('--mean', args.mean), ('--std', args.std)):
        if values is not None and len(values) not in (1, channels):
            raise ValueError(f'{flag} takes 1 value or one per input channel ({channels}), got {len(values)}: '
                             f'{" ".join(f"{v:g}" for v in values)}')


def _numbered_checkpoints(folder: str):
    """(epoch, name) of the checkpoint-N.pth.tar files in ``folder``, newest first."""
    found = [(int(m.group(1)), n) for n in os.listdir(folder) if (m := re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', n))]
    return sorted(found, reverse=True)


def _left_behind(resume: str) -> str:
    """What an interrupted run left in the folder of a missing --resume file, for the error message."""
    folder = os.path.dirname(os.path.abspath(resume))
    if not os.path.isdir(folder):
        return ''
    numbered = _numbered_checkpoints(folder)
    if os.path.isfile(os.path.join(folder, 'last.pth.tar')):
        return f' (the run\'s latest checkpoint is {os.path.join(folder, "last.pth.tar")})'
    if numbered:
        return (f'; the newest checkpoint in {folder!r} is {numbered[0][1]} (epoch {numbered[0][0]}): resume from '
                f'{os.path.join(folder, numbered[0][1])}')
    if os.path.isfile(os.path.join(folder, 'tmp.pth.tar')):
        return (f'; {folder!r} holds only tmp.pth.tar, the interrupted first save of the run (maybe incomplete), so '
                f'no epoch finished: start the run again with another --experiment (or delete the folder)')
    return f'; {folder!r} holds no checkpoint'


# ---------------------------------------------------------------------------------------------- driver

# the files a run writes into its folder: a new run never writes into a folder that holds any of them
RUN_FILES = ('args.yaml', 'summary.csv', 'epochs.csv', 'results.json', 'last.pth.tar', 'model_best.pth.tar',
             'tmp.pth.tar', EPOCH_RECORD)


def _output_dir(args) -> str:
    """--output/--experiment; a resume without --experiment continues the run in the checkpoint's folder
    (unless --output names another parent folder), so the same command plus --resume continues the run."""
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else ''
    if run_dir and not args.experiment and (not args.output or os.path.abspath(args.output) ==
                                            os.path.dirname(run_dir)):
        return run_dir
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_')])
    return os.path.join(args.output or os.path.join('.', 'output', 'train'), name)


def _resumes_in_place(args, output_dir: str) -> bool:
    return bool(args.resume) and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir)


def check_output_dir(args, output_dir: str) -> None:
    """A run writes only into a new folder, or into its own when it resumes from it: another run's args.yaml,
    logs and checkpoints are never overwritten nor mixed with this run's."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f'the output folder {output_dir!r} cannot be made: {existing!r} is a file')
    if not os.path.isdir(output_dir) or _resumes_in_place(args, output_dir):
        return
    held = sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or re.fullmatch(r'checkpoint-\d+\.pth\.tar', n))
    if held:
        shown = ', '.join(held[:4]) + (', ...' if len(held) > 4 else '')
        last, numbered = os.path.join(output_dir, 'last.pth.tar'), _numbered_checkpoints(output_dir)
        resume = f'resume it with --resume {last}' if os.path.isfile(last) else \
            f'resume it with --resume {os.path.join(output_dir, numbered[0][1])}' if numbered else \
            'it stopped before its first checkpoint, so there is nothing to resume'
        raise ValueError(f'the output folder {output_dir!r} already holds a run ({shown}): {resume}, or give another '
                         f'--experiment / --output')


def build_model(args, device: torch.device):
    """The model of the run (a tagged name takes its classes, mean/std and input size from the tag's config),
    on ``device``, with the resolved data config."""
    model = create_run_model(vars(args), pretrained=args.pretrained)
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(model, vars(args), verbose=args.primary)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, data_config


def _losses_and_mixup(args):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.mixup > 0 or args.cutmix > 0:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                     num_classes=args.num_classes), SoftTargetCrossEntropy()
    if args.smoothing:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def _augmentation(args, model: nn.Module) -> Augmentation:
    """The training augmentation; without --cifar-aug / --no-cifar-aug, the model family's: the paper's pad + crop
    + flip for a CIFAR model (timm's RandomResizedCrop at scale 0.08 would crop most of a 32-pixel image away),
    timm's transform for the others. The log says which."""
    family_cifar = arch_depth(model.pretrained_cfg.get('architecture', '')) is not None
    cifar_aug = family_cifar if args.cifar_aug is None else args.cifar_aug
    aug = Augmentation(cifar_aug=cifar_aug, no_aug=args.no_aug, hflip=args.hflip, scale=tuple(args.scale),
                       ratio=tuple(args.ratio))
    if args.primary and aug.kind == 'cifar':
        why = f'{args.model} is a CIFAR model; --no-cifar-aug for timm\'s transform' if args.cifar_aug is None \
            else '--cifar-aug'
        _logger.info(f'augmentation: 4-pixel pad + random crop + flip ({why}); --scale/--ratio are for timm\'s '
                     f'transform (train.py) and are not used')
    elif args.primary and aug.kind == 'timm':
        _logger.info(f'augmentation: timm\'s RandomResizedCrop (scale {aug.scale}, ratio {aug.ratio}) + flip')
    return aug


def _build_loaders(args, data_config, device, aug: Augmentation):
    img_mode = args.input_img_mode or image_mode(data_config)
    source = DataSource(dataset=args.dataset, root=args.data_dir, download=args.dataset_download, img_mode=img_mode)
    return build_loaders(
        source, data_config=data_config, train_split=args.train_split, val_split=args.val_split,
        test_split=test_split_of(vars(args)), batch_size=args.batch_size,
        eval_batch_size=args.validation_batch_size or args.batch_size, aug=aug, loader=args.loader,
        val_holdout=args.val_holdout, train_subset=args.train_subset, val_subset=args.val_subset,
        workers=args.workers, pin_memory=args.pin_mem, seed=args.seed, rank=args.rank,
        world_size=args.world_size, device=device)


def _resume(args, task, optimizer, loss_scaler) -> int:
    """Model, optimizer, EMA and loss-scaler state from --resume; returns the first epoch to run."""
    from timm.task import resume_task_checkpoint
    from timm.utils import load_checkpoint_metadata
    try:
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=loss_scaler,
            log_info=args.primary) or 0
    except Exception as e:  # a foreign or damaged file: say which, and that nothing was written
        raise ValueError(_cannot_resume(args.resume, e)) from e
    if task.has_ema():
        ckpt = load_checkpoint_metadata(args.resume)
        ema = task.get_trainable_module(ema=True).module
        if 'state_dict_ema' in ckpt:
            ema.load_state_dict(ckpt['state_dict_ema'])
        else:  # setup_ema copied the untrained model: the average starts from the resumed weights instead
            ema.load_state_dict(task.get_trainable_module().state_dict())
            if args.primary:
                _logger.info(f'{args.resume} has no EMA weights: the EMA starts from its model weights')
    return start_epoch


def _intact_checkpoint(damaged: str) -> str:
    """The newest numbered checkpoint beside a damaged one that reads as a training checkpoint, for the error
    message ('' when there is none)."""
    from timm.utils import load_checkpoint_metadata
    folder = os.path.dirname(os.path.abspath(damaged))
    for epoch, name in _numbered_checkpoints(folder) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name)
        if os.path.samefile(path, damaged):
            continue
        try:
            if isinstance(load_checkpoint_metadata(path).get('epoch'), int):
                return f'; the newest intact checkpoint of the run is {path} (epoch {epoch}): resume from it'
        except Exception:  # damaged too: try an older one
            continue
    return ''


def _cannot_resume(path: str, error: Exception) -> str:
    return (f'cannot resume from {path!r} ({type(error).__name__}: '
            f'{str(error).splitlines()[0][:200] if str(error) else ""}); it must be a checkpoint of this model '
            f'and optimizer (last.pth.tar of the run)')


# The arguments that make a run's experiment, compared on resume with the run's args.yaml: the model, its
# optimizer and schedule (a changed --opt or --lr would be half undone by the optimizer state that comes back),
# the batch per update (gates and schedule count steps), augmentation, and the data and its split (a changed
# --seed or --val-holdout would move held-out images into training). Free to change on resume: --epochs (to
# train on), where and how the run is written and logged, how it runs (device, workers, --loader, --amp,
# --torchcompile, --channels-last, grad checkpointing), --model-ema and its decay (an EMA may start at a
# resume), the weights a resume replaces (--pretrained, --initial-checkpoint), and --start-epoch (checked apart).
_SAME_ON_RESUME = (
    'model', 'model_kwargs', 'drop', 'drop_path', 'num_classes', 'in_chans', 'gp', 'img_size',
    'opt', 'opt_eps', 'opt_betas', 'opt_kwargs', 'momentum', 'weight_decay', 'lr', 'layer_decay', 'clip_grad',
    'clip_mode', 'sched', 'sched_on_updates', 'warmup_lr', 'min_lr', 'decay_milestones', 'decay_epochs',
    'warmup_epochs', 'warmup_prefix', 'cooldown_epochs', 'patience_epochs', 'decay_rate', 'eval_metric',
    'batch_size', 'grad_accum_steps', 'cifar_aug', 'no_aug', 'hflip', 'scale', 'ratio', 'mixup', 'cutmix',
    'smoothing', 'mean', 'std', 'interpolation', 'input_img_mode',
    'dataset', 'data_dir', 'train_split', 'val_split', 'test_split', 'val_holdout', 'train_subset', 'val_subset',
    'seed')


def check_start(args: argparse.Namespace, output_dir: str) -> None:
    """The run starts where it can continue: a --resume of a training checkpoint with the run's arguments that
    drops none of its folder's later epochs, and an epoch left to train. Before any data is loaded."""
    in_place = _resumes_in_place(args, output_dir)
    start_epoch = _check_resume(args, output_dir, in_place) if args.resume else (args.start_epoch or 0)
    total = _schedule_epochs(args)
    if start_epoch < total:
        return
    if args.start_epoch is not None:
        raise ValueError(f'--start-epoch {start_epoch} leaves none of the schedule\'s {total} epochs to train')
    if in_place and not os.path.exists(os.path.join(output_dir, 'results.json')):
        if args.primary:
            _logger.info(f'all {total} epochs are trained (a stop came before the results): writing them')
        return
    raise ValueError(f'the run already finished its {total} epoch{"s" if total != 1 else ""} (--resume '
                     f'{args.resume} is epoch {start_epoch - 1}): give a larger --epochs to train on')


def _check_resume(args, output_dir: str, in_place: bool) -> int:
    """A --resume that continues its run as it was; returns the first epoch to train."""
    meta = _read_training_checkpoint(args)
    _check_same_experiment(args)
    if in_place:
        _check_run_record(output_dir, meta['epoch'])
        _check_no_later_epochs(args.resume, meta['epoch'], output_dir)
        if args.start_epoch is not None:
            raise ValueError(f"--start-epoch with --resume in the run's own folder would repeat or skip log rows: "
                             f"the run continues after its checkpoint's epoch {meta['epoch']}; drop --start-epoch "
                             f"(or add --experiment NAME to start at another epoch in a new folder)")
    if args.start_epoch is not None:
        return args.start_epoch
    return epochs_done(meta)


def _check_run_record(output_dir: str, epoch: int) -> None:
    """A run continued in its folder keeps its record: without args.yaml the run's arguments (and so the checks
    above) are gone, without summary.csv the rows of its epochs; neither is made up from this command. The one
    summary.csv that can be proven is epoch 0's alone, from the record written before its checkpoint."""
    missing = [n for n in ('args.yaml', 'summary.csv') if not os.path.isfile(os.path.join(output_dir, n))]
    record = read_epoch_record(output_dir)
    if 'summary.csv' in missing and epoch == 0 and record is not None and record['epoch'] == 0:
        missing.remove('summary.csv')  # a stop before epoch 0's rows: its record beside the checkpoint has them
    if missing:
        raise ValueError(f'the run folder {output_dir!r} has lost its {" and ".join(missing)}: the record of epochs '
                         f'0-{epoch} cannot be continued there; restore {"them" if len(missing) > 1 else "it"}, or '
                         f'continue the checkpoint in a new folder with --experiment NAME')


def _read_training_checkpoint(args) -> Dict[str, Any]:
    """--resume's entries (tensors memory-mapped); an error unless it has what a resume continues from."""
    from timm.utils import load_checkpoint_metadata
    try:
        meta = load_checkpoint_metadata(args.resume)
    except Exception as e:  # a foreign or damaged file
        raise ValueError(_cannot_resume(args.resume, e) + _intact_checkpoint(args.resume)) from e
    meta = meta if isinstance(meta, dict) else {}
    missing = [name for name, present in (
        ('epoch', isinstance(meta.get('epoch'), int)), ('state_dict', 'state_dict' in meta or 'model' in meta),
        ('optimizer', 'optimizer' in meta or args.no_resume_opt)) if not present]
    if missing:
        raise ValueError(f'--resume {args.resume!r} is not a training checkpoint (it has no {", ".join(missing)}): '
                         f'--resume continues a run from its epoch and optimizer state; to start a new run from '
                         f'these weights give --initial-checkpoint {args.resume}')
    return meta


def test_split_of(values: Dict[str, Any]) -> Optional[str]:
    """The split a run reports at its best validation epoch: --test-split; else, with --val-holdout (the paper's
    protocol), the --val-split, or 'test' for a torchvision data set (train and test are all it has)."""
    if values.get('test_split'):
        return values['test_split']
    if not values.get('val_holdout'):
        return None
    return 'test' if values.get('dataset') in TORCH_DATASETS else values.get('val_split')


def _check_same_experiment(args) -> None:
    """The arguments of _SAME_ON_RESUME must be those of the run's args.yaml (beside the checkpoint); a foreign
    checkpoint without one is not checked."""
    stored = _experiment_values(RunFolder.open(args.resume).args)
    now = _experiment_values(vars(args))
    # a value the run left unset (None: the model's classes, timm train.py's lr from --lr-base) is not compared
    differ = [f'--{k.replace("_", "-")} {_shown(v)} (now {_shown(now[k])})' for k, v in stored.items()
              if v is not None and v != now[k]]
    if differ:
        raise ValueError(f'--resume {args.resume!r} continues a run with other arguments (its args.yaml): '
                         f'{", ".join(differ)}; give the run\'s values to continue it, or --initial-checkpoint '
                         f'{args.resume} to start a new run from its weights')


def _experiment_values(values: Dict[str, Any]) -> Dict[str, Any]:
    """The _SAME_ON_RESUME values a run used (those it has), as comparable as arguments allow: lists for
    tuples, the test split that --val-holdout defaults to spelt out, the data folder by its name (it may move)."""
    out = {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in _SAME_ON_RESUME if k in values}
    if 'test_split' in out:
        out['test_split'] = test_split_of(values)
    if values.get('dataset') in TORCH_DATASETS and 'val_split' in out:  # train and test only: what it meant
        out['val_split'] = None if values.get('val_holdout') else \
            'test' if out['val_split'] in ('validation', 'val', 'eval', 'evaluation') else out['val_split']
    if out.get('data_dir'):
        out['data_dir'] = os.path.basename(os.path.normpath(out['data_dir']))
    return out


def _shown(value: Any) -> str:
    return ' '.join(map(str, value)) if isinstance(value, list) else repr(value) if isinstance(value, str) \
        else str(value)


def _check_no_later_epochs(resume: str, epoch: int, output_dir: str) -> None:
    """A resume in its own folder from a checkpoint older than the folder's last.pth.tar would replace the later
    epochs (their log rows, last and best checkpoints): an error that says which, and how to keep them."""
    last = os.path.join(output_dir, 'last.pth.tar')
    try:
        last_epoch = -1 if os.path.samefile(last, resume) else _checkpoint_epoch(last)
    except Exception:  # no last.pth.tar, or a damaged one: the older checkpoint is what is left to resume
        return
    if last_epoch > epoch:
        raise ValueError(f'--resume {resume!r} is epoch {epoch} but the run\'s last.pth.tar is epoch {last_epoch}: '
                         f'resuming in the run\'s folder would drop {_epochs_shown(epoch + 1, last_epoch)} (log '
                         f'rows, checkpoints, best model); resume {last} to continue the run, or add --experiment '
                         f'NAME to continue after epoch {epoch} in a new folder')


def _epochs_shown(first: int, last: int) -> str:
    return f'epoch {first}' if first == last else f'epochs {first}-{last}'


def _schedule_epochs(args) -> int:
    """The epochs the run trains: --epochs plus any cooldown or warmup prefix timm's schedule adds. timm tells
    it with the scheduler; a stand-in optimizer asks it before any data is loaded (a bad --sched fails here)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # counts epochs only
    return create_scheduler_v2(stand_in, **scheduler_kwargs(args), updates_per_epoch=1)[1]


def _test_pause(where: str, epoch: int) -> None:
    """Tests only: with SD_ZOO_TEST_SLOW_SAVE=SECONDS, announce each point of an epoch's save on stderr
    (checkpoint-written: complete in tmp.pth.tar; checkpoint-saved: in place, log rows not yet written;
    logs-written) and sleep there, so that a test can kill the run at exactly that point."""
    seconds = float(os.environ.get('SD_ZOO_TEST_SLOW_SAVE') or 0)
    if seconds > 0:
        print(f'SD_ZOO_TEST_SLOW_SAVE {where} epoch {epoch}', file=sys.stderr, flush=True)
        time.sleep(seconds)


def _fsync(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, with every file put in place by one atomic rename. timm's unlinks last.pth.tar
    (model_best, checkpoint-N) before it moves the new file there: a kill in between leaves no last.pth.tar.
    Here a file is always the old one or the new, complete one."""

    def _save(self, save_path, epoch, metric=None):
        super()._save(save_path, epoch, metric)
        _fsync(save_path)
        _test_pause('checkpoint-written', epoch)  # complete in tmp.pth.tar, not yet last.pth.tar

    def _replace(self, src, dst):
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = f'{dst}.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _make_saver(args, output_dir: str, model, optimizer, loss_scaler, task):
    from timm.utils import load_checkpoint_metadata
    os.makedirs(output_dir, exist_ok=True)
    write_atomic(os.path.join(output_dir, 'args.yaml'),
                 yaml.safe_dump({k: v for k, v in vars(args).items() if k not in ('primary',)}))
    saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                                  checkpoint_dir=output_dir, recovery_dir=output_dir,
                                  decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
                                  task=task)
    if _resumes_in_place(args, output_dir):
        meta = load_checkpoint_metadata(args.resume)
        if 'saver' in meta:
            saver.load_state_dict(meta['saver'])
            _repair_best(saver, output_dir)
    return saver


def _repair_best(saver, output_dir: str) -> None:
    """A kill between a checkpoint and its model_best copy leaves model_best one best epoch behind the
    saver's record: copy the best epoch's checkpoint there again."""
    from timm.utils import load_checkpoint_metadata
    best = os.path.join(output_dir, 'model_best.pth.tar')
    if saver.best_epoch is None:
        return
    try:
        if os.path.isfile(best) and load_checkpoint_metadata(best).get('epoch') == saver.best_epoch:
            return
    except Exception:  # an unreadable model_best is replaced as well
        pass
    for name in (f'checkpoint-{saver.best_epoch}.pth.tar', 'last.pth.tar'):
        source = os.path.join(output_dir, name)
        if os.path.isfile(source) and load_checkpoint_metadata(source).get('epoch') == saver.best_epoch:
            _logger.warning(f'model_best.pth.tar was not epoch {saver.best_epoch}\'s (an interrupted save): '
                            f'copied {name} there')
            saver._duplicate(source, best)
            return


def _setup(args) -> torch.device:
    import importlib
    from timm.utils import init_distributed_device, random_seed, setup_default_logging
    check_train_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    if not logging.root.handlers:  # timm's adds a handler per call: train() twice would log every line twice
        setup_default_logging()
    args.device = str(default_device(args.device))
    device = init_distributed_device(args)
    args.primary = args.rank == 0
    random_seed(args.seed, args.rank)
    return device


@dataclass
class _Training:
    """What one training process works with: built by :func:`_prepare`, run by :func:`_train_epochs`."""
    args: argparse.Namespace
    device: torch.device
    output_dir: str
    model: nn.Module
    task: Any  # timm.task.ClassificationTask
    optimizer: Any
    loss_scaler: Any
    mixup_fn: Any
    loaders: Any
    dtype: Optional[torch.dtype] = None  # autocast (training_dtype); None: float32
    lock: Optional[RunFolderLock] = None  # the primary process's hold on output_dir
    lr_scheduler: Any = None
    num_epochs: int = 0
    start_epoch: int = 0
    updates_per_epoch: int = 0
    saver: Optional['AtomicCheckpointSaver'] = None


def run_training(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as ``args`` (from ``parse_train_args`` or ``make_train_args``) says; returns the final results."""
    run = _prepare(args)
    try:
        _schedule(run)
        _open_run_folder(run)
        eval_metrics = _train_epochs(run)
        return _finish(run, eval_metrics)
    finally:
        if run.lock is not None:
            run.lock.release()


def _lock_output_dir(args, output_dir: str) -> RunFolderLock:
    """The run folder, checked and held for this process: a reused folder is an error, not an overwrite, and
    a folder another run is writing is an error, not a second writer. Before any work."""
    check_output_dir(args, output_dir)  # first: a refused folder is not made
    lock = RunFolderLock(output_dir)
    try:
        check_output_dir(args, output_dir)  # again, held: another run may have written there meanwhile
        return lock
    except BaseException:
        lock.release(remove_folder=True)
        raise


def _prepare(args: argparse.Namespace) -> _Training:
    """Model, loss, optimizer, loaders and EMA; a resumed run's state; compiled branches; DDP."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.task import ClassificationTask
    from timm.utils import NativeScaler
    device = _setup(args)
    output_dir = _output_dir(args)
    lock = _lock_output_dir(args, output_dir) if args.primary else None
    try:
        model, data_config = build_model(args, device)
        check_start(args, output_dir)  # after the model (it resolves --num-classes), before the loaders
        mixup_fn, train_loss_fn = _losses_and_mixup(args)
        task = ClassificationTask(model=model, criterion=train_loss_fn, device=device, verbose=args.primary)
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        dtype, precision = training_dtype(device, args.amp, args.amp_dtype)
        if args.primary:
            _logger.info(precision)
        loss_scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
        loaders = _build_loaders(args, data_config, device, _augmentation(args, model))
        check_class_count(loaders.classes, args.num_classes, f'the training split {args.train_split!r}')
        if args.model_ema:
            task.setup_ema(decay=args.model_ema_decay)
        run = _Training(args=args, device=device, output_dir=output_dir, model=model, task=task, optimizer=optimizer,
                        loss_scaler=loss_scaler, mixup_fn=mixup_fn, loaders=loaders, dtype=dtype, lock=lock)
        run.start_epoch = _resume(args, task, optimizer, loss_scaler) if args.resume else 0
        if args.start_epoch is not None:
            run.start_epoch = args.start_epoch
        if args.torchcompile:
            compile_blocks(model, backend=args.torchcompile)
        if args.distributed:
            task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)
        return run
    except BaseException:
        if lock is not None:
            lock.release(remove_folder=True)  # a run that never started leaves no folder it made
        raise


def _schedule(run: _Training) -> None:
    """The learning-rate schedule and the gate sequence, both at the start epoch."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, steps_per_epoch = run.args, len(run.loaders.train)
    run.updates_per_epoch = math.ceil(steps_per_epoch / args.grad_accum_steps)
    # gates continue from where an interrupted run stopped, identically on every rank
    set_gate_seed(run.model, int(model_kwargs_of(vars(args)).get('sd_seed', 0)), step=run.start_epoch * steps_per_epoch)
    run.lr_scheduler, run.num_epochs = create_scheduler_v2(run.optimizer, **scheduler_kwargs(args),
                                                           updates_per_epoch=run.updates_per_epoch)
    if run.start_epoch > 0 and run.lr_scheduler is not None:  # --sched none: timm leaves the lr as it is
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.start_epoch * run.updates_per_epoch)
        else:
            run.lr_scheduler.step(run.start_epoch)


def _open_run_folder(run: _Training) -> None:
    """On the primary process: logs reconciled with a resumed checkpoint, the checkpoint saver, one line."""
    args, loaders = run.args, run.loaders
    if not args.primary:
        return
    if _resumes_in_place(args, run.output_dir):
        # the logs end at the checkpoint's epoch: no row of an epoch that will run again, none lost
        reconcile_logs(run.output_dir, _checkpoint_epoch(args.resume))
    run.saver = _make_saver(args, run.output_dir, run.model, run.optimizer, run.loss_scaler, run.task)
    _logger.info(f'{args.model}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, '
                 f'{loaders.counts["train"]} train / {loaders.counts.get("val", 0)} val / '
                 f'{loaders.counts.get("test", 0)} test images ({loaders.kind} loader), '
                 f'epochs {run.start_epoch}..{run.num_epochs - 1}, output {run.output_dir}')


def _train_epochs(run: _Training) -> Optional[Dict[str, float]]:
    """Train, validate, checkpoint and log each epoch; returns the last validation metrics."""
    from timm.utils import distribute_bn
    args, task, loaders = run.args, run.task, run.loaders
    num_updates = run.start_epoch * run.updates_per_epoch
    eval_metrics, epoch_times = None, []
    for epoch in range(run.start_epoch, run.num_epochs):
        epoch_start = time.perf_counter()
        set_loader_epoch(loaders.train, epoch)
        stats = _train_epoch(run, epoch, num_updates)
        num_updates = stats['num_updates']
        if args.distributed:
            distribute_bn(run.model, args.world_size, reduce=False)  # rank 0's BN statistics everywhere
        if loaders.val is not None:
            # timm's train.py reports the EMA model when there is one
            eval_metrics = evaluate(task.get_eval_model(ema=task.has_ema()), loaders.val, run.device,
                                    dtype=run.dtype, channels_last=args.channels_last)
        lr = run.optimizer.param_groups[0]['lr']
        if run.lr_scheduler is not None:
            run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
        if args.primary:
            _save_epoch(run, epoch, dict(epoch=epoch, train_metrics=dict(loss=stats['loss']), lr=lr, stats=stats,
                                         eval_metrics=dict(eval_metrics) if eval_metrics else None))
            epoch_times.append(time.perf_counter() - epoch_start)
            _log_epoch(epoch, stats, eval_metrics, epochs_left=run.num_epochs - 1 - epoch, epoch_times=epoch_times)
            _test_pause('logs-written', epoch)
    return eval_metrics


def _train_epoch(run: _Training, epoch: int, num_updates: int) -> Dict[str, float]:
    """One epoch; a loss that turns NaN or infinite stops the run with a one-line error that names the last
    good checkpoint (no checkpoint of this epoch is written)."""
    args = run.args
    try:
        return train_one_epoch(
            run.task, run.loaders.train, run.optimizer, epoch=epoch, device=run.device, num_updates=num_updates,
            lr_scheduler=run.lr_scheduler if args.sched_on_updates else None, loss_scaler=run.loss_scaler,
            mixup_fn=run.mixup_fn, dtype=run.dtype, channels_last=args.channels_last,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            world_size=args.world_size, progress=args.primary and not args.no_progress,
            log_interval=args.log_interval if args.primary else 0)
    except NonFiniteLoss as e:
        last = os.path.join(run.output_dir, 'last.pth.tar')
        where = f'the last good checkpoint is {last} (epoch {epoch - 1})' if epoch > 0 and os.path.exists(last) \
            else 'no checkpoint was written'
        raise NonFiniteLoss(f'{e} (lr {run.optimizer.param_groups[0]["lr"]:g}): training stopped; {where}; a lower '
                            f'--lr or --clip-grad may help') from None


def _save_epoch(run: _Training, epoch: int, record: Dict[str, Any]) -> None:
    """Checkpoint first, then the log rows: a kill in between loses no row (the record beside the checkpoint
    restores it on resume) and a kill before the checkpoint leaves no row to duplicate."""
    write_epoch_record(run.output_dir, record)
    eval_metrics = record['eval_metrics']
    run.saver.save_checkpoint(epoch, metric=eval_metrics[run.args.eval_metric] if eval_metrics else None)
    _test_pause('checkpoint-saved', epoch)
    append_log_rows(run.output_dir, record)


def _finish(run: _Training, eval_metrics: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """results.json (with the test split at the best validation epoch, where there is one); DDP torn down."""
    args, saver = run.args, run.saver
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver else (None, None)
    results: Dict[str, Any] = dict(model=args.model, output_dir=run.output_dir, epochs=run.num_epochs,
                                   best_epoch=best_epoch, best_metric=best_metric, eval_metric=args.eval_metric,
                                   last_eval=dict(eval_metrics) if eval_metrics else None,
                                   autocast=str(run.dtype).replace('torch.', '') if run.dtype else None)
    if args.primary and run.loaders.test is not None:
        results['test'] = _test_at_best_epoch(args, run.output_dir, run.task.has_ema(), run.loaders.test,
                                              run.device, dict(dtype=run.dtype, channels_last=args.channels_last))
        results['test']['epoch'] = best_epoch
        _logger.info(f'test at the best validation epoch ({best_epoch}): top1 {results["test"]["top1"]:.2f}, '
                     f'error {100 - results["test"]["top1"]:.2f}%')
    if args.primary:
        write_atomic(os.path.join(run.output_dir, 'results.json'), json.dumps(results, indent=2))
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


def _checkpoint_epoch(path: str) -> int:
    from timm.utils import load_checkpoint_metadata
    return int(load_checkpoint_metadata(path)['epoch'])


def _log_epoch(epoch: int, stats: Dict[str, float], eval_metrics, *, epochs_left: int = 0,
               epoch_times: Sequence[float] = ()) -> None:
    msg = f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["wall_s"]:.1f} s, ' \
          f'{stats["images_per_s"]:.0f} img/s, {stats["mean_active_blocks"]:.2f}/{stats["num_blocks"]} blocks'
    if eval_metrics:
        msg += f', val top1 {eval_metrics["top1"]:.2f} loss {eval_metrics["loss"]:.4f}'
    if epochs_left and epoch_times:  # the median epoch of this process (training and validation), so a pause
        left_s = statistics.median(epoch_times) * epochs_left  # or a slow first epoch does not skew it
        msg += f'; {epochs_left} epoch{"s" if epochs_left > 1 else ""} left, about ' + \
            (f'{left_s / 3600:.1f} h' if left_s >= 3600 else f'{max(1, round(left_s / 60))} min')
    _logger.info(msg)


def _test_at_best_epoch(args, output_dir: str, use_ema: bool, loader, device, eval_kwargs) -> Dict[str, Any]:
    """The test split evaluated on the best validation epoch's weights (the paper's protocol), in a model
    built as the training one was."""
    best = os.path.join(output_dir, 'model_best.pth.tar')
    checkpoint = best if os.path.exists(best) else os.path.join(output_dir, 'last.pth.tar')
    model = create_run_model(vars(args))
    load_weights(model, checkpoint, use_ema=use_ema)
    model = model.to(device).eval()
    return dict(evaluate(model, loader, device, **eval_kwargs), split=test_split_of(vars(args)))


def train(config: str = '', **options) -> Dict[str, Any]:
    """Train a model from Python: ``config`` is a recipe name or YAML file, ``options`` are sd-zoo train's
    flags with ``_`` (they override the recipe). Returns the results (also in OUTPUT/results.json).

    >>> sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='data/cifar10', epochs=1)
    """
    return run_training(make_train_args(config, **options))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_training(parse_train_args(argv))
