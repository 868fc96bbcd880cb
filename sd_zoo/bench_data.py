"""The benchmark's data section: end-to-end training epochs (loader + step) on timm's PIL loader and on the
in-memory loader, at constant depth and with stochastic depth, on real images.

Time spent decoding JPEGs in loader workers on the cores that train is time stochastic depth cannot save: the
epoch ratio SD / constant then drifts from the step ratio towards 1. This section measures both ratios and
each loader's images/s, on ``--data-images`` training images of a real data set.
"""
import statistics
import time
from typing import Any, Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Augmentation, DataSource, build_loaders, resolve_data_config
from .engine import autocast, autocast_dtype
from .stochastic_depth import set_gate_seed

LOADER_KINDS = ('timm', 'memory')
VARIANTS = ('constant', 'sd_batch')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _train_batch(model: nn.Module, opt, x, y, device, amp: bool, channels_last: bool) -> None:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, autocast_dtype(device, amp)):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _epoch(model, opt, loader, device, amp, channels_last, warmup_batches: int = 2) -> float:
    """Seconds for one whole epoch of ``loader``, loading included, after a few untimed batches. The gates
    restart at step 0, so the epoch runs the same gate sequence as the fixed-batch steps it is compared with."""
    for i, (x, y) in enumerate(loader):
        if i < warmup_batches:
            _train_batch(model, opt, x, y, device, amp, channels_last)
        # the rest of this pass is loaded untimed and unused: a new pass of persistent workers would first finish
        # the batches they queued for an abandoned one, inside the timed epoch
    set_gate_seed(model, 0, step=0)
    _sync(device)
    start = time.perf_counter()
    for x, y in loader:
        _train_batch(model, opt, x, y, device, amp, channels_last)
    _sync(device)
    return time.perf_counter() - start


def bench_data_model(name: str, source: DataSource, *, images: int, batch_size: int, drop_path: float,
                     workers: int, step_repeats: int, device: torch.device, amp: bool = False,
                     channels_last: bool = False, seed: int = 0) -> Dict[str, Any]:
    torch.manual_seed(seed)
    models = {'constant': timm.create_model(name, drop_path_rate=0.0)}
    models['sd_batch'] = timm.create_model(name, drop_path_rate=drop_path)
    models['sd_batch'].load_state_dict(models['constant'].state_dict())
    opts = {}
    for key, model in models.items():
        model.to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opts[key] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    data_config = resolve_data_config(models['constant'])
    loaders, build_s = {}, {}
    for kind in LOADER_KINDS:
        t0 = time.perf_counter()
        loaders[kind] = build_loaders(
            source, data_config=data_config, train_split='train', val_split=None, test_split=None,
            batch_size=batch_size, eval_batch_size=batch_size, aug=Augmentation(cifar_aug=True), loader=kind,
            train_subset=images, workers=workers, seed=seed, device=device).train
        build_s[kind] = time.perf_counter() - t0
    # the step alone, on one fixed batch, interleaved, over the epoch's number of steps and the same gate
    # sequence (gates restart at step 0 after the warm-up): what the epochs are compared with
    x, y = next(iter(loaders['memory']))
    steps: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    step_repeats = step_repeats or len(loaders['memory'])
    for i in range(2 + step_repeats):
        if i == 2:
            for model in models.values():
                set_gate_seed(model, 0, step=0)
        for v in VARIANTS:
            _sync(device)
            t0 = time.perf_counter()
            _train_batch(models[v], opts[v], x, y, device, amp, channels_last)
            _sync(device)
            if i >= 2:
                steps[v].append(time.perf_counter() - t0)
    epoch_s = {kind: {v: _epoch(models[v], opts[v], loaders[kind], device, amp, channels_last) for v in VARIANTS}
               for kind in LOADER_KINDS}
    n = len(loaders['memory']) * batch_size
    step_ratio = sum(steps['sd_batch']) / sum(steps['constant'])  # totals: the same gates as the epoch
    return dict(
        images_per_epoch=n, loader_setup_s=build_s,
        step_median_s={v: statistics.median(t) for v, t in steps.items()}, step_ratio=step_ratio,
        epoch_s=epoch_s,
        images_per_s={kind: {v: n / t for v, t in e.items()} for kind, e in epoch_s.items()},
        memory_speedup={v: epoch_s['timm'][v] / epoch_s['memory'][v] for v in VARIANTS},
        epoch_ratio={kind: e['sd_batch'] / e['constant'] for kind, e in epoch_s.items()},
        epoch_minus_step_ratio={kind: e['sd_batch'] / e['constant'] - step_ratio for kind, e in epoch_s.items()},
    )


def bench_data(*, models: List[str], source: DataSource, images: int, batch_size: int, drop_path: float,
               workers: int, step_repeats: int, device: torch.device, amp: bool = False,
               channels_last: bool = False, seed: int = 0) -> Dict[str, Any]:
    return dict(
        loaders=dict(timm=f'timm DataLoader, PIL pad-crop-flip in {workers} workers',
                     memory='decoded uint8 tensor on the device, batch-wise pad-crop-flip there'),
        workers=workers, drop_path=drop_path,
        models={name: bench_data_model(name, source, images=images, batch_size=batch_size, drop_path=drop_path,
                                       workers=workers, step_repeats=step_repeats, device=device, amp=amp,
                                       channels_last=channels_last, seed=seed)
                for name in models})


def format_data_table(res: Dict[str, Any]) -> List[str]:
    lines = ['', f"data path: end-to-end epoch (loader + step), p_L {1 - res['drop_path']:g}, "
                 f"{res['workers']} loader workers for timm's",
             f"{'model / loader':<28}{'const img/s':>12}{'SD img/s':>10}{'SD/const':>10}{'step ratio':>12}"]
    for name, m in res['models'].items():
        for kind in LOADER_KINDS:
            ips = m['images_per_s'][kind]
            lines.append(f"{name + ' / ' + kind:<28}{ips['constant']:>12.1f}{ips['sd_batch']:>10.1f}"
                         f"{m['epoch_ratio'][kind]:>10.3f}{m['step_ratio']:>12.3f}")
        lines.append(f"{name + ' memory / timm':<28}{m['memory_speedup']['constant']:>11.2f}x"
                     f"{m['memory_speedup']['sd_batch']:>9.2f}x")
    return lines
