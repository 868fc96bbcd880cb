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
import csv
import json
import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import yaml
from timm.utils import ParseKwargs

from .stochastic_depth import compile_blocks, set_gate_seed, stochastic_blocks

_logger = logging.getLogger('sd_zoo.train')

DATASET_CHOICES_HELP = "'' (image folder), torch/cifar10, torch/cifar100 or torch/svhn"


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
    """Parse flags, with ``--config`` YAML values as defaults. Unsupported keys are an error, never ignored."""
    parser = build_train_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    pre, remaining = config_parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    return parser.parse_args(remaining)


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f'config file {path!r} does not exist')
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'config file {path!r} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise ValueError(f'config file {path!r} must be a mapping of train.py flag names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise ValueError(f'config file {path!r} has keys that sd-zoo train does not support: {", ".join(unknown)}'
                         f' (keys are train.py flag names with - as _; see sd-zoo train --help)')
    return cfg


def check_train_args(args: argparse.Namespace) -> None:
    if not args.dataset and not args.data_dir:
        raise ValueError('no dataset: give --data-dir DIR (an image folder with train/validation splits) or '
                         '--dataset torch/cifar10 --dataset-download')
    if args.dataset and args.dataset not in ('torch/cifar10', 'torch/cifar100', 'torch/svhn'):
        raise ValueError(f'unsupported --dataset {args.dataset!r}: use {DATASET_CHOICES_HELP}')
    if args.data_dir and not args.dataset and not os.path.isdir(args.data_dir):
        raise ValueError(f'--data-dir {args.data_dir!r} is not a folder')
    for name in ('batch_size', 'epochs', 'grad_accum_steps'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be at least 1')
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume {args.resume!r}: no such checkpoint file')


# ---------------------------------------------------------------------------------------------- data


class _Subset(torch.utils.data.Dataset):
    """A subset of a dataset with its own transform (the held-out split needs the eval transform)."""

    def __init__(self, dataset, indices: Sequence[int], transform=None):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, target = self.dataset[self.indices[i]]
        return (self.transform(img) if self.transform is not None else img), target


def _raw_dataset(args, split: str, training: bool):
    """A dataset yielding PIL images and labels, via timm's create_dataset (torchvision for SVHN)."""
    from timm.data import create_dataset
    root = args.data_dir or os.path.join(os.path.expanduser('~'), '.cache', 'sd_zoo', 'data')
    if args.dataset == 'torch/svhn':
        from torchvision.datasets import SVHN
        svhn_split = {'validation': 'test', 'val': 'test'}.get(split, split)
        return SVHN(root, split=svhn_split, download=args.dataset_download)
    try:
        return create_dataset(args.dataset, root=root, split=split, is_training=training,
                              download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
    except (RuntimeError, FileNotFoundError) as e:
        hint = ' (add --dataset-download)' if args.dataset and not args.dataset_download else ''
        raise ValueError(f'cannot read the {split!r} split of {args.dataset or "the image folder"} under '
                         f'{root!r}: {e}{hint}') from e


def _random_indices(n: int, k: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].tolist() if k and k < n else list(range(n))


def build_transforms(args, data_config: Dict[str, Any]):
    from timm.data import create_transform
    from torchvision import transforms as T
    eval_tf = create_transform(**data_config, is_training=False)
    if args.cifar_aug and not args.no_aug:
        if getattr(args, 'primary', True):
            _logger.info('--cifar-aug: 4-pixel pad + random crop + flip; --scale/--ratio are for timm\'s transform '
                         '(train.py) and are not used')
        size = data_config['input_size'][-1]
        train_tf = T.Compose([
            T.RandomCrop(size, padding=4),
            T.RandomHorizontalFlip(args.hflip),
            T.ToTensor(),
            T.Normalize(data_config['mean'], data_config['std']),
        ])
    else:
        train_tf = create_transform(**data_config, is_training=True, no_aug=args.no_aug, hflip=args.hflip,
                                    scale=tuple(args.scale), ratio=tuple(args.ratio))
    return train_tf, eval_tf


def build_datasets(args, data_config: Dict[str, Any]):
    """Train, validation and (optional) test datasets with their transforms."""
    train_tf, eval_tf = build_transforms(args, data_config)
    train_raw = _raw_dataset(args, args.train_split, training=True)
    n = len(train_raw)
    if n == 0:
        raise ValueError(f'the {args.train_split!r} split is empty')
    order = _random_indices(n, n, args.seed)
    test_split = args.test_split
    if args.val_holdout:
        if not 0 < args.val_holdout < n:
            raise ValueError(f'--val-holdout {args.val_holdout} must be between 1 and {n - 1} (training set size)')
        val_idx, train_idx = order[:args.val_holdout], order[args.val_holdout:]
        val_ds = _Subset(train_raw, val_idx[:args.val_subset or None], eval_tf)
        test_split = test_split or args.val_split
    else:
        train_idx = list(range(n))
        val_ds = None
        if args.val_split:
            val_raw = _raw_dataset(args, args.val_split, training=False)
            val_ds = _Subset(val_raw, _random_indices(len(val_raw), args.val_subset, args.seed), eval_tf)
    if args.train_subset:
        train_idx = [train_idx[i] for i in _random_indices(len(train_idx), args.train_subset, args.seed)]
    train_ds = _Subset(train_raw, train_idx, train_tf)
    test_ds = None
    if test_split:
        test_raw = _raw_dataset(args, test_split, training=False)
        test_ds = _Subset(test_raw, _random_indices(len(test_raw), args.val_subset, args.seed), eval_tf)
    return train_ds, val_ds, test_ds


def _loader(ds, batch_size: int, args, training: bool, distributed: bool):
    sampler = None
    if training and distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=True, seed=args.seed, drop_last=True)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=training and sampler is None, sampler=sampler, drop_last=training,
        num_workers=args.workers, pin_memory=args.pin_mem, persistent_workers=args.workers > 0)


