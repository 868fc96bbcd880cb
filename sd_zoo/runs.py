"""The run-folder contract: what ``sd-zoo train`` (and timm's train.py) leave in an output folder, and the
one function that rebuilds a run's model from it.

A run folder holds ``args.yaml`` (the training arguments), ``summary.csv`` (timm's columns), ``epochs.csv``
(sd-zoo's wall-clock seconds, images/s and active blocks per epoch), ``last.pth.tar`` and
``model_best.pth.tar`` (timm's checkpoint keys), ``last_epoch.json`` (the newest epoch's log rows, written
before its checkpoint) and ``results.json``.

Each epoch ends in this order: ``last_epoch.json``, then the checkpoint (atomically), then the log rows. So
after a kill the logs hold at most the checkpoint's epoch, and :func:`reconcile_logs` makes them end exactly
there when the run resumes: rows of later epochs (an older sd-zoo wrote them first) are dropped, a missing row
of the checkpoint's epoch comes back from ``last_epoch.json``.
"""
import csv
import json
import logging
import os
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .published import check_run_model_args

__all__ = ['RunFolder', 'RunFolderLock', 'create_run_model', 'run_input_overrides', 'model_kwargs_of', 'epochs_done',
           'read_csv', 'append_epoch_row', 'append_log_rows',
           'write_epoch_record', 'read_epoch_record', 'reconcile_logs', 'write_atomic', 'training_times']

_logger = logging.getLogger('sd_zoo.train')
EPOCH_RECORD = 'last_epoch.json'
LOG_FILES = ('summary.csv', 'epochs.csv')
LOCK_NAME = '.sd-zoo-train.lock'


class RunFolderLock:
    """One writer per run folder: an exclusive ``flock`` on ``FOLDER/.sd-zoo-train.lock``, held while a training
    process writes there. The kernel drops it when the process ends, however it ends (a SIGKILL included), so a
    lock never outlives its run and a stale lock file is simply taken over. A second run into the same folder (two
    ``--resume`` of one run, two new runs with one ``--experiment``) is a one-line error, never a second writer."""

    def __init__(self, folder: str):
        self.folder = folder
        self.created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one writer is then the user's to keep
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            os.close(self._fd)
            self._fd = None
            raise ValueError(f'the run folder {folder!r} is in use by another training process (pid {holder}): '
                             f'wait for it to end, or give another --experiment / --output') from None
        pid = f'{os.getpid()}\n'.encode()
        if os.pread(self._fd, 64, 0) != pid:  # who holds it, for the message above; unchanged, not rewritten
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, pid, 0)

    def release(self, remove_folder: bool = False) -> None:
        """Unlock; with ``remove_folder``, a folder this lock made and nothing else wrote to goes too."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if remove_folder and self.created and os.listdir(self.folder) == [LOCK_NAME]:
            os.remove(self.path)
            os.rmdir(self.folder)


class RunFolder:
    """One training run's folder, read: its arguments (args.yaml, empty when there is none), the checkpoint chosen
    in it, and :meth:`model`, the run's model rebuilt as it trained (validate --checkpoint and publish)."""

    def __init__(self, path: Path, checkpoint: Optional[Path] = None, args: Optional[Dict[str, Any]] = None):
        self.path = Path(path)
        self.checkpoint = checkpoint
        self.args = _read_args(self.path) if args is None else args

    @classmethod
    def open(cls, source: str, which: str = 'best') -> 'RunFolder':
        """A training output folder (its ``model_best`` or ``last`` checkpoint) or a checkpoint file in one."""
        path = Path(source)
        if not path.exists():
            raise ValueError(f'{source!r} does not exist: give a training output folder or a checkpoint file')
        if not path.is_dir():
            return cls(path.parent, path)
        names = ['model_best.pth.tar', 'last.pth.tar'] if which == 'best' else ['last.pth.tar']
        ckpt = next((path / n for n in names if (path / n).is_file()), None)
        if ckpt is None:
            raise ValueError(f'{source!r} has no {" or ".join(names)}: is it a training output folder?')
        return cls(path, ckpt)

    def input_overrides(self) -> Dict[str, Any]:
        return run_input_overrides(self.args)

    def model(self, name: Optional[str] = None, use_ema: bool = False) -> torch.nn.Module:
        """The run's model as it trained (:func:`create_run_model` with args.yaml's arguments; classes and input
        channels from the weights), with the checkpoint's weights, in eval mode. ``name`` may add a tag to the
        trained architecture's name, or name the architecture of a checkpoint without args.yaml."""
        from timm.models import get_arch_name
        from .loading import check_model_name, load_state, read_state_dict, shape_kwargs_from_weights
        name = check_model_name(self._model_name(name))
        state_dict = read_state_dict(str(self.checkpoint), use_ema=use_ema)
        try:
            check_run_model_args(model_kwargs_of(self.args), get_arch_name(name))
        except ValueError as e:
            raise ValueError(f'{str(self.path / "args.yaml")!r}: {e}') from None
        model = create_run_model(self.args, name=name, **shape_kwargs_from_weights(get_arch_name(name), state_dict))
        load_state(model, state_dict, str(self.checkpoint))
        return model.eval()

    def _model_name(self, given: Optional[str]) -> str:
        """The trained name where ``given`` only adds a tag to it (its config is the input the weights expect),
        else ``given``, else args.yaml's, else the checkpoint's ``arch`` entry (read weights_only)."""
        from timm.models import get_arch_name
        trained = self.args.get('model')
        if given and isinstance(trained, str) and get_arch_name(given) == get_arch_name(trained):
            return trained
        name = given or trained
        if not name and self.checkpoint.name.endswith(('.pth', '.pth.tar', '.tar')):
            from timm.utils import load_checkpoint_metadata
            try:
                meta = load_checkpoint_metadata(str(self.checkpoint))
            except Exception:  # not a timm checkpoint, or objects that weights_only refuses: never unpickled
                meta = {}
            name = meta.get('arch') if isinstance(meta, dict) else None
        if not name:
            raise ValueError(f'cannot tell the architecture of {str(self.checkpoint)!r} (no args.yaml beside it): '
                             f'pass --model')
        return name


