"""``sd-zoo validate``: top-1 / top-5 / loss of a model on a dataset split, like timm's validate.py.

The model is a registered name (``sd_resnet110``, ``sd_resnet110.cifar10``), a name plus ``--checkpoint``
(a timm training checkpoint or a safetensors file), or ``hf-hub:ORG/NAME`` / ``local-dir:PATH``. timm's
own validate.py cannot import plugins; this command can, and so can a two-line wrapper (see README).
"""
import argparse
import csv
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch

from .training import _Subset, _loader, _random_indices, _raw_dataset, evaluate, DATASET_CHOICES_HELP


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sd-zoo validate', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='model name, hf-hub:ORG/NAME or local-dir:PATH')
    p.add_argument('--checkpoint', default='', help='weights to load (timm .pth.tar or .safetensors)')
    p.add_argument('--use-ema', action='store_true', default=False, help='the EMA weights of a checkpoint')
    p.add_argument('--pretrained', action='store_true', default=False, help='the pretrained weights of the config')
    p.add_argument('--data-dir', default=None, help='dataset root')
    p.add_argument('--dataset', default='', help=f'dataset type: {DATASET_CHOICES_HELP}')
    p.add_argument('--dataset-download', action='store_true', default=False)
    p.add_argument('--split', default='validation', help='split to evaluate (default: validation)')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--subset', type=int, default=0, help='evaluate N random images only')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--device', default=None)
    p.add_argument('--amp', action='store_true', default=False)
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--results-file', default='', help='write results here (.json or .csv)')
    p.add_argument('--seed', type=int, default=42)
    return p


def load_model(name: str, checkpoint: str = '', pretrained: bool = False, num_classes: Optional[int] = None,
               use_ema: bool = False) -> torch.nn.Module:
    """A model from a name, a name and a checkpoint, ``hf-hub:`` or ``local-dir:``, in eval mode."""
    import timm
    import sd_zoo  # noqa: F401
    if checkpoint and not os.path.isfile(checkpoint):
        raise ValueError(f'checkpoint {checkpoint!r} does not exist')
    hub = name.startswith(('hf-hub:', 'local-dir:'))
    arch = name.split('.')[0]
    if not hub and arch not in timm.list_models():
        raise ValueError(f'unknown model {name!r}: sd-zoo models are {", ".join(timm.list_models("sd_*"))}')
    if hub:
        from .hub import load_published
        model = load_published(name, num_classes=num_classes)
        if checkpoint:
            load_weights(model, checkpoint, use_ema=use_ema)
        return model.eval()
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, use_ema=use_ema)
    return model.eval()


def load_weights(model: torch.nn.Module, checkpoint: str, use_ema: bool = False) -> None:
    """timm's load_checkpoint, with a clear ValueError for a file that is not weights for this model."""
    import timm
    if not os.path.isfile(checkpoint):
        raise ValueError(f'checkpoint {checkpoint!r} does not exist')
    try:
        state_dict = timm.models.load_state_dict(checkpoint, use_ema=use_ema)
    except Exception as e:  # torch.load / safetensors raise many types for a file that is not a checkpoint
        raise ValueError(f'{checkpoint!r} is not a timm checkpoint or safetensors file '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f'{checkpoint!r} holds no model state_dict')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f'the weights in {checkpoint!r} do not fit {type(model).__name__} '
                         f'({model.pretrained_cfg.get("architecture", "")}, {model.num_classes} classes): '
                         f'{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}'
                         ' (pass the matching --model / --num-classes)') from e


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    from timm.data import resolve_data_config
    from timm.data import create_transform
    if not args.dataset and not args.data_dir:
        raise ValueError('no dataset: give --data-dir DIR or --dataset torch/cifar10 --dataset-download')
    if args.data_dir and not args.dataset and not os.path.isdir(args.data_dir):
        raise ValueError(f'--data-dir {args.data_dir!r} is not a folder')
    if args.results_file and not args.results_file.endswith(('.json', '.csv')):
        raise ValueError(f'--results-file {args.results_file!r} must end in .json or .csv')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model = load_model(args.model, args.checkpoint, args.pretrained, args.num_classes, args.use_ema).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config({}, model=model)
    raw = _raw_dataset(_DataArgs(args), args.split, training=False)
    ds = _Subset(raw, _random_indices(len(raw), args.subset, args.seed), create_transform(**data_config))
    loader = _loader(ds, args.batch_size, _DataArgs(args), training=False, distributed=False)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, _EvalArgs(args))
    results = dict(model=args.model, checkpoint=args.checkpoint or None, split=args.split, images=len(ds),
                   top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
                   top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6),
                   param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                   img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
                   interpolation=data_config['interpolation'], seconds=round(time.perf_counter() - start, 2))
    print(json.dumps(results, indent=2))
    if args.results_file:
        write_results(args.results_file, results)
    return results


def write_results(path: str, results: Dict[str, Any]) -> None:
    if path.endswith('.csv'):
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(results))
            w.writeheader()
            w.writerow(results)
    elif path.endswith('.json'):
        with open(path, 'w') as f:
            json.dump(results, f, indent=2)
    else:
        raise ValueError(f'--results-file {path!r} must end in .json or .csv')


class _DataArgs:
    """The dataset/loader settings that training's helpers read, taken from validate's arguments."""

    def __init__(self, args):
        self.data_dir, self.dataset, self.dataset_download = args.data_dir, args.dataset, args.dataset_download
        self.batch_size, self.seed, self.workers, self.pin_mem = args.batch_size, args.seed, args.workers, False


class _EvalArgs:
    def __init__(self, args):
        self.amp, self.amp_dtype, self.channels_last = args.amp, args.amp_dtype, args.channels_last


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return validate(build_validate_parser().parse_args(argv))
