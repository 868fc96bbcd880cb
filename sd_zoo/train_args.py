"""``sd-zoo train``'s flags: the schema (timm train.py's names), ``--config`` YAML read and coerced as the flags
parse, the same arguments from Python (``make_train_args``), and the checks every value passes before any work.
"""
import argparse
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import yaml
from timm.utils import ParseKwargs

from .checks import check_at_least
from .data import DATASET_CHOICES_HELP, LOADERS
from .loading import check_model_name
from .recipes import resolve_recipe

__all__ = ['build_train_parser', 'parse_train_args', 'make_train_args', 'load_config', 'check_train_args']


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
    g.add_argument('--crop-pct', type=float, default=None,
                   help='eval center-crop fraction (default: the model config\'s; 1.0 evaluates whole 32 px CIFAR '
                        'images as they are, where a timm ViT\'s 0.9 would resize them first)')
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
    g.add_argument('--weight-decay', type=float, default=1e-4, help='(timm train.py: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)
    g = p.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='multistep', help='(timm train.py: cosine)')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=0.1,
                   help='(timm train.py: --lr-base 0.1 scaled by the global batch / 256)')
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--epochs', type=int, default=500, help='(timm train.py: 300)')
    g.add_argument('--start-epoch', type=int, default=None)
    g.add_argument('--decay-milestones', default=[250, 375], type=int, nargs='+',
                   help='the paper\'s CIFAR steps (timm train.py: 90 180 270)')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=0, help='(timm train.py: 5)')
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
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing (timm train.py: 0.1)')
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
    args = parser.parse_args(remaining)
    args.config = pre.config  # recorded in args.yaml, as a Python train(config=...) records it
    return args


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
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}  # not settings: no nesting
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
        check_at_least({f'--{name.replace("_", "-")}': getattr(args, name)}, least)
    for name, (low, high, closed) in _IN_RANGE.items():
        value = getattr(args, name)
        if value is not None and not (low <= value <= high if closed else low <= value < high):
            raise ValueError(f'--{name.replace("_", "-")} must be in [{low:g}, {high:g}{"]" if closed else ")"}, '
                             f'got {value}')
    milestones = list(args.decay_milestones or [])
    if milestones != sorted(set(milestones)):  # timm counts the decays passed with bisect: unsorted miscounts
        raise ValueError(f'--decay-milestones must increase, got {" ".join(map(str, milestones))}')
    if args.decay_epochs is not None and args.decay_epochs <= 0:
        raise ValueError(f'--decay-epochs must be greater than 0, got {args.decay_epochs:g}')
    if args.sched == 'plateau' and args.sched_on_updates:
        raise ValueError('--sched plateau steps once per epoch: drop --sched-on-updates')
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise ValueError(f'--crop-pct must be in (0, 1], got {args.crop_pct}')
    _check_normalization(args)
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