def _read_args(folder: Path) -> Dict[str, Any]:
    """args.yaml of a run folder as a mapping ({} when there is none); anything else is an error."""
    path = folder / 'args.yaml'
    if not path.is_file():
        return {}
    try:
        args = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{path} is not valid YAML ({str(e).splitlines()[0]})') from e
    if not isinstance(args, dict):
        raise ValueError(f'{path} is not a mapping of training arguments')
    return args


def create_run_model(values: Dict[str, Any], *, name: Optional[str] = None, pretrained: bool = False,
                     **shape: int) -> torch.nn.Module:
    """The one place a run's model is built from its arguments (--model, --num-classes, --gp, --in-chans, --drop,
    --drop-path, --model-kwargs): the model that trains, the one that tests at the best epoch, and the one that
    validate --checkpoint and publish rebuild from args.yaml. ``shape`` (num_classes, in_chans from the weights)
    overrides the arguments."""
    import timm
    name = name or values['model']
    kwargs = dict(num_classes=values.get('num_classes'), global_pool=values.get('gp'),
                  in_chans=values.get('in_chans'), **model_kwargs_of(values))
    kwargs.update(shape)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the model does not take, e.g. a misspelt --model-kwargs key
        raise ValueError(f'{name} does not take these arguments ({e})') from e


INPUT_ARGS = ('input_size', 'img_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def run_input_overrides(args: Dict[str, Any]) -> Dict[str, Any]:
    """The input settings a run trained with, as timm data-config overrides: those its args.yaml sets, and
    where it sets no mean/std, those of the model name it trained (``sd_resnet110.cifar100``'s config)."""
    values = {k: args[k] for k in INPUT_ARGS if args.get(k) is not None}
    name = args.get('model')
    if name and not ('mean' in values and 'std' in values):
        import timm
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # hf-hub: / local-dir: names and other models: their weights' config applies
            cfg = None
        if cfg is not None:
            values.setdefault('mean', tuple(cfg.mean))
            values.setdefault('std', tuple(cfg.std))
    return values


def model_kwargs_of(values: Dict[str, Any]) -> Dict[str, Any]:
    """timm.create_model keyword arguments of a run's arguments: --drop / --drop-path and --model-kwargs, which
    must not contradict each other (timm's train.py passes both, so it cannot take a contradiction either)."""
    kwargs = dict(values.get('model_kwargs') or {})
    for flag, key in (('--drop', 'drop_rate'), ('--drop-path', 'drop_path_rate')):
        value = values.get(flag[2:].replace('-', '_'))
        if value is None:
            continue
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f'{flag} {value} and --model-kwargs {key}={kwargs[key]} disagree: give one')
        kwargs[key] = value
    return kwargs


