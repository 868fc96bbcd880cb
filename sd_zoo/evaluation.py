"""``sd-zoo validate``: top-1 / top-5 / loss of a model on a dataset split, like timm's validate.py.

The model is a registered name (``sd_resnet110``, ``sd_resnet110.cifar10``), a name plus ``--checkpoint``
(a timm training checkpoint or a safetensors file), or ``hf-hub:ORG/NAME`` / ``local-dir:PATH``. timm's
own validate.py cannot import plugins; this command can, and so can a two-line wrapper (see README).
"""
import argparse
import csv
import io
import json
import time
from typing import Any, Dict, Optional, Sequence

import torch

from .data import DATASET_CHOICES_HELP, LOADERS, DataSource, build_eval_loader, image_mode, resolve_data_config
from .engine import autocast_dtype, default_device, evaluate
from .loading import HUB_PREFIX, LOCAL_PREFIX, load_model, load_weights
from .checks import check_at_least, check_output_file, write_atomic
from .runs import RunFolder


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sd-zoo validate', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='model name, hf-hub:ORG/NAME or local-dir:PATH')
    p.add_argument('--checkpoint', default='', help='weights to load (timm .pth.tar or .safetensors)')
    p.add_argument('--use-ema', action='store_true', default=False, help='the EMA weights of a checkpoint')
    p.add_argument('--pretrained', action='store_true', default=False, help='the pretrained weights of the config')
    p.add_argument('--data-dir', default=None, help='dataset root')
    p.add_argument('--dataset', default='', help=f'dataset type: {DATASET_CHOICES_HELP}')
    p.add_argument('--dataset-download', action='store_true', default=False)
    p.add_argument('--split', default=None,
                   help='split to evaluate (default: validation of an image folder, test of torch/* data sets)')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--subset', type=int, default=0, help='evaluate N random images only')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--loader', default='auto', choices=LOADERS,
                   help='memory: decode the split once (cached) and evaluate from memory; timm: timm\'s DataLoader; '
                        'auto (default): memory where it gives the same images')
    p.add_argument('--device', default=None)
    p.add_argument('--amp', action='store_true', default=False)
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--results-file', default='', help='write results here (.json or .csv)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --results-file')
    p.add_argument('--seed', type=int, default=42)
    return p


def validate(model: str, *, checkpoint: str = '', pretrained: bool = False, use_ema: bool = False,
             data_dir: Optional[str] = None, dataset: str = '', dataset_download: bool = False,
             split: Optional[str] = None, num_classes: Optional[int] = None, subset: int = 0, batch_size: int = 256,
             workers: int = 4, loader: str = 'auto', device: Optional[str] = None, amp: bool = False,
             amp_dtype: str = 'float16', channels_last: bool = False, results_file: str = '', overwrite: bool = False,
             seed: int = 42, quiet: bool = False) -> Dict[str, Any]:
    """Top-1 / top-5 / loss of ``model`` (a name, ``hf-hub:``, ``local-dir:``; with ``checkpoint``) on a split.

    >>> sd_zoo.validate('sd_resnet20.cifar10', pretrained=True, data_dir='cifar10', split='test')
    """
    if not isinstance(model, str):
        raise TypeError(f'validate(): model must be a model name, hf-hub:ORG/NAME or local-dir:PATH, got '
                        f'{type(model).__name__}')
    check_results_file(results_file, overwrite)
    split = split or ('test' if dataset else 'validation')  # torchvision's data sets have train and test only
    check_at_least({'--batch-size': batch_size}, 1)
    check_at_least({'--subset': subset, '--workers': workers}, 0)
    if not (checkpoint or pretrained or model.startswith((HUB_PREFIX, LOCAL_PREFIX))):
        raise ValueError(f'{model}: no weights to evaluate (it would be a random initialisation): give --pretrained, '
                         f'--checkpoint FILE, hf-hub:ORG/NAME or local-dir:PATH')
    if use_ema and not checkpoint:
        raise ValueError('--use-ema takes the EMA weights of a training checkpoint: give --checkpoint FILE '
                         '(published and pretrained weights hold one set of weights)')
    dev = default_device(device)
    run = RunFolder.open(checkpoint) if checkpoint else None
    net = _model_to_evaluate(model, run, pretrained, num_classes, use_ema).to(dev)
    if pretrained and not checkpoint and net.num_classes != net.pretrained_cfg.get('num_classes', net.num_classes):
        raise ValueError(f'{model}\'s pretrained weights have {net.pretrained_cfg["num_classes"]} classes: '
                         f'--num-classes {num_classes} would evaluate a new, untrained head')
    if channels_last:
        net.to(memory_format=torch.channels_last)
    # a training checkpoint is evaluated with the normalization its run trained with (args.yaml beside it)
    data_config = resolve_data_config(net, run.input_overrides() if run else None)
    source = DataSource(dataset=dataset, root=data_dir, download=dataset_download,
                        img_mode=image_mode(data_config))
    data, num_images = build_eval_loader(source, split, data_config=data_config, batch_size=batch_size,
                                         loader=loader, subset=subset, seed=seed, workers=workers, device=dev,
                                         num_classes=net.num_classes,
                                         label_names=net.pretrained_cfg.get('label_names') if not checkpoint else None)
    start = time.perf_counter()
    metrics = evaluate(net, data, dev, dtype=autocast_dtype(dev, amp, amp_dtype), channels_last=channels_last)
    results = dict(model=model, checkpoint=checkpoint or None, split=split, images=num_images,
                   top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
                   top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6),
                   param_count=round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
                   img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                   interpolation=data_config['interpolation'], seconds=round(time.perf_counter() - start, 2))
    if not quiet:
        print(json.dumps(results, indent=2))
    if results_file:
        write_results(results_file, results)
    return results


def _model_to_evaluate(name: str, run: Optional[RunFolder], pretrained: bool, num_classes: Optional[int],
                       use_ema: bool) -> torch.nn.Module:
    """A checkpoint's model is its run's, rebuilt from args.yaml (the one rebuild training and publish use);
    ``hf-hub:``/``local-dir:`` models take a checkpoint's weights as they are."""
    if run is None or name.startswith((HUB_PREFIX, LOCAL_PREFIX)):
        net = load_model(name, pretrained and run is None, num_classes)
        if run is not None:
            load_weights(net, str(run.checkpoint), use_ema=use_ema)
        return net.eval()
    net = run.model(name, use_ema=use_ema)
    if num_classes is not None and num_classes != net.num_classes:
        raise ValueError(f'{str(run.checkpoint)!r} has {net.num_classes} classes: drop --num-classes {num_classes}')
    return net


def check_results_file(path: str, overwrite: bool = False) -> None:
    """Before any evaluation runs: a results file must be .json or .csv, a new file unless ``overwrite``."""
    check_output_file('--results-file', path, overwrite, suffixes=('.json', '.csv'))


def write_results(path: str, results: Dict[str, Any]) -> None:
    """One results file, .json or .csv, put in place atomically."""
    if path.endswith('.csv'):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(results))
        w.writeheader()
        w.writerow(results)
        write_atomic(path, text.getvalue())
    elif path.endswith('.json'):
        write_atomic(path, json.dumps(results, indent=2))
    else:
        raise ValueError(f'--results-file {path!r} must end in .json or .csv')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return validate(**vars(build_validate_parser().parse_args(argv)))
