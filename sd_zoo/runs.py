"""The run-folder contract: what ``sd-zoo train`` (and timm's train.py) leave in an output folder, owned by one
object, :class:`RunFolder` (the training process writes it through it; validate and publish read it through it),
and :func:`create_run_model`, the one place a run's model is built from its arguments.

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
import math
import os
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from .checkpoints import NUMBERED, AtomicCheckpointSaver, check_saver_state, read_checkpoint_metadata
from .checks import write_atomic
from .data import TORCH_DATASETS
from .published import check_run_inputs, check_run_model_args
from .stochastic_depth import set_gate_seed

__all__ = ['RunFolder', 'RunFolderLock', 'create_run_model', 'run_input_overrides', 'model_kwargs_of', 'gate_seed_of',
           'epochs_done', 'read_csv', 'training_curves', 'append_epoch_row', 'append_log_rows',
           'write_epoch_record', 'read_epoch_record', 'reconcile_logs', 'training_times']

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
        try:  # O_NOFOLLOW: a link planted under the lock's name is not followed into another file
            self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0),
                                              0o644)
        except OSError as e:
            raise ValueError(f'the run folder {folder!r}: its lock file {LOCK_NAME} cannot be opened '
                             f'({"a symbolic link" if os.path.islink(self.path) else e.strerror})') from None
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
        self._check_inputs()
        return run_input_overrides(self.args)

    def _check_inputs(self) -> None:
        try:
            check_run_inputs(self.args)
        except ValueError as e:
            raise ValueError(f'{str(self.path / "args.yaml")!r}: {e}') from None

    def model(self, name: Optional[str] = None, use_ema: bool = False) -> torch.nn.Module:
        """The run's model as it trained (:func:`create_run_model` with args.yaml's arguments; classes and input
        channels from the weights), with the checkpoint's weights, in eval mode. ``name`` may add a tag to the
        trained architecture's name, or name the architecture of a checkpoint without args.yaml."""
        from timm.models import get_arch_name
        from .loading import check_model_name, load_state, read_state_dict, shape_kwargs_from_weights
        name = check_model_name(self._model_name(name))
        state_dict = read_state_dict(str(self.checkpoint), use_ema=use_ema)
        self._check_inputs()
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

    # -- the training side: one process writes the folder (see the module docstring for the order of files)

    @classmethod
    def for_training(cls, *, output: str, experiment: str, model: str, resume: str) -> 'RunFolder':
        """--output/--experiment; a resume without --experiment continues the run in the checkpoint's folder
        (unless --output names another parent folder), so the same command plus --resume continues the run."""
        run_dir = os.path.dirname(os.path.abspath(resume)) if resume else ''
        if run_dir and not experiment and (not output or os.path.abspath(output) == os.path.dirname(run_dir)):
            return cls(Path(run_dir), args={})
        name = experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), model.replace('/', '_')])
        return cls(Path(output or os.path.join('.', 'output', 'train')) / name, args={})

    def holds(self, checkpoint: str) -> bool:
        return bool(checkpoint) and os.path.dirname(os.path.abspath(checkpoint)) == os.path.abspath(self.path)

    def hold(self, resume: str) -> None:
        """The folder, checked and held for this process: a reused folder is an error, not an overwrite, and a
        folder another run is writing is an error, not a second writer. Before any work."""
        self.check_writable(resume)  # first: a refused folder is not made
        self._lock = RunFolderLock(str(self.path))
        try:
            self.check_writable(resume)  # again, held: another run may have written there meanwhile
        except BaseException:
            self.release(remove_unused=True)
            raise

    def release(self, remove_unused: bool = False) -> None:
        """Let the folder go; with ``remove_unused``, a folder this run made and never wrote to goes too."""
        lock, self._lock = getattr(self, '_lock', None), None
        if lock is not None:
            lock.release(remove_folder=remove_unused)

    def check_writable(self, resume: str) -> None:
        """A run writes only into a new folder, or into its own when it resumes from it: another run's args.yaml,
        logs and checkpoints are never overwritten nor mixed with this run's."""
        existing = os.path.abspath(self.path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f'the output folder {str(self.path)!r} cannot be made: {existing!r} is a file')
        if not self.path.is_dir():
            return
        links = sorted(n for n in os.listdir(self.path) if (n in RUN_FILES or NUMBERED.fullmatch(n) or
                                                             n == LOCK_NAME) and os.path.islink(self.path / n))
        if links:  # a run appends to its logs and saves into tmp.pth.tar: through a link, into another file
            raise ValueError(f'the run folder {str(self.path)!r} holds symbolic links where the run writes its '
                             f'files ({", ".join(links[:4])}): a run folder holds its own files only')
        if self.holds(resume):
            return
        held = sorted(n for n in os.listdir(self.path) if n in RUN_FILES or NUMBERED.fullmatch(n))
        if held:
            shown = ', '.join(held[:4]) + (', ...' if len(held) > 4 else '')
            raise ValueError(f'the output folder {str(self.path)!r} already holds a run ({shown}): '
                             f'{_resume_hint(str(self.path))}, or give another --experiment / --output')

    def read_resume(self, resume: str, *, need_optimizer: bool = True) -> 'ResumePoint':
        """--resume read once (its entries, tensors memory-mapped): an error unless it is a training checkpoint."""
        if not os.path.isfile(resume):
            raise ValueError(f'--resume {resume!r}: no such checkpoint file{_left_behind(resume)}')
        try:
            meta = read_checkpoint_metadata(resume)
        except Exception as e:  # a foreign or damaged file
            raise ValueError(cannot_resume(resume, e) + _intact_checkpoint(resume)) from e
        meta = meta if isinstance(meta, dict) else {}
        missing = [name for name, present in (
            ('epoch', is_epoch(meta.get('epoch'))), ('state_dict', 'state_dict' in meta or 'model' in meta),
            ('optimizer', 'optimizer' in meta or not need_optimizer)) if not present]
        if missing:
            raise ValueError(f'--resume {resume!r} is not a training checkpoint (it has no {", ".join(missing)}): '
                             f'--resume continues a run from its epoch and optimizer state; to start a new run '
                             f'from these weights give --initial-checkpoint {resume}')
        if 'saver' in meta:
            try:
                check_saver_state(meta['saver'])
            except ValueError as e:
                raise ValueError(f'--resume {resume!r}: {e}{_intact_checkpoint(resume)}') from None
        return ResumePoint(path=resume, meta=meta, in_place=self.holds(resume))

    def check_resume(self, point: 'ResumePoint', now: Dict[str, Any], start_epoch: Optional[int]) -> None:
        """A --resume continues its run as it was: the run's arguments (``now``: this command's, resolved), and
        in the run's own folder its record, none of its later epochs dropped, no --start-epoch."""
        check_same_experiment(point.path, RunFolder(Path(point.path).parent).args, now)
        if not point.in_place:
            return
        self._check_record(point.epoch)
        self._check_no_later_epochs(point)
        if start_epoch is not None:
            raise ValueError(f"--start-epoch with --resume in the run's own folder would repeat or skip log rows: "
                             f"the run continues after its checkpoint's epoch {point.epoch}; drop --start-epoch "
                             f"(or add --experiment NAME to start at another epoch in a new folder)")

    def _check_record(self, epoch: int) -> None:
        """A run continued in its folder keeps its record: without args.yaml the run's arguments (and so the
        checks above) are gone, without summary.csv the rows of its epochs; neither is made up from this command.
        The one summary.csv that can be proven is epoch 0's alone, from the record written before its checkpoint."""
        missing = [n for n in ('args.yaml', 'summary.csv') if not (self.path / n).is_file()]
        record = read_epoch_record(str(self.path))
        if 'summary.csv' in missing and epoch == 0 and record is not None and record['epoch'] == 0:
            missing.remove('summary.csv')  # a stop before epoch 0's rows: its record beside the checkpoint has them
        if missing:
            raise ValueError(f'the run folder {str(self.path)!r} has lost its {" and ".join(missing)}: the record of '
                             f'epochs 0-{epoch} cannot be continued there; restore '
                             f'{"them" if len(missing) > 1 else "it"}, or continue the checkpoint in a new folder '
                             f'with --experiment NAME')

    def _check_no_later_epochs(self, point: 'ResumePoint') -> None:
        """A resume in its own folder from a checkpoint older than the folder's last.pth.tar would replace the
        later epochs (their log rows, last and best checkpoints): an error that says which, and how to keep them."""
        last = self.path / 'last.pth.tar'
        try:
            last_epoch = -1 if os.path.samefile(last, point.path) else read_checkpoint_metadata(str(last))['epoch']
        except Exception:  # no last.pth.tar, or a damaged one: the older checkpoint is what is left to resume
            return
        if last_epoch > point.epoch:
            dropped = f'epoch {last_epoch}' if last_epoch == point.epoch + 1 else f'epochs {point.epoch + 1}-{last_epoch}'
            raise ValueError(f'--resume {point.path!r} is epoch {point.epoch} but the run\'s last.pth.tar is epoch '
                             f'{last_epoch}: resuming in the run\'s folder would drop {dropped} (log rows, '
                             f'checkpoints, best model); resume {last} to continue the run, or add --experiment NAME '
                             f'to continue after epoch {point.epoch} in a new folder')

    def start(self, args, resume: Optional['ResumePoint'], saver: AtomicCheckpointSaver) -> AtomicCheckpointSaver:
        """args.yaml written, a resumed run's logs made to end at its checkpoint's epoch (no row of an epoch that
        will run again, none lost) and its checkpoint bookkeeping restored; returns the saver."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(str(self.path / 'args.yaml'), yaml.safe_dump(args))
        if resume is not None and resume.in_place:
            reconcile_logs(str(self.path), resume.epoch)
            if 'saver' in resume.meta:
                saver.load_state_dict(resume.meta['saver'])
        return saver

    def save_epoch(self, saver: AtomicCheckpointSaver, record: Dict[str, Any], metric: Optional[float]) -> None:
        """Checkpoint first, then the log rows: a kill in between loses no row (the record beside the checkpoint
        restores it on resume) and a kill before the checkpoint leaves no row to duplicate."""
        write_epoch_record(str(self.path), record)
        saver.save_checkpoint(record['epoch'], metric=metric)
        self.append_rows(record)

    def append_rows(self, record: Dict[str, Any]) -> None:
        append_log_rows(str(self.path), record)

    def write_results(self, results: Dict[str, Any]) -> None:
        write_atomic(str(self.path / 'results.json'), json.dumps(results, indent=2))

    def best_or_last(self) -> str:
        best = self.path / 'model_best.pth.tar'
        return str(best if best.exists() else self.path / 'last.pth.tar')


@dataclass(frozen=True)
class ResumePoint:
    """A --resume checkpoint, read once: its entries (tensors memory-mapped) and whether it is in the run's
    own folder."""
    path: str
    meta: Dict[str, Any]
    in_place: bool

    @property
    def epoch(self) -> int:
        return int(self.meta['epoch'])

    @property
    def start_epoch(self) -> int:
        return epochs_done(self.meta)

    @property
    def gate_seed(self) -> Any:
        """The gate seed the run recorded in its args.yaml (0 for runs from before the record)."""
        return RunFolder(Path(self.path).parent).args.get('gate_seed', 0)


# the files a run writes into its folder: a new run never writes into a folder that holds any of them
RUN_FILES = ('args.yaml', 'summary.csv', 'epochs.csv', 'results.json', 'last.pth.tar', 'model_best.pth.tar',
             'tmp.pth.tar', EPOCH_RECORD)


def _numbered_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """(epoch, name) of the checkpoint-N.pth.tar files in ``folder``, newest first."""
    return sorted(((int(m.group(1)), n) for n in os.listdir(folder) if (m := NUMBERED.fullmatch(n))), reverse=True)


def _resume_hint(folder: str) -> str:
    last, numbered = os.path.join(folder, 'last.pth.tar'), _numbered_checkpoints(folder)
    if os.path.isfile(last):
        return f'resume it with --resume {last}'
    if numbered:
        return f'resume it with --resume {os.path.join(folder, numbered[0][1])}'
    return 'it stopped before its first checkpoint, so there is nothing to resume'


def _left_behind(resume: str) -> str:
    """What an interrupted run left in the folder of a missing --resume file, for the error message."""
    folder = os.path.dirname(os.path.abspath(resume))
    if not os.path.isdir(folder):
        return ''
    numbered = _numbered_checkpoints(folder)
    if os.path.isfile(os.path.join(folder, 'last.pth.tar')):
        return f' (the run\'s latest checkpoint is {os.path.join(folder, "last.pth.tar")})'
    if numbered:
        return (f'; the newest checkpoint in {folder!r} is {numbered[0][1]} (epoch {numbered[0][0]}): resume from '
                f'{os.path.join(folder, numbered[0][1])}')
    if os.path.isfile(os.path.join(folder, 'tmp.pth.tar')):
        return (f'; {folder!r} holds only tmp.pth.tar, the interrupted first save of the run (maybe incomplete), so '
                f'no epoch finished: start the run again with another --experiment (or delete the folder)')
    return f'; {folder!r} holds no checkpoint'


def _intact_checkpoint(damaged: str) -> str:
    """The newest numbered checkpoint beside a damaged one that reads as a training checkpoint, for the error
    message ('' when there is none)."""
    folder = os.path.dirname(os.path.abspath(damaged))
    for epoch, name in _numbered_checkpoints(folder) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name)
        if os.path.samefile(path, damaged):
            continue
        try:
            if isinstance(read_checkpoint_metadata(path).get('epoch'), int):
                return f'; the newest intact checkpoint of the run is {path} (epoch {epoch}): resume from it'
        except Exception:  # damaged too: try an older one
            continue
    return ''


def cannot_resume(path: str, error: Exception) -> str:
    return (f'cannot resume from {path!r} ({type(error).__name__}: '
            f'{str(error).splitlines()[0][:200] if str(error) else ""}); it must be a checkpoint of this model '
            f'and optimizer (last.pth.tar of the run)')


# The arguments that make a run's experiment, compared on resume with the run's args.yaml: the model, its
# optimizer and schedule (a changed --opt or --lr would be half undone by the optimizer state that comes back),
# the batch per update (gates and schedule count steps), augmentation, and the data and its split (a changed
# --seed or --val-holdout would move held-out images into training). Free to change on resume: --epochs (to
# train on), where and how the run is written and logged, how it runs (device, workers, --loader, --amp,
# --torchcompile, --channels-last, grad checkpointing), --model-ema and its decay (an EMA may start at a
# resume), the weights a resume replaces (--pretrained, --initial-checkpoint), and --start-epoch (checked apart).
SAME_ON_RESUME = (
    'model', 'model_kwargs', 'drop', 'drop_path', 'num_classes', 'in_chans', 'gp', 'img_size',
    'opt', 'opt_eps', 'opt_betas', 'opt_kwargs', 'momentum', 'weight_decay', 'lr', 'layer_decay', 'clip_grad',
    'clip_mode', 'sched', 'sched_on_updates', 'warmup_lr', 'min_lr', 'decay_milestones', 'decay_epochs',
    'warmup_epochs', 'warmup_prefix', 'cooldown_epochs', 'patience_epochs', 'decay_rate', 'eval_metric',
    'batch_size', 'grad_accum_steps', 'cifar_aug', 'no_aug', 'hflip', 'scale', 'ratio', 'mixup', 'cutmix',
    'smoothing', 'mean', 'std', 'interpolation', 'input_img_mode',
    'dataset', 'data_dir', 'train_split', 'val_split', 'test_split', 'val_holdout', 'train_subset', 'val_subset',
    'seed', 'world_size')


def test_split_of(values: Dict[str, Any]) -> Optional[str]:
    """The split a run reports at its best validation epoch: --test-split; else, with --val-holdout (the paper's
    protocol), the --val-split, or 'test' for a torchvision data set (train and test are all it has)."""
    if values.get('test_split'):
        return values['test_split']
    if not values.get('val_holdout'):
        return None
    return 'test' if values.get('dataset') in TORCH_DATASETS else values.get('val_split')


def check_same_experiment(resume: str, stored: Dict[str, Any], now: Dict[str, Any]) -> None:
    """The SAME_ON_RESUME arguments of this command must be those of the run's args.yaml (beside the
    checkpoint); a foreign checkpoint without one is not checked."""
    stored, now = experiment_values(stored), experiment_values(now)
    # a value the run left unset (None: the model's classes, timm train.py's lr from --lr-base) is not compared
    # the number of processes is no flag: it sets the global batch and the gate steps a DDP run has drawn
    differ = [f'{"world size" if k == "world_size" else "--" + k.replace("_", "-")} {_shown(v)} '
              f'(now {_shown(now.get(k))})' for k, v in stored.items() if v is not None and v != now.get(k)]
    if differ:
        raise ValueError(f'--resume {resume!r} continues a run with other arguments (its args.yaml): '
                         f'{", ".join(differ)}; give the run\'s values to continue it, or --initial-checkpoint '
                         f'{resume} to start a new run from its weights')


def experiment_values(values: Dict[str, Any]) -> Dict[str, Any]:
    """The SAME_ON_RESUME values a run used (those it has), as comparable as arguments allow: lists for tuples,
    the test split that --val-holdout defaults to spelt out, the data folder by its name (it may move)."""
    out = {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in SAME_ON_RESUME if k in values}
    if 'test_split' in out:
        out['test_split'] = test_split_of(values)
    if values.get('dataset') in TORCH_DATASETS and 'val_split' in out:  # train and test only: what it meant
        out['val_split'] = None if values.get('val_holdout') else \
            'test' if out['val_split'] in ('validation', 'val', 'eval', 'evaluation') else out['val_split']
    if out.get('data_dir'):
        out['data_dir'] = os.path.basename(os.path.normpath(out['data_dir']))
    return out


def _shown(value: Any) -> str:
    return ' '.join(map(str, value)) if isinstance(value, list) else repr(value) if isinstance(value, str) \
        else str(value)


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
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the model does not take, e.g. a misspelt --model-kwargs key
        raise ValueError(f'{name} does not take these arguments ({e})') from e
    set_gate_seed(model, gate_seed_of(values))  # the seed its gates trained with, whatever built it
    return model


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


def gate_seed_of(values: Dict[str, Any]) -> int:
    """The seed of a run's gate sequence: --model-kwargs sd_seed where given, else the ``gate_seed`` its args.yaml
    records (a new run records its --seed, so that seeds differ in their gates too); runs from before that
    record drew their gates from sd_seed's default, 0."""
    seed = model_kwargs_of(values).get('sd_seed')
    seed = values.get('gate_seed', 0) if seed is None else seed
    if not is_epoch(seed):  # an int >= 0, not a bool
        raise ValueError(f'the gate seed {seed!r:.40} is not a whole number >= 0')
    return seed


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
        return record if _is_epoch_record(record) else None
    except (OSError, ValueError, RecursionError):
        return None


