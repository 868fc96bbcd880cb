"""``sd-zoo train``: a training command built on timm's library.

timm does the work: ``timm.data`` (datasets, transforms, mixup), ``timm.optim``, ``timm.scheduler``,
``timm.task`` (loss, DDP wrapping, EMA, checkpoint state and resume) and ``timm.utils`` (summary, distributed
set-up). The run folder (its files, checks, checkpoints and logs) is ``sd_zoo.runs.RunFolder``; the flags are
``sd_zoo.train_args``. Flags and ``--config`` YAML keys use timm train.py's names, and the output folder has
timm's layout (args.yaml, summary.csv, last.pth.tar, model_best.pth.tar), so checkpoints move freely
between this command and timm's scripts. What sd-zoo adds for the paper's recipes:

* ``--cifar-aug``: 4-pixel zero padding + random 32x32 crop + horizontal flip (timm has no such transform);
* ``--val-holdout N``: hold N training images out for validation, and report the test split at the best
  validation epoch (the paper's protocol);
* the wall-clock time of every epoch and the mean number of active blocks, in ``epochs.csv``;
* resume continues the gate sequence where it stopped.
"""
import argparse
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoints import AtomicCheckpointSaver
from .data import Augmentation, DataSource, build_loaders, check_class_count, image_mode, resolve_data_config, \
    set_loader_epoch
from .engine import Float32Loss, NonFiniteLoss, default_device, evaluate, train_one_epoch, training_dtype
from .loading import load_weights
from .models.sd_resnet_cifar import arch_depth
from .runs import ResumePoint, RunFolder, cannot_resume, create_run_model, gate_seed_of, test_split_of
from .stochastic_depth import compile_blocks, mix_seeds, set_gate_seed
from .train_args import build_train_parser, check_train_args, make_train_args, parse_train_args

__all__ = ['train', 'run_training', 'main', 'build_train_parser', 'parse_train_args', 'make_train_args']

_logger = logging.getLogger('sd_zoo.train')


@dataclass(frozen=True)
class Process:
    """Where this training process runs: its device and its place among the DDP processes (timm's set-up)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def primary(self) -> bool:
        return self.rank == 0


@dataclass
class _Training:
    """What one training process works with: built by :func:`_prepare`, run by :func:`_train_epochs`."""
    args: argparse.Namespace  # as parsed: never changed
    process: Process
    folder: RunFolder
    values: Dict[str, Any]  # the run's arguments as args.yaml records them (classes resolved)
    model: nn.Module
    task: Any  # timm.task.ClassificationTask
    optimizer: Any
    loss_scaler: Any
    mixup_fn: Any
    loaders: Any
    dtype: Optional[torch.dtype] = None  # autocast (training_dtype); None: float32
    resume: Optional[ResumePoint] = None
    start_epoch: int = 0
    lr_scheduler: Any = None
    num_epochs: int = 0
    updates_per_epoch: int = 0
    saver: Optional[AtomicCheckpointSaver] = None

    @property
    def device(self) -> torch.device:
        return self.process.device


def run_training(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as ``args`` (from ``parse_train_args`` or ``make_train_args``) says; returns the final results."""
    run = _prepare(args)
    try:
        _schedule(run)
        _open_run_folder(run)
        eval_metrics = _train_epochs(run)
        return _finish(run, eval_metrics)
    finally:
        run.folder.release()


def _setup(args: argparse.Namespace) -> Process:
    import importlib
    from timm.utils import random_seed, setup_default_logging
    from timm.utils.distributed import init_distributed_device_so
    check_train_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    if not logging.root.handlers:  # timm's adds a handler per call: train() twice would log every line twice
        setup_default_logging()
    dist = init_distributed_device_so(device=str(default_device(args.device)))
    process = Process(device=torch.device(dist['device']), rank=dist['global_rank'], world_size=dist['world_size'],
                      distributed=dist['distributed'])
    random_seed(args.seed, process.rank)
    return process


