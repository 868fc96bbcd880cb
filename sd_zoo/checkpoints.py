"""Training checkpoints in timm's files and keys, each put in place by one atomic rename.

Why our own saver: timm's CheckpointSaver unlinks ``last.pth.tar`` (``model_best``, ``checkpoint-N``) before it
moves the new file there, so a kill in between leaves none. This one writes the same files with the same entries
(``epoch``, ``arch``, ``args``, ``optimizer``, the task's ``state_dict``/``state_dict_ema``, ``metric``, and the
``saver`` bookkeeping timm's CheckpointSaver resumes from), through timm's public API only, and a file is always
the old one or the new, complete one.
"""
import logging
import math
import operator
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ['AtomicCheckpointSaver', 'check_saver_state', 'read_checkpoint_metadata']

_logger = logging.getLogger('sd_zoo.train')
LAST, BEST, TMP = 'last.pth.tar', 'model_best.pth.tar', 'tmp.pth.tar'
NUMBERED = re.compile(r'checkpoint-(\d+)\.pth\.tar')


def read_checkpoint_metadata(path: str) -> Dict[str, Any]:
    """A training checkpoint's entries, weights_only (timm's allow-list), tensors memory-mapped."""
    from timm.utils import load_checkpoint_metadata
    return load_checkpoint_metadata(path)


