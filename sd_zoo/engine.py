"""The loops: one training epoch and an evaluation pass, with one autocast rule and one device rule."""
import logging
import math
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .stochastic_depth import active_blocks, stochastic_blocks

_logger = logging.getLogger('sd_zoo.train')


def default_device(device: Optional[str] = None) -> torch.device:
    """``device``, else cuda when there is one, else cpu; a device that is not there is a clear error."""
    name = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f'--device {name!r} is not a device ({e})') from e
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name!r}: this machine has no CUDA GPU (use --device cpu)')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f'--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), '
                         f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast trains about 1.7x
    faster than float32; elsewhere oneDNN emulates bf16 and autocast is slower than float32."""
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, amp: bool = False, amp_dtype: str = 'float16') -> Optional[torch.dtype]:
    """The dtype ``--amp`` asks for, as timm does it: float16 or bfloat16 on CUDA, bfloat16 on CPU (no float16
    there); None without ``amp`` (float32)."""
    if not amp:
        return None
    return torch.bfloat16 if amp_dtype == 'bfloat16' or device.type == 'cpu' else torch.float16


def training_dtype(device: torch.device, amp: bool = False, amp_dtype: str = 'float16',
                   native_bf16: Optional[bool] = None) -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype a training run uses (None: float32) and the log line that says why. On a CPU,
    ``--amp`` is bfloat16 where the CPU computes it natively and float32 elsewhere, where emulated bf16 would
    only be slower: so a recipe can ask for ``amp`` and train at the best speed on any CPU."""
    dtype = autocast_dtype(device, amp, amp_dtype)
    if dtype is None:
        return None, 'precision: float32 (no --amp)'
    if device.type != 'cpu':
        return dtype, f'precision: {str(dtype)[6:]} autocast on {device.type}'
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if native:
        return dtype, 'precision: bfloat16 autocast (this CPU has native bfloat16: AVX512-BF16 / AMX)'
    return None, ('precision: float32: --amp asks for bfloat16 autocast, but this CPU has no native bfloat16 '
                  '(AVX512-BF16 / AMX), where it would train slower than float32')


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``; float32 (no autocast) for None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Float32Loss(nn.Module):
    """``loss(output.float(), target)``: CPU autocast leaves log_softmax in bfloat16 (CUDA's casts it to float32),
    so timm's label-smoothing and soft-target (mixup) losses, and their gradients, would be bfloat16 too."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output.float(), target)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, dtype: Optional[torch.dtype] = None,
             channels_last: bool = False) -> 'OrderedDict[str, float]':
    """Loss, top-1 and top-5 (in %) of ``model`` on ``loader``, as timm's validate reports them."""
    from timm.utils import accuracy
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    total, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            output = model(images)
        output = output.float()
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        n = images.shape[0]
        loss_sum += loss_fn(output, target).item()
        top1_sum += acc1.item() * n
        top5_sum += acc5.item() * n
        total += n
    if total == 0:
        raise ValueError('the evaluation split is empty')
    return OrderedDict(loss=loss_sum / total, top1=top1_sum / total, top5=top5_sum / total)


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite: training stops at that step, before any checkpoint has it."""


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


def train_one_epoch(task, loader, optimizer, *, epoch: int, device: torch.device, num_updates: int,
                    lr_scheduler=None, loss_scaler=None, mixup_fn=None,
                    dtype: Optional[torch.dtype] = None, channels_last: bool = False, grad_accum_steps: int = 1,
                    clip_grad: Optional[float] = None, clip_mode: str = 'norm', world_size: int = 1,
                    progress: bool = False, log_interval: int = 0) -> Dict[str, float]:
    """One epoch of ``task`` (timm's ClassificationTask), autocast to ``dtype`` (None: float32).
    ``lr_scheduler``, when given, steps per update.
    Returns the mean loss, wall-clock seconds, images/s (all ranks) and the mean number of active blocks."""
    blocks = stochastic_blocks(task.get_trainable_module())
    task.train()
    losses, seen, active_sum, batches = 0.0, 0, 0, 0
    steps = len(loader)
    start = time.perf_counter()
    bar = _progress(loader, steps, f'epoch {epoch}', progress)
    optimizer.zero_grad()
    for batch_idx, (images, target) in enumerate(bar):
        images, target = images.to(device), target.to(device)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_accum = (batch_idx + 1) % grad_accum_steps == 0 or batch_idx + 1 == steps
        with nullcontext() if last_accum else task.no_sync():
            with autocast(device, dtype):
                loss = task(images, target)['loss']
            _backward(loss / grad_accum_steps, task, optimizer, loss_scaler, last_accum, clip_grad, clip_mode)
        if last_accum:
            optimizer.zero_grad()
            num_updates += 1
            task.update_ema(step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        loss_value = loss.item()  # the step's one sync, after its backward and update were queued
        if not math.isfinite(loss_value):  # stop before any checkpoint holds what this step did
            raise NonFiniteLoss(f'the training loss is {loss_value} at epoch {epoch}, step {batch_idx}')
        n = images.shape[0]
        losses += loss_value * n
        seen += n
        batches += 1
        active_sum += active_blocks(blocks, n)
        if bar is not loader or (log_interval and (batch_idx % log_interval == 0 or batch_idx + 1 == steps)):
            elapsed = time.perf_counter() - start
            img_s, active = seen * world_size / elapsed, active_sum / batches
            if bar is not loader:
                gates = dict(active=f'{active:.1f}/{len(blocks)}') if blocks else {}
                bar.set_postfix(loss=f'{losses / seen:.4f}', img_s=f'{img_s:.0f}', **gates, refresh=False)
            else:
                gates = f', active {active:.2f}/{len(blocks)}' if blocks else ''
                _logger.info(f'epoch {epoch} [{batch_idx + 1}/{steps}] loss {losses / seen:.4f} {img_s:.0f} '
                             f'img/s{gates}')
    wall = time.perf_counter() - start
    return dict(loss=losses / max(seen, 1), wall_s=wall, images_per_s=seen * world_size / max(wall, 1e-9),
                mean_active_blocks=active_sum / max(batches, 1), num_blocks=len(blocks), num_updates=num_updates)


def _backward(loss, task, optimizer, loss_scaler, step: bool, clip_grad, clip_mode: str) -> None:
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                    parameters=task.get_clip_parameters(), need_update=step)
        return
    loss.backward()
    if step:
        if clip_grad is not None:
            from timm.utils import dispatch_clip_grad
            dispatch_clip_grad(task.get_clip_parameters(), clip_grad, mode=clip_mode)
        optimizer.step()