def _prepare(args: argparse.Namespace) -> _Training:
    """The run folder (held), model, loss, optimizer, loaders and EMA; a resumed run's state; compiled branches;
    DDP."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.task import ClassificationTask
    from timm.utils import NativeScaler
    process = _setup(args)
    folder = RunFolder.for_training(output=args.output, experiment=args.experiment, model=args.model,
                                    resume=args.resume)
    if process.primary:
        folder.hold(args.resume)
    try:
        resume = folder.read_resume(args.resume, need_optimizer=not args.no_resume_opt) if args.resume else None
        model, data_config = build_model(args, process)
        values = dict(vars(args), num_classes=model.num_classes, device=str(process.device),
                      distributed=process.distributed, world_size=process.world_size,
                      gate_seed=args.seed if resume is None else resume.gate_seed)  # new runs: their --seed
        start_epoch = check_start(args, folder, resume, values, process.primary)  # before the loaders
        mixup_fn, train_loss_fn = _losses_and_mixup(args, model.num_classes)
        task = ClassificationTask(model=model, criterion=Float32Loss(train_loss_fn), device=process.device,
                                  verbose=process.primary)
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        dtype, precision = training_dtype(process.device, args.amp, args.amp_dtype)
        if process.primary:
            _logger.info(precision)
        loss_scaler = NativeScaler(device=process.device.type) if dtype == torch.float16 else None
        loaders = _build_loaders(args, data_config, process, _augmentation(args, model, process.primary))
        check_class_count(loaders.classes, model.num_classes, f'the training split {args.train_split!r}')
        if args.model_ema:
            task.setup_ema(decay=args.model_ema_decay)
        if resume is not None:
            _restore(args, resume, task, optimizer, loss_scaler, process.primary)
        if args.torchcompile:
            compile_blocks(model, backend=args.torchcompile)
        if process.distributed:
            task.prepare_distributed(device_ids=[process.device.index] if process.device.type == 'cuda' else None)
        return _Training(args=args, process=process, folder=folder, values=values, model=model, task=task,
                         optimizer=optimizer, loss_scaler=loss_scaler, mixup_fn=mixup_fn, loaders=loaders,
                         dtype=dtype, resume=resume, start_epoch=start_epoch)
    except BaseException:
        folder.release(remove_unused=True)  # a run that never started leaves no folder it made
        raise


def build_model(args: argparse.Namespace, process: Process):
    """The model of the run (a tagged name takes its classes, mean/std and input size from the tag's config),
    on the process's device, with the resolved data config."""
    model = create_run_model(vars(args), pretrained=args.pretrained)
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(model, vars(args), verbose=process.primary)
    model.to(process.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, data_config


def check_start(args: argparse.Namespace, folder: RunFolder, resume: Optional[ResumePoint], values: Dict[str, Any],
                primary: bool = True) -> int:
    """The epoch the run starts at: where a --resume continues its run as it was (RunFolder.check_resume), with an
    epoch left to train. Before any data is loaded."""
    start_epoch = args.start_epoch or 0
    if resume is not None:
        folder.check_resume(resume, values, args.start_epoch)
        start_epoch = resume.start_epoch if args.start_epoch is None else args.start_epoch
    total = _schedule_epochs(args)
    if start_epoch < total:
        return start_epoch
    if args.start_epoch is not None:
        raise ValueError(f'--start-epoch {start_epoch} leaves none of the schedule\'s {total} epochs to train')
    if resume.in_place and not (folder.path / 'results.json').exists():
        if primary:
            _logger.info(f'all {total} epochs are trained (a stop came before the results): writing them')
        return start_epoch
    raise ValueError(f'the run already finished its {total} epoch{"s" if total != 1 else ""} (--resume '
                     f'{args.resume} is epoch {start_epoch - 1}): give a larger --epochs to train on')


def _schedule_epochs(args: argparse.Namespace) -> int:
    """The epochs the run trains: --epochs plus any cooldown or warmup prefix timm's schedule adds. timm tells
    it with the scheduler; a stand-in optimizer asks it before any data is loaded (a bad --sched fails here)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # counts epochs only
    return create_scheduler_v2(stand_in, **scheduler_kwargs(args), updates_per_epoch=1)[1]


def _losses_and_mixup(args: argparse.Namespace, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.mixup > 0 or args.cutmix > 0:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                     num_classes=num_classes), SoftTargetCrossEntropy()
    if args.smoothing:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()


def _augmentation(args: argparse.Namespace, model: nn.Module, primary: bool) -> Augmentation:
    """The training augmentation; without --cifar-aug / --no-cifar-aug, the model family's: the paper's pad + crop
    + flip for a CIFAR model (timm's RandomResizedCrop at scale 0.08 would crop most of a 32-pixel image away),
    timm's transform for the others. The log says which."""
    family_cifar = arch_depth(model.pretrained_cfg.get('architecture', '')) is not None
    cifar_aug = family_cifar if args.cifar_aug is None else args.cifar_aug
    aug = Augmentation(cifar_aug=cifar_aug, no_aug=args.no_aug, hflip=args.hflip, scale=tuple(args.scale),
                       ratio=tuple(args.ratio))
    if primary and aug.kind == 'cifar':
        why = f'{args.model} is a CIFAR model; --no-cifar-aug for timm\'s transform' if args.cifar_aug is None \
            else '--cifar-aug'
        _logger.info(f'augmentation: 4-pixel pad + random crop + flip ({why}); --scale/--ratio are for timm\'s '
                     f'transform (train.py) and are not used')
    elif primary and aug.kind == 'timm':
        _logger.info(f'augmentation: timm\'s RandomResizedCrop (scale {aug.scale}, ratio {aug.ratio}) + flip')
    return aug


def _build_loaders(args: argparse.Namespace, data_config, process: Process, aug: Augmentation):
    img_mode = args.input_img_mode or image_mode(data_config)
    source = DataSource(dataset=args.dataset, root=args.data_dir, download=args.dataset_download, img_mode=img_mode)
    return build_loaders(
        source, data_config=data_config, train_split=args.train_split, val_split=args.val_split,
        test_split=test_split_of(vars(args)), batch_size=args.batch_size,
        eval_batch_size=args.validation_batch_size or args.batch_size, aug=aug, loader=args.loader,
        val_holdout=args.val_holdout, train_subset=args.train_subset, val_subset=args.val_subset,
        workers=args.workers, pin_memory=args.pin_mem, seed=args.seed, rank=process.rank,
        world_size=process.world_size, device=process.device)


def _restore(args: argparse.Namespace, resume: ResumePoint, task, optimizer, loss_scaler, primary: bool) -> None:
    """Model, optimizer, loss-scaler and EMA state from --resume, with timm's task helpers. A checkpoint without
    EMA weights starts the EMA from its model weights (setup_ema copied the untrained model)."""
    from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
    try:
        resume_task_checkpoint(task, resume.path, optimizer=None if args.no_resume_opt else optimizer,
                               loss_scaler=loss_scaler, log_info=primary)
        if task.has_ema():
            load_task_ema_checkpoint(task, resume.path)
    except Exception as e:  # a foreign or damaged file: say which, and that nothing was written
        raise ValueError(cannot_resume(resume.path, e)) from e
    if task.has_ema() and 'state_dict_ema' not in resume.meta and primary:
        _logger.info(f'{resume.path} has no EMA weights: the EMA starts from its model weights')


def _schedule(run: _Training) -> None:
    """The learning-rate schedule and the gate sequence, both at the start epoch."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    args, steps_per_epoch = run.args, len(run.loaders.train)
    run.updates_per_epoch = math.ceil(steps_per_epoch / args.grad_accum_steps)
    # gates continue from where an interrupted run stopped, identically on every rank
    set_gate_seed(run.model, gate_seed_of(run.values), step=run.start_epoch * steps_per_epoch)
    run.lr_scheduler, run.num_epochs = create_scheduler_v2(run.optimizer, **scheduler_kwargs(args),
                                                           updates_per_epoch=run.updates_per_epoch)
    if run.start_epoch > 0 and run.lr_scheduler is not None:  # --sched none: timm leaves the lr as it is
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.start_epoch * run.updates_per_epoch)
        else:
            run.lr_scheduler.step(run.start_epoch)


def _open_run_folder(run: _Training) -> None:
    """On the primary process: args.yaml, the logs reconciled with a resumed checkpoint, the saver, one line."""
    args, loaders = run.args, run.loaders
    if not run.process.primary:
        return
    saver = AtomicCheckpointSaver(run.folder.path, task=run.task, optimizer=run.optimizer, args=args,
                                  loss_scaler=run.loss_scaler, decreasing=args.eval_metric == 'loss',
                                  max_history=args.checkpoint_hist)
    run.saver = run.folder.start(run.values, run.resume, saver)
    _logger.info(f'{args.model}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, '
                 f'{loaders.counts["train"]} train / {loaders.counts.get("val", 0)} val / '
                 f'{loaders.counts.get("test", 0)} test images ({loaders.kind} loader), '
                 f'epochs {run.start_epoch}..{run.num_epochs - 1}, output {run.folder.path}')


def _train_epochs(run: _Training) -> Optional[Dict[str, float]]:
    """Train, validate, checkpoint and log each epoch; returns the last validation metrics."""
    from timm.utils import distribute_bn, random_seed
    args, task, loaders = run.args, run.task, run.loaders
    num_updates = run.start_epoch * run.updates_per_epoch
    eval_metrics, epoch_times = None, []
    for epoch in range(run.start_epoch, run.num_epochs):
        epoch_start = time.perf_counter()
        # torch's, numpy's and Python's generators (mixup, 'sample' gates) from (seed, epoch): a resume continues them
        random_seed(mix_seeds(args.seed, epoch) % 2 ** 31, run.process.rank)
        set_loader_epoch(loaders.train, epoch)
        stats = _train_epoch(run, epoch, num_updates)
        num_updates = stats['num_updates']
        if run.process.distributed:
            distribute_bn(run.model, run.process.world_size, reduce=False)  # rank 0's BN statistics everywhere
        if loaders.val is not None:
            # timm's train.py reports the EMA model when there is one
            eval_metrics = evaluate(task.get_eval_model(ema=task.has_ema()), loaders.val, run.device,
                                    dtype=run.dtype, channels_last=args.channels_last)
        lr = run.optimizer.param_groups[0]['lr']
        if run.lr_scheduler is not None:
            run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric] if eval_metrics else None)
        if run.process.primary:
            record = dict(epoch=epoch, train_metrics=dict(loss=stats['loss']), lr=lr, stats=stats,
                          eval_metrics=dict(eval_metrics) if eval_metrics else None)
            run.folder.save_epoch(run.saver, record, eval_metrics[args.eval_metric] if eval_metrics else None)
            epoch_times.append(time.perf_counter() - epoch_start)
            _log_epoch(epoch, stats, eval_metrics, epochs_left=run.num_epochs - 1 - epoch, epoch_times=epoch_times)
    return eval_metrics


def _train_epoch(run: _Training, epoch: int, num_updates: int) -> Dict[str, float]:
    """One epoch; a loss that turns NaN or infinite stops the run with a one-line error that names the last
    good checkpoint (no checkpoint of this epoch is written)."""
    args, primary = run.args, run.process.primary
    try:
        return train_one_epoch(
            run.task, run.loaders.train, run.optimizer, epoch=epoch, device=run.device, num_updates=num_updates,
            lr_scheduler=run.lr_scheduler if args.sched_on_updates else None, loss_scaler=run.loss_scaler,
            mixup_fn=run.mixup_fn, dtype=run.dtype, channels_last=args.channels_last,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            world_size=run.process.world_size, progress=primary and not args.no_progress,
            log_interval=args.log_interval if primary else 0)
    except NonFiniteLoss as e:
        last = run.folder.path / 'last.pth.tar'
        where = f'the last good checkpoint is {last} (epoch {epoch - 1})' if epoch > 0 and last.exists() \
            else 'no checkpoint was written'
        raise NonFiniteLoss(f'{e} (lr {run.optimizer.param_groups[0]["lr"]:g}): training stopped; {where}; a lower '
                            f'--lr or --clip-grad may help') from None


def _finish(run: _Training, eval_metrics: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """results.json (with the test split at the best validation epoch, where there is one); DDP torn down."""
    args, saver = run.args, run.saver
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver else (None, None)
    results: Dict[str, Any] = dict(model=args.model, output_dir=str(run.folder.path), epochs=run.num_epochs,
                                   best_epoch=best_epoch, best_metric=best_metric, eval_metric=args.eval_metric,
                                   last_eval=dict(eval_metrics) if eval_metrics else None,
                                   autocast=str(run.dtype).replace('torch.', '') if run.dtype else None)
    if run.process.primary and run.loaders.test is not None:
        results['test'] = dict(_test_at_best_epoch(run), epoch=best_epoch)
        _logger.info(f'test at the best validation epoch ({best_epoch}): top1 {results["test"]["top1"]:.2f}, '
                     f'error {100 - results["test"]["top1"]:.2f}%')
    if run.process.primary:
        run.folder.write_results(results)
    if run.process.distributed:
        torch.distributed.destroy_process_group()
    return results


def _test_at_best_epoch(run: _Training) -> Dict[str, Any]:
    """The test split evaluated on the best validation epoch's weights (the paper's protocol), in a model
    built as the training one was."""
    model = create_run_model(run.values)
    load_weights(model, run.folder.best_or_last(), use_ema=run.task.has_ema())
    model = model.to(run.device).eval()
    return dict(evaluate(model, run.loaders.test, run.device, dtype=run.dtype, channels_last=run.args.channels_last),
                split=test_split_of(run.values))


def _log_epoch(epoch: int, stats: Dict[str, float], eval_metrics, *, epochs_left: int = 0,
               epoch_times: Sequence[float] = ()) -> None:
    msg = f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["wall_s"]:.1f} s, ' \
          f'{stats["images_per_s"]:.0f} img/s'
    if stats['num_blocks']:  # a model without stochastic-depth gates has no blocks to count
        msg += f', {stats["mean_active_blocks"]:.2f}/{stats["num_blocks"]} blocks'
    if eval_metrics:
        msg += f', val top1 {eval_metrics["top1"]:.2f} loss {eval_metrics["loss"]:.4f}'
    if epochs_left and epoch_times:  # the median epoch of this process (training and validation), so a pause
        left_s = statistics.median(epoch_times) * epochs_left  # or a slow first epoch does not skew it
        msg += f'; {epochs_left} epoch{"s" if epochs_left > 1 else ""} left, about ' + \
            (f'{left_s / 3600:.1f} h' if left_s >= 3600 else f'{max(1, round(left_s / 60))} min')
    _logger.info(msg)


def train(config: str = '', **options) -> Dict[str, Any]:
    """Train a model from Python: ``config`` is a recipe name or YAML file, ``options`` are sd-zoo train's
    flags with ``_`` (they override the recipe). Returns the results (also in OUTPUT/results.json).

    >>> sd_zoo.train('cifar10_resnet20_sd', dataset='', data_dir='data/cifar10', epochs=1)
    """
    return run_training(make_train_args(config, **options))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return run_training(parse_train_args(argv))
