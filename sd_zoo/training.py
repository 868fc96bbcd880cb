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
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import yaml
from timm.utils import ParseKwargs

from .data import DATASET_CHOICES_HELP, LOADERS, Augmentation, DataSource, build_loaders, image_mode, \
    resolve_data_config, set_loader_epoch
from .engine import default_device, evaluate, train_one_epoch
from .loading import check_model_name, load_weights
from .recipes import resolve_recipe
from .runs import Run, append_epoch_row, build_run_model
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
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='compile the residual branches (sd_zoo.compile_blocks) with this backend')
    g.add_argument('--device', default=None, help="'cpu', 'cuda' (default: cuda if available)")
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='modules to import first')
    g.add_argument('--amp', action='store_true', default=False)
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--opt-eps', default=None, type=float)
    g.add_argument('--opt-betas', default=None, type=float, nargs='+')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm')
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
    g.add_argument('--cifar-aug', action='store_true', default=False,
                   help='4-pixel pad + random 32x32 crop + horizontal flip (the paper) instead of timm\'s transform')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='RandomResizedCrop scale (timm aug)')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='RandomResizedCrop ratio')
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier (drop_rate)')
    g.add_argument('--drop-path', type=float, default=None, help='1 - p_L (model default 0.5; 0: constant depth)')
    g.add_argument('--model-ema', action='store_true', default=False)
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
    """The arguments of a Python ``train()`` call: flag defaults, then the recipe, then ``options``."""
    parser = build_train_parser()
    values = vars(parser.parse_args([]))
    if config:
        values.update(load_config(config, parser), config=config)
    unknown = sorted(k for k in options if k not in values)
    if unknown:
        raise ValueError(f'train() has no option {", ".join(unknown)} (options are sd-zoo train\'s flags with _)')
    values.update(options)
    return argparse.Namespace(**values)


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value as the flag would parse it (``epochs: 1.5`` is an error, not a crash later)."""
    if value is None or action.type is None or isinstance(action, argparse._StoreConstAction):
        return value
    values = value if isinstance(value, list) else [value]
    if action.nargs in (None, '?') and isinstance(value, list):
        raise ValueError(f'config file {path!r}: {key} takes one value, not a list')
    try:
        out = []
        for v in values:
            if action.type in (int, float) and isinstance(v, (bool, str)) or (action.type is int and v != int(v)):
                raise ValueError(v)
            out.append(action.type(v))
    except (TypeError, ValueError):
        raise ValueError(f'config file {path!r}: {key} must be {action.type.__name__}, got {value!r}') from None
    return out if isinstance(value, list) else out[0]


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
    return {k: _coerce(actions[k], k, v, path) for k, v in cfg.items()}


def check_train_args(args: argparse.Namespace) -> None:
    for name in ('batch_size', 'epochs', 'grad_accum_steps'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be at least 1')
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume {args.resume!r}: no such checkpoint file')
    if not args.model.startswith(('hf-hub:', 'local-dir:')):
        check_model_name(args.model)


# ---------------------------------------------------------------------------------------------- driver


def _output_dir(args) -> str:
    if args.resume and not args.experiment and not args.output:
        return os.path.dirname(os.path.abspath(args.resume))  # continue the interrupted run in place
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_')])
    return os.path.join(args.output or os.path.join('.', 'output', 'train'), name)


def model_kwargs_of(args) -> Dict[str, Any]:
    """timm.create_model keyword arguments of a run: --drop / --drop-path and --model-kwargs, which must
    not contradict each other."""
    kwargs = dict(args.model_kwargs or {})
    for flag, key, value in (('--drop', 'drop_rate', args.drop), ('--drop-path', 'drop_path_rate', args.drop_path)):
        if value is None:
            continue
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f'{flag} {value} and --model-kwargs {key}={kwargs[key]} disagree: give one')
        kwargs[key] = value
    return kwargs


def build_model(args, device: torch.device):
    """The model of the run (a tagged name takes its classes, mean/std and input size from the tag's config),
    on ``device``, with the resolved data config."""
    import timm
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                                  global_pool=args.gp, in_chans=args.in_chans, **model_kwargs_of(args))
    except TypeError as e:  # an argument the model does not take, e.g. a misspelt --model-kwargs key
        raise ValueError(f'{args.model} does not take these arguments ({e})') from e
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


def _build_loaders(args, data_config, device):
    img_mode = args.input_img_mode or image_mode(data_config)
    source = DataSource(dataset=args.dataset, root=args.data_dir, download=args.dataset_download, img_mode=img_mode)
    aug = Augmentation(cifar_aug=args.cifar_aug, no_aug=args.no_aug, hflip=args.hflip, scale=tuple(args.scale),
                       ratio=tuple(args.ratio))
    if aug.kind == 'cifar' and args.primary:
        _logger.info('--cifar-aug: 4-pixel pad + random crop + flip; --scale/--ratio are for timm\'s transform '
                     '(train.py) and are not used')
    return build_loaders(
        source, data_config=data_config, train_split=args.train_split, val_split=args.val_split,
        test_split=args.test_split or (args.val_split if args.val_holdout else None), batch_size=args.batch_size,
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
        raise ValueError(f'cannot resume from {args.resume!r} ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200] if str(e) else ""}); it must be a checkpoint of this model '
                         f'and optimizer (last.pth.tar of the run)') from e
    if task.has_ema():
        ckpt = load_checkpoint_metadata(args.resume)
        if 'state_dict_ema' in ckpt:
            task.get_trainable_module(ema=True).module.load_state_dict(ckpt['state_dict_ema'])
    return start_epoch


def _make_saver(args, output_dir: str, model, optimizer, loss_scaler, task):
    from timm.utils import CheckpointSaver, load_checkpoint_metadata
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if k not in ('primary',)}, f)
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler,
                            checkpoint_dir=output_dir, recovery_dir=output_dir,
                            decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist, task=task)
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
        meta = load_checkpoint_metadata(args.resume)
        if 'saver' in meta:
            saver.load_state_dict(meta['saver'])
    return saver


def _setup(args) -> torch.device:
    import importlib
    from timm.utils import init_distributed_device, random_seed, setup_default_logging
    check_train_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    setup_default_logging()
    args.device = str(default_device(args.device))
    device = init_distributed_device(args)
    args.primary = args.rank == 0
    random_seed(args.seed, args.rank)
    return device


def run_training(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as ``args`` (from ``parse_train_args`` or ``make_train_args``) says; returns the final results."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import ClassificationTask
    from timm.utils import NativeScaler, distribute_bn, update_summary

    device = _setup(args)
    model, data_config = build_model(args, device)
    mixup_fn, train_loss_fn = _losses_and_mixup(args)
    task = ClassificationTask(model=model, criterion=train_loss_fn, device=device, verbose=args.primary)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' \
        and device.type == 'cuda' else None
    loaders = _build_loaders(args, data_config, device)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
    start_epoch = _resume(args, task, optimizer, loss_scaler) if args.resume else 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if args.torchcompile:
        compile_blocks(model, backend=args.torchcompile)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)

    updates_per_epoch = math.ceil(len(loaders.train) / args.grad_accum_steps)
    # gates continue from where an interrupted run stopped, identically on every rank
    set_gate_seed(model, int(model_kwargs_of(args).get('sd_seed', 0)), step=start_epoch * len(loaders.train))
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    output_dir = _output_dir(args)
    saver = _make_saver(args, output_dir, model, optimizer, loss_scaler, task) if args.primary else None
    if args.primary:
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{loaders.counts["train"]} train / {loaders.counts.get("val", 0)} val / '
                     f'{loaders.counts.get("test", 0)} test images ({loaders.kind} loader), '
                     f'epochs {start_epoch}..{num_epochs - 1}, output {output_dir}')

    eval_kwargs = dict(amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last)
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver else (None, None)
    num_updates = start_epoch * updates_per_epoch
    eval_metrics = None
    for epoch in range(start_epoch, num_epochs):
        set_loader_epoch(loaders.train, epoch)
        stats = train_one_epoch(
            task, loaders.train, optimizer, epoch=epoch, device=device, num_updates=num_updates,
            lr_scheduler=lr_scheduler if args.sched_on_updates else None, loss_scaler=loss_scaler, mixup_fn=mixup_fn,
            amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            world_size=args.world_size, progress=args.primary and not args.no_progress,
            log_interval=args.log_interval if args.primary else 0)
        num_updates = stats['num_updates']
        if args.distributed:
            distribute_bn(model, args.world_size, reduce=False)  # rank 0's BN statistics everywhere
        if loaders.val is not None:
            # timm's train.py reports the EMA model when there is one
            eval_metrics = evaluate(task.get_eval_model(ema=task.has_ema()), loaders.val, device, **eval_kwargs)
        lr = optimizer.param_groups[0]['lr']
        lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
        if args.primary:
            update_summary(epoch, OrderedDict(loss=stats['loss']), eval_metrics,
                           filename=os.path.join(output_dir, 'summary.csv'), lr=lr)
            append_epoch_row(os.path.join(output_dir, 'epochs.csv'), epoch, stats, eval_metrics)
            _log_epoch(epoch, stats, eval_metrics)
            best_metric, best_epoch = saver.save_checkpoint(
                epoch, metric=eval_metrics[args.eval_metric] if eval_metrics else None)
    results: Dict[str, Any] = dict(model=args.model, output_dir=output_dir, epochs=num_epochs,
                                   best_epoch=best_epoch, best_metric=best_metric, eval_metric=args.eval_metric,
                                   last_eval=dict(eval_metrics) if eval_metrics else None)
    if args.primary and loaders.test is not None:
        results['test'] = _test_at_best_epoch(args, output_dir, task.has_ema(), loaders.test, device, eval_kwargs)
        results['test']['epoch'] = best_epoch
        _logger.info(f'test at the best validation epoch ({best_epoch}): top1 {results["test"]["top1"]:.2f}, '
                     f'error {100 - results["test"]["top1"]:.2f}%')
    if args.primary:
        with open(os.path.join(output_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=2)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


def _log_epoch(epoch: int, stats: Dict[str, float], eval_metrics) -> None:
    msg = f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["wall_s"]:.1f} s, ' \
          f'{stats["images_per_s"]:.0f} img/s, {stats["mean_active_blocks"]:.2f}/{stats["num_blocks"]} blocks'
    if eval_metrics:
        msg += f', val top1 {eval_metrics["top1"]:.2f} loss {eval_metrics["loss"]:.4f}'
    _logger.info(msg)


def _test_at_best_epoch(args, output_dir: str, use_ema: bool, loader, device, eval_kwargs) -> Dict[str, Any]:
    """The test split evaluated on the best validation epoch's weights (the paper's protocol)."""
    best = os.path.join(output_dir, 'model_best.pth.tar')
    checkpoint = best if os.path.exists(best) else os.path.join(output_dir, 'last.pth.tar')
    run = Run(checkpoint=Path(checkpoint), run_dir=Path(output_dir), args=vars(args))
    model = build_run_model(run, use_ema=use_ema).to(device)
    return dict(evaluate(model, loader, device, **eval_kwargs), split=args.test_split or args.val_split)


def train(config: str = '', **options) -> Dict[str, Any]:
    """Train a model from Python: ``config`` is a recipe name or YAML file, ``options`` are sd-zoo train's
    flags with ``_`` (they override the recipe). Returns the results (also in OUTPUT/results.json).

    >>> sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='data/cifar10', epochs=1)
    """
    return run_training(make_train_args(config, **options))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_training(parse_train_args(argv))