def is_epoch(value: Any) -> bool:
    """An epoch number as a checkpoint or record holds it: an int (not a bool), at least 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_epoch_record(record: Any) -> bool:
    """What write_epoch_record writes and append_log_rows reads: a damaged record is no record, not a KeyError."""
    if not isinstance(record, dict) or not is_epoch(record.get('epoch')) or not _is_number(record.get('lr')):
        return False
    train, stats, evals = record.get('train_metrics'), record.get('stats'), record.get('eval_metrics')
    return isinstance(train, dict) and _is_number(train.get('loss')) and isinstance(stats, dict) and all(
        _is_number(stats.get(k)) for k in ('wall_s', 'images_per_s', 'mean_active_blocks', 'num_blocks', 'loss')) \
        and (evals is None or isinstance(evals, dict) and all(_is_number(v) for v in evals.values())
             and 'top1' in evals)


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
    """Wall-clock time of a run from its epochs.csv: total and median epoch (robust to pauses), and the mean
    number of active blocks per step where every row records it."""
    path = Path(run_dir) / 'epochs.csv'
    rows = [e for e in read_csv(path) if e.get('wall_s')]
    if not rows:
        return None
    walls = [_csv_number(path, e, 'wall_s') for e in rows]
    times = dict(epochs=len(walls), total_s=sum(walls), median_epoch_s=statistics.median(walls))
    if all(e.get('num_blocks') and e.get('mean_active_blocks') for e in rows):
        num_blocks = {_csv_number(path, e, 'num_blocks') for e in rows}
        active = [_csv_number(path, e, 'mean_active_blocks') for e in rows]
        if any(not n.is_integer() for n in num_blocks) or any(a > max(num_blocks) for a in active):
            raise ValueError(f'{path}: num_blocks must be whole numbers and mean_active_blocks at most num_blocks')
        if len(num_blocks) == 1 and (n := num_blocks.pop()) > 0:
            times.update(mean_active_blocks=statistics.fmean(active), num_blocks=int(n))
    return times


def _csv_number(path: Path, row: Dict[str, str], key: str) -> float:
    """A finite, non-negative number from a run's CSV row, or a one-line error naming the file and row."""
    try:
        value = float(row.get(key))
    except (TypeError, ValueError):  # a missing column or cell, or text
        value = float('nan')
    if not math.isfinite(value) or value < 0:
        raise ValueError(f'{path}: epoch {row.get("epoch")!r} has {key} {row.get(key)!r}, not a non-negative number')
    return value


def training_curves(run_dir: Path) -> List[Dict[str, float]]:
    """summary.csv's epochs as numbers (epoch, train_loss, and eval_loss / eval_top1 where the run validated),
    checked: a damaged file is a one-line error before anything is staged, not a crash halfway."""
    path = Path(run_dir) / 'summary.csv'
    rows = read_csv(path)
    keys = ('epoch', 'train_loss') + (('eval_loss', 'eval_top1') if rows and rows[0].get('eval_loss') else ())
    return [{k: _csv_number(path, row, k) for k in keys} for row in rows]