# ---------------------------------------------------------------------------------------------- loops


def _autocast(args, device: torch.device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' or device.type == 'cpu' else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, args=None) -> 'OrderedDict[str, float]':
    """Loss, top-1 and top-5 (in %) of ``model`` on ``loader``, as timm's validate reports them."""
    from timm.utils import accuracy
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    total, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if args is not None and args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(args, device) if args is not None else nullcontext():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[-1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        n = images.shape[0]
        loss_sum += loss_fn(output, target).item()
        top1_sum += acc1.item() * n
        top5_sum += acc5.item() * n
        total += n
    if total == 0:
        raise ValueError('the evaluation split is empty')
    return OrderedDict(loss=loss_sum / total, top1=top1_sum / total, top5=top5_sum / total)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


def train_one_epoch(epoch: int, task, model, loader, optimizer, lr_scheduler, loss_scaler, mixup_fn, device, args,
                    num_updates_start: int) -> Dict[str, float]:
    blocks = stochastic_blocks(model)
    task.train()
    losses, seen, active_sum, batches = 0.0, 0, 0, 0
    num_updates = num_updates_start
    steps = len(loader)
    start = time.perf_counter()
    bar = _progress(loader, steps, f'epoch {epoch}', args.primary and not args.no_progress)
    optimizer.zero_grad()
    for batch_idx, (images, target) in enumerate(bar):
        images, target = images.to(device), target.to(device)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_accum = (batch_idx + 1) % args.grad_accum_steps == 0 or batch_idx + 1 == steps
        sync = nullcontext() if last_accum else task.no_sync()
        with sync:
            with _autocast(args, device):
                loss = task(images, target)['loss']
            loss_for_backward = loss / args.grad_accum_steps
            if loss_scaler is not None:
                loss_scaler(loss_for_backward, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(), need_update=last_accum)
            else:
                loss_for_backward.backward()
                if last_accum:
                    if args.clip_grad is not None:
                        from timm.utils import dispatch_clip_grad
                        dispatch_clip_grad(task.get_clip_parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if last_accum:
            optimizer.zero_grad()
            num_updates += 1
            task.update_ema(step=num_updates)
            if lr_scheduler is not None and args.sched_on_updates:
                lr_scheduler.step_update(num_updates=num_updates)
        n = images.shape[0]
        losses += loss.item() * n
        seen += n
        batches += 1
        active_sum += sum(b.last_gate for b in blocks)
        if bar is not loader:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f'{losses / seen:.4f}', img_s=f'{seen * args.world_size / elapsed:.0f}',
                            active=f'{active_sum / batches:.1f}/{len(blocks)}', refresh=False)
        elif args.primary and args.log_interval and (batch_idx % args.log_interval == 0 or batch_idx + 1 == steps):
            elapsed = time.perf_counter() - start
            _logger.info(f'epoch {epoch} [{batch_idx + 1}/{steps}] loss {losses / seen:.4f} '
                         f'{seen * args.world_size / elapsed:.0f} img/s, active {active_sum / batches:.2f}/{len(blocks)}')
    wall = time.perf_counter() - start
    return dict(loss=losses / max(seen, 1), wall_s=wall, images_per_s=seen * args.world_size / max(wall, 1e-9),
                mean_active_blocks=active_sum / max(batches, 1), num_blocks=len(blocks), num_updates=num_updates)


# ---------------------------------------------------------------------------------------------- driver


def _output_dir(args) -> str:
    if args.resume and not args.experiment and not args.output:
        return os.path.dirname(os.path.abspath(args.resume))  # continue the interrupted run in place
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_')])
    return os.path.join(args.output or os.path.join('.', 'output', 'train'), name)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as ``args`` (from ``parse_train_args``) says; returns the final results."""
    import importlib

    import timm
    from timm.data import Mixup, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import ClassificationTask
    from timm.task._helpers import resume_task_checkpoint
    from timm.utils import CheckpointSaver, NativeScaler, distribute_bn, init_distributed_device, random_seed, \
        setup_default_logging, update_summary
    from timm.utils.checkpoint_saver import load_checkpoint_metadata

    check_train_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    import sd_zoo  # noqa: F401  the sd models, whatever device_modules says

    setup_default_logging()
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device = init_distributed_device(args)
    args.primary = args.rank == 0
    random_seed(args.seed, args.rank)
    if args.model not in timm.list_models() and not args.model.startswith(('hf-hub:', 'local-dir:')):
        raise ValueError(f'unknown model {args.model!r}: sd-zoo models are {", ".join(timm.list_models("sd_*"))}')

    model_kwargs = dict(args.model_kwargs)
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
        drop_path_rate=args.drop_path, global_pool=args.gp, in_chans=args.in_chans, **model_kwargs)
    if args.initial_checkpoint:
        from .evaluation import load_weights
        load_weights(model, args.initial_checkpoint)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=args.primary)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    mixup_active = args.mixup > 0 or args.cutmix > 0
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                     num_classes=args.num_classes) if mixup_active else None
    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    task = ClassificationTask(model=model, criterion=train_loss_fn, device=device, verbose=args.primary)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' \
        and device.type == 'cuda' else None

    train_ds, val_ds, test_ds = build_datasets(args, data_config)
    loader_train = _loader(train_ds, args.batch_size, args, True, args.distributed)
    if len(loader_train) == 0:
        raise ValueError(f'{len(train_ds)} training images make no full batch of {args.batch_size}')
    eval_bs = args.validation_batch_size or args.batch_size
    loader_val = _loader(val_ds, eval_bs, args, False, False) if val_ds is not None else None
    loader_test = _loader(test_ds, eval_bs, args, False, False) if test_ds is not None else None

    start_epoch = 0
    output_dir = _output_dir(args)
    if args.resume:
        try:
            start_epoch = resume_task_checkpoint(
                task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=loss_scaler,
                log_info=args.primary) or 0
        except Exception as e:  # a foreign or damaged file: say which, and that nothing was written
            raise ValueError(f'cannot resume from {args.resume!r} ({type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else ""}); it must be a checkpoint of this model '
                             f'and optimizer (last.pth.tar of the run)') from e
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
        if args.resume:
            ckpt = load_checkpoint_metadata(args.resume)
            if 'state_dict_ema' in ckpt:
                task.get_trainable_module(ema=True).module.load_state_dict(ckpt['state_dict_ema'])
    if args.torchcompile:
        compile_blocks(model, backend=args.torchcompile)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)

    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accum_steps)
    # gates continue from where an interrupted run stopped, identically on every rank
    set_gate_seed(model, int(model_kwargs.get('sd_seed', 0)), step=start_epoch * len(loader_train))
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    if args.primary:
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
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{len(train_ds)} train / {len(val_ds) if val_ds else 0} val / '
                     f'{len(test_ds) if test_ds else 0} test images, epochs {start_epoch}..{num_epochs - 1}, '
                     f'output {output_dir}')

    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver else (None, None)
    num_updates = start_epoch * updates_per_epoch
    eval_metrics = None
    for epoch in range(start_epoch, num_epochs):
        if args.distributed:
            loader_train.sampler.set_epoch(epoch)
        stats = train_one_epoch(epoch, task, model, loader_train, optimizer, lr_scheduler, loss_scaler, mixup_fn,
                                device, args, num_updates)
        num_updates = stats['num_updates']
        if args.distributed:
            distribute_bn(model, args.world_size, reduce=False)  # rank 0's BN statistics everywhere
        eval_metrics = evaluate(model, loader_val, device, args) if loader_val is not None else None
        if task.has_ema() and loader_val is not None:
            ema_metrics = evaluate(task.get_eval_model(ema=True), loader_val, device, args)
            eval_metrics = ema_metrics  # timm's train.py reports the EMA model when there is one
        lr = optimizer.param_groups[0]['lr']
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
        if args.primary:
            update_summary(epoch, OrderedDict(loss=stats['loss']), eval_metrics,
                           filename=os.path.join(output_dir, 'summary.csv'), lr=lr)
            _append_epoch_log(os.path.join(output_dir, 'epochs.csv'), epoch, stats, eval_metrics)
            msg = f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["wall_s"]:.1f} s, ' \
                  f'{stats["images_per_s"]:.0f} img/s, {stats["mean_active_blocks"]:.2f}/{stats["num_blocks"]} blocks'
            if eval_metrics:
                msg += f', val top1 {eval_metrics["top1"]:.2f} loss {eval_metrics["loss"]:.4f}'
            _logger.info(msg)
            metric = eval_metrics[args.eval_metric] if eval_metrics else None
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
    results: Dict[str, Any] = dict(model=args.model, output_dir=output_dir, epochs=num_epochs,
                                   best_epoch=best_epoch, best_metric=best_metric, eval_metric=args.eval_metric,
                                   last_eval=dict(eval_metrics) if eval_metrics else None)
    if args.primary and loader_test is not None:
        best_path = os.path.join(output_dir, 'model_best.pth.tar')
        eval_model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans,
                                       **model_kwargs).to(device)
        ckpt_key = 'state_dict_ema' if task.has_ema() else 'state_dict'
        timm.models.load_checkpoint(eval_model, best_path if os.path.exists(best_path)
                                    else os.path.join(output_dir, 'last.pth.tar'), use_ema=ckpt_key == 'state_dict_ema')
        results['test'] = dict(evaluate(eval_model, loader_test, device, args), epoch=best_epoch,
                               split=args.test_split or args.val_split)
        _logger.info(f'test at the best validation epoch ({best_epoch}): top1 {results["test"]["top1"]:.2f}, '
                     f'error {100 - results["test"]["top1"]:.2f}%')
    if args.primary:
        with open(os.path.join(output_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=2)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


def _append_epoch_log(path: str, epoch: int, stats: Dict[str, float], eval_metrics) -> None:
    row = OrderedDict(epoch=epoch, wall_s=round(stats['wall_s'], 3), images_per_s=round(stats['images_per_s'], 1),
                      mean_active_blocks=round(stats['mean_active_blocks'], 3), num_blocks=stats['num_blocks'],
                      train_loss=stats['loss'], eval_top1=eval_metrics['top1'] if eval_metrics else '')
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return train(parse_train_args(argv))