def epochs_done(meta: Dict[str, Any]) -> int:
    """Epochs a timm training checkpoint has finished (timm's rule: from version 2 its ``epoch`` is the last
    finished one, counted from 0), which is also the epoch a resume starts at."""
    return meta['epoch'] + 1 if meta.get('version', 1) > 1 else meta['epoch']


def read_csv(path: Path) -> List[Dict[str, str]]:
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def append_epoch_row(path: str, epoch: int, stats: Dict[str, float], eval_metrics) -> None:
    """One row of epochs.csv: the epoch's wall-clock seconds, images/s and mean active blocks."""
    row = OrderedDict(epoch=epoch, wall_s=round(stats['wall_s'], 3), images_per_s=round(stats['images_per_s'], 1),
                      mean_active_blocks=round(stats['mean_active_blocks'], 3), num_blocks=stats['num_blocks'],
                      train_loss=stats['loss'], eval_top1=eval_metrics['top1'] if eval_metrics else '')
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def write_atomic(path: str, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: a reader (or a resume) sees the old file or the
    new one, never half of one."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_log_rows(output_dir: str, record: Dict[str, Any], only: Sequence[str] = LOG_FILES) -> None:
    """An epoch's rows of summary.csv (timm's columns, timm's writer) and epochs.csv, from its record."""
    from timm.utils import update_summary
    if 'summary.csv' in only:
        update_summary(record['epoch'], OrderedDict(record['train_metrics']), record['eval_metrics'],
                       filename=os.path.join(output_dir, 'summary.csv'), lr=record['lr'])
    if 'epochs.csv' in only:
        append_epoch_row(os.path.join(output_dir, 'epochs.csv'), record['epoch'], record['stats'],
                         record['eval_metrics'])


def write_epoch_record(output_dir: str, record: Dict[str, Any]) -> None:
    """The epoch's log data beside the checkpoint, before the checkpoint: what restores its rows if a kill
    comes between the checkpoint and the rows. JSON floats round-trip exactly, so restored rows are equal."""
    write_atomic(os.path.join(output_dir, EPOCH_RECORD), json.dumps(record))


def read_epoch_record(output_dir: str) -> Optional[Dict[str, Any]]:
    """The newest epoch's log rows as written before its checkpoint (None when absent or unreadable)."""
    path = os.path.join(output_dir, EPOCH_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) and isinstance(record.get('epoch'), int) else None
    except (OSError, ValueError):
        return None


def _rewrite_csv(path: str, fieldnames: List[str], rows: List[Dict[str, str]]) -> None:
    import io
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fieldnames, lineterminator='\r\n')  # csv's default, as timm writes
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, out.getvalue())


def reconcile_logs(output_dir: str, checkpoint_epoch: int) -> None:
    """Make summary.csv and epochs.csv end at ``checkpoint_epoch``, the epoch a resumed run continues after:
    drop rows of later epochs (they run again), restore that epoch's rows from last_epoch.json if a kill
    came between the checkpoint and the rows."""
    missing = []
    for name in LOG_FILES:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
            continue
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            fieldnames, rows = list(reader.fieldnames or []), list(reader)
        keep = [r for r in rows if r.get('epoch', '').isdigit() and int(r['epoch']) <= checkpoint_epoch]
        if len(keep) != len(rows):
            dropped = sorted({str(r.get('epoch')) for r in rows} - {r['epoch'] for r in keep})
            _logger.warning(f'{name}: dropped the rows of epochs {", ".join(dropped)}, after the checkpoint\'s '
                            f'epoch {checkpoint_epoch}: they run again')
            _rewrite_csv(path, fieldnames, keep)
        if not any(int(r['epoch']) == checkpoint_epoch for r in keep):
            missing.append(name)
    if not missing:
        return
    record = read_epoch_record(output_dir)
    if record is None or record['epoch'] != checkpoint_epoch:
        _logger.warning(f'{", ".join(missing)}: no row of epoch {checkpoint_epoch} and no record of it in '
                        f'{EPOCH_RECORD}: that row stays missing')
        return
    _logger.info(f'restored the rows of epoch {checkpoint_epoch} in {", ".join(missing)} from {EPOCH_RECORD}')
    append_log_rows(output_dir, record, only=missing)


def training_times(run_dir: Path) -> Optional[Dict[str, float]]:
    """Wall-clock time of a run from its epochs.csv: total and median epoch (robust to pauses)."""
    walls = [float(e['wall_s']) for e in read_csv(Path(run_dir) / 'epochs.csv') if e.get('wall_s')]
    if not walls:
        return None
    return dict(epochs=len(walls), total_s=sum(walls), median_epoch_s=statistics.median(walls))