def _fsync(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


class AtomicCheckpointSaver:
    """``last.pth.tar`` every epoch; ``checkpoint-N.pth.tar`` for the ``max_history`` best epochs by the metric
    (newest first without one) and ``model_best.pth.tar``, ranked as timm's CheckpointSaver ranks them."""

    def __init__(self, folder: Path, *, task, optimizer, args, loss_scaler=None, decreasing: bool = False,
                 max_history: int = 10):
        self.folder, self.task, self.optimizer, self.args, self.loss_scaler = Path(folder), task, optimizer, args, \
            loss_scaler
        self.better = operator.lt if decreasing else operator.gt
        self.decreasing, self.max_history = decreasing, max_history
        self.files: List[Tuple[str, Optional[float]]] = []  # (name, metric): ranked best first, then newest first
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None

    # -- timm's bookkeeping format (a run resumes with either saver)
    def state_dict(self, epoch: Optional[int] = None, metric: Optional[float] = None) -> Dict[str, Any]:
        return dict(checkpoint_files=list(self.files), best_epoch=self.best_epoch, best_metric=self.best_metric,
                    pending=(epoch, metric))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The bookkeeping of the checkpoint a run resumes from; files since removed are dropped, and the
        checkpoint's own numbered copy (made right after it was written, or now where a kill came first) is
        tracked."""
        check_saver_state(state)
        # only names this saver makes (checkpoint-N.pth.tar): a tampered record never names another file to evict
        self.files = [(os.path.basename(f), _rankable(m)) for f, m in state.get('checkpoint_files', [])
                      if NUMBERED.fullmatch(os.path.basename(f)) and (self.folder / os.path.basename(f)).exists()]
        self.best_epoch, self.best_metric = state.get('best_epoch'), _rankable(state.get('best_metric'))
        epoch, metric = state.get('pending', (None, None))
        if epoch is not None and self._numbered(epoch) not in [f for f, _ in self.files]:
            if (self.folder / self._numbered(epoch)).exists():
                self._track(epoch, metric, update_best_file=False)
            elif _epoch_of(self.folder / LAST) == epoch:  # killed between last.pth.tar and its numbered copy
                self._rank(epoch, metric)
        self.repair_best()

    # -- saving
    def save_checkpoint(self, epoch: int, metric: Optional[float] = None) -> None:
        tmp, last = self.folder / TMP, self.folder / LAST
        torch.save(self._checkpoint_state(epoch, metric), tmp)
        self.written(tmp, epoch)
        os.replace(tmp, last)
        self._rank(epoch, metric)

    def _rank(self, epoch: int, metric: Optional[float]) -> None:
        """last.pth.tar (``epoch``) among the numbered copies: copied to checkpoint-N if it ranks, the worst
        evicted, model_best updated. A NaN metric (a diverged --eval-metric loss) ranks as none."""
        metric = _rankable(metric)
        worst = self.files[-1] if self.files else None
        if len(self.files) < self.max_history or worst[1] is None or \
                (metric is not None and self.better(metric, worst[1])):
            for name, _ in self.files[self.max_history - 1:]:
                (self.folder / name).unlink(missing_ok=True)
            self.files = self.files[:self.max_history - 1]
            self._duplicate(self.folder / LAST, self.folder / self._numbered(epoch))
            self._track(epoch, metric)

    def written(self, path: Path, epoch: int) -> None:
        """The checkpoint is complete on disk (in tmp.pth.tar), not yet in place."""
        _fsync(path)

    def _checkpoint_state(self, epoch: int, metric: Optional[float]) -> Dict[str, Any]:
        from timm.utils import unwrap_model
        state: Dict[str, Any] = dict(epoch=epoch, arch=self.args.model, args=self.args, version=2,
                                     optimizer=self.optimizer.state_dict())
        if self.loss_scaler is not None:
            state[self.loss_scaler.state_dict_key] = self.loss_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=unwrap_model))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=unwrap_model))
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        return state

    def _track(self, epoch: int, metric: Optional[float], update_best_file: bool = True) -> None:
        ranked = sorted([f for f in self.files if f[1] is not None] + ([(self._numbered(epoch), metric)]
                        if metric is not None else []), key=lambda f: f[1], reverse=not self.decreasing)
        unranked = ([(self._numbered(epoch), None)] if metric is None else []) + \
            [f for f in self.files if f[1] is None]
        self.files = ranked + unranked
        if metric is not None and (self.best_metric is None or self.better(metric, self.best_metric)):
            self.best_epoch, self.best_metric = epoch, metric
            if update_best_file:
                self._duplicate(self.folder / LAST, self.folder / BEST)

    def repair_best(self) -> None:
        """A kill between a checkpoint and its model_best copy leaves model_best one best epoch behind the
        bookkeeping: copy the best epoch's checkpoint there again."""
        best = self.folder / BEST
        if self.best_epoch is None or _epoch_of(best) == self.best_epoch:
            return
        for name in (self._numbered(self.best_epoch), LAST):
            if _epoch_of(self.folder / name) == self.best_epoch:
                _logger.warning(f'{BEST} was not epoch {self.best_epoch}\'s (an interrupted save): copied {name} there')
                self._duplicate(self.folder / name, best)
                return

    @staticmethod
    def _numbered(epoch: int) -> str:
        return f'checkpoint-{epoch}.pth.tar'

    @staticmethod
    def _duplicate(src: Path, dst: Path) -> None:
        """``dst`` becomes a hard link to (or a copy of) ``src`` by one rename: never absent, never partial."""
        tmp = dst.with_name(dst.name + '.tmp')
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _rankable(metric: Optional[float]) -> Optional[float]:
    """A metric that can be ranked; NaN or infinite compares with nothing, so it ranks as no metric."""
    return metric if metric is None or math.isfinite(metric) else None


def check_saver_state(state: Any) -> None:
    """The bookkeeping a checkpoint carries (timm's format), checked: a damaged record is a one-line error at the
    resume, not a TypeError at the end of the next epoch."""
    def number(v):
        return v is None or isinstance(v, (int, float)) and not isinstance(v, bool)

    def epoch(v):
        return v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def pair(v, first, second):
        return isinstance(v, (list, tuple)) and len(v) == 2 and first(v[0]) and second(v[1])

    files, pending = (state.get('checkpoint_files', []), state.get('pending', (None, None))) \
        if isinstance(state, dict) else (None, None)
    if not (isinstance(files, (list, tuple)) and all(pair(f, lambda n: isinstance(n, str), number) for f in files)
            and epoch(state.get('best_epoch')) and number(state.get('best_metric'))
            and pair(pending, epoch, number)):
        raise ValueError('the checkpoint\'s saver record (which epochs rank best) is damaged: resume from an intact '
                         'checkpoint of the run')


def _epoch_of(path: Path) -> Optional[int]:
    try:
        return read_checkpoint_metadata(str(path)).get('epoch') if path.is_file() else None
    except Exception:  # an unreadable file is not that epoch's
        return None
