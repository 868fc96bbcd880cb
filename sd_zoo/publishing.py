"""``sd-zoo publish``: a training run or checkpoint to a Hugging Face Hub repository, in one command.

Checks first (no file is written until every input is known good): the run, the data set the card names, the
``--out`` folder, the constant-depth baseline, the split to measure, and that ``model_best`` was not chosen
on the test data. Staging (always local, no token): ``model.safetensors`` (never pickle; each block's eval
scale is in the weights, so the published model evaluates exactly like the trained one), ``config.json`` in
timm's format with every stochastic-depth setting in ``model_args`` and the input normalization the run
trained with, ``README.md`` (the model card, with results measured by validating the exported files) and
plots. Pushing: one atomic commit through huggingface_hub with the user's token; a failure leaves the staged
folder as it was, and publishing again updates the repo.
"""
import argparse
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .card import check_plotting, input_channels, model_card, plot_curves, plot_schedule, sd_model_args
from .loading import check_repo_id
from .models.sd_resnet_cifar import CIFAR10_CLASSES, SDCifarResNet
from .models.sd_resnet_imagenet import SDResNet
from .runs import RunFolder, epochs_done, training_curves, training_times

STAGED_FILES = ('model.safetensors', 'config.json', 'README.md', 'training_curves.png', 'survival_schedule.png')
# run settings that do not change the recipe: where and how it ran, not what it trained
_NON_RECIPE_ARGS = {'drop_path', 'experiment', 'output', 'resume', 'data_dir', 'workers', 'no_progress',
                    'log_interval', 'checkpoint_hist', 'device', 'dataset_download', 'pin_mem', 'config', 'loader'}
_RUNTIME_ARGS = ('device', 'loader', 'workers', 'pin_mem', 'world_size')
DATASET_CLASSES = {'cifar10': 10, 'cifar100': 100, 'svhn': 10, 'in1k': 1000}  # the tags a card can name
_TORCH_DATASET_TAGS = {'torch/cifar10': 'cifar10', 'torch/cifar100': 'cifar100', 'torch/svhn': 'svhn'}
_NAME_TOKENS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'svhn': 'svhn', 'imagenet': 'in1k'}
INPUT_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def build_publish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sd-zoo publish', description=__doc__.split('\n\n')[0])
    p.add_argument('source', help='a training output folder (sd-zoo train / timm train.py) or a checkpoint file')
    p.add_argument('--repo-id', required=True, help='ORG/NAME of the Hub repository')
    p.add_argument('--model', default=None,
                   help="architecture (default: from the run's args.yaml / checkpoint); NAME.TAG also names the "
                        "data set the run trained on (e.g. sd_resnet56.svhn)")
    p.add_argument('--checkpoint', default='last', choices=('last', 'best'),
                   help='which checkpoint of a folder: last (default) or best (model_best, only where the run '
                        'chose it on held-out training images, --val-holdout)')
    p.add_argument('--ema', action='store_true', default=False, help='publish the EMA weights')
    p.add_argument('--tag', default=None,
                   help=f'the data set the run trained on ({", ".join(DATASET_CLASSES)}; default: from --model or '
                        f'the run; none named when nothing says)')
    p.add_argument('--out', default=None, help='stage here (default: a temporary folder, kept on failure); an '
                                                'earlier staging of the same run there is replaced')
    p.add_argument('--overwrite', action='store_true', default=False,
                   help='--out may hold a staging of another run or checkpoint, which is replaced')
    p.add_argument('--dry-run', action='store_true', default=False, help='stage only, push nothing (no token)')
    p.add_argument('--data-dir', default=None, help='validate the exported files on this dataset for the card')
    p.add_argument('--dataset', default='', help="'' (image folder), torch/cifar10, torch/cifar100 or torch/svhn")
    p.add_argument('--dataset-download', action='store_true', default=False, help='download torch/* datasets')
    p.add_argument('--split', default='test', help='split to validate on (default: test)')
    p.add_argument('--data-note', default='', help='a note on the evaluation data for the card')
    p.add_argument('--baseline', default=None, metavar='RUN',
                   help='output folder of the constant-depth twin (same recipe, drop_path 0): the card compares '
                        'test accuracy (validated like this model) and training time with it')
    p.add_argument('--train-note', default='', help='a note on the training hardware/conditions for the card')
    p.add_argument('--private', action='store_true', default=False)
    p.add_argument('--revision', default=None, help='branch to push to (created when missing)')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the logged-in cache)')
    return p


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class EvalData:
    """Where the card's results are measured; false when there is no --data-dir or --dataset."""
    data_dir: Optional[str] = None
    dataset: str = ''
    download: bool = False
    split: str = 'test'

    def __bool__(self) -> bool:
        return bool(self.data_dir or self.dataset)


@dataclass
class Weights:
    """A run's model as it will be exported, and the input (size, normalization) it was trained on."""
    run: RunFolder
    model: torch.nn.Module
    input_config: Dict[str, Any]


@dataclass
class Plan:
    """Everything publish checked before writing a file."""
    repo_id: str
    weights: Weights
    tag: Optional[str]
    use_ema: bool
    data: EvalData
    baseline: Optional[Weights] = None
    data_note: str = ''
    train_note: str = ''
    overwrite: bool = False  # --out may hold another staging, which is replaced

    @property
    def arch(self) -> str:
        return self.weights.model.pretrained_cfg['architecture']


def plan_publication(source: str, *, repo_id: str, model_name: Optional[str] = None, which: str = 'last',
                     use_ema: bool = False, tag: Optional[str] = None, out_dir: Optional[str] = None,
                     data: EvalData = EvalData(), baseline: Optional[str] = None, data_note: str = '',
                     train_note: str = '', overwrite: bool = False) -> Plan:
    """Every check of a publication, before any file is written: a bad input leaves ``out_dir`` untouched."""
    weights = run_weights(RunFolder.open(source, which), model_name, use_ema)
    check_selection(weights.run, data, '--checkpoint best')  # metadata only: before any data is read
    tag = dataset_tag(weights.model, weights.run.args, model_name, tag)
    if out_dir:
        check_out_dir(out_dir, staging_source(weights.run), overwrite)
    twin = check_baseline(weights, baseline, which, use_ema) if baseline else None
    if twin:
        check_selection(twin.run, data, f'--baseline {baseline!r}')
    for run in (weights.run, twin.run) if twin else (weights.run,):
        training_times(run.path)  # epochs.csv is read for the card: a malformed one fails here, before any write
    training_curves(weights.run.path)  # and summary.csv, for its plot
    check_plotting()
    if data:
        check_data(data, weights)
    elif data.split != 'test' or data.download or data_note:
        raise ValueError('--split, --dataset-download and --data-note describe the evaluation for the card: give '
                         '--data-dir or --dataset to evaluate on')
    return Plan(repo_id=repo_id, weights=weights, tag=tag, use_ema=use_ema, data=data, baseline=twin,
                data_note=data_note, train_note=train_note, overwrite=overwrite)


def run_weights(run: RunFolder, model_name: Optional[str], use_ema: bool) -> Weights:
    """The run's model as it trained (RunFolder.model), with the input config sd-zoo train resolved for it."""
    from .data import resolve_data_config
    model = run.model(model_name, use_ema)
    if not isinstance(model, (SDCifarResNet, SDResNet)):
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        raise ValueError(f'{run.path.name}: {name} is not an sd-zoo ResNet, and sd-zoo publish stages '
                         f'those only (its config.json schema); a converted timm model\'s weights are timm\'s own: '
                         f'publish them with timm.models.push_to_hf_hub under the timm model\'s name')
    return Weights(run=run, model=model, input_config=resolve_data_config(model, run.args))


# ---------------------------------------------------------------------------------------------- checks


def dataset_tag(model: torch.nn.Module, args: Dict[str, Any], model_name: Optional[str],
                tag: Optional[str]) -> Optional[str]:
    """The data set the weights were trained on: as the user states it (--tag, --model NAME.TAG), else the
    run's torchvision data set, else the data folder's name where it names one (a folder of the user's own,
    /data/flowers, is not the data set of the model name it started from); without a data folder, the tag of
    the model name it trained or the recipe it is named after. Only where the class count fits; None when nothing
    names it, and then the card names no data set (a class count says nothing about which data set it is)."""
    stated = {where: value for where, value in (('--tag', tag), ('--model', _name_tag(model_name))) if value}
    if len(set(stated.values())) > 1:
        shown = ', '.join(f'{where} says {value}' for where, value in stated.items())
        raise ValueError(f'the data set of the run is stated two ways ({shown}): give one')
    if stated:
        where, value = next(iter(stated.items()))
        return _checked_tag(value, where, model.num_classes)
    torch_tag = _TORCH_DATASET_TAGS.get(args.get('dataset') or '')
    if torch_tag:
        return _checked_tag(torch_tag, f"the run's --dataset {args['dataset']}", model.num_classes)
    named = {_named_in(args['data_dir'])} if args.get('data_dir') else \
        {_name_tag(args.get('model')), _named_in(args.get('config'))}
    fitting = {t for t in named - {None} if DATASET_CLASSES.get(t) == model.num_classes}
    return fitting.pop() if len(fitting) == 1 else None


def _name_tag(name: Any) -> Optional[str]:
    return name.split('.', 1)[1] if isinstance(name, str) and '.' in name else None


def _named_in(path: Any) -> Optional[str]:
    """The data set a recipe or data folder is named after (its last path component), if any."""
    if not isinstance(path, str) or not path:
        return None
    words = set(re.split(r'[^a-z0-9]+', os.path.basename(path.rstrip('/\\')).lower()))
    found = {tag for word, tag in _NAME_TOKENS.items() if word in words}
    return found.pop() if len(found) == 1 else None


def _checked_tag(tag: str, where: str, num_classes: int) -> str:
    if tag not in DATASET_CLASSES:
        raise ValueError(f'{where} names the data set {tag!r}: sd-zoo knows {", ".join(DATASET_CLASSES)} (leave it '
                         f'out for another data set)')
    if DATASET_CLASSES[tag] != num_classes:
        raise ValueError(f'{where} says the run trained on {tag} ({DATASET_CLASSES[tag]} classes), but the weights '
                         f'have {num_classes} classes')
    return tag


STAGING_MARKER = '.sd-zoo-staging.json'  # which run and checkpoint a staging came from; never pushed


def staging_source(run: RunFolder) -> Dict[str, str]:
    """What a staging's marker records: the run folder (its name, and a digest of its full path, which the
    marker does not spell out) and the checkpoint."""
    import hashlib
    folder = os.path.realpath(run.path)
    return dict(run=os.path.basename(folder), run_digest=hashlib.sha256(folder.encode()).hexdigest()[:16],
                checkpoint=run.checkpoint.name)


def check_out_dir(out_dir: str, source: Optional[Dict[str, str]] = None, overwrite: bool = False) -> None:
    """An empty or new folder, or an earlier staging of the same run (its marker says so); another staging
    only with ``overwrite``. Anything else in it is the user's, even under a name sd-zoo stages (a README.md
    of their own): refuse rather than delete it. Links are never followed nor replaced."""
    out = Path(out_dir)
    if out.is_symlink():
        raise ValueError(f'--out {out_dir!r} is a symbolic link: give the folder itself')
    if out.exists() and not out.is_dir():
        raise ValueError(f'--out {out_dir!r} is a file, not a folder')
    if not out.is_dir() or not any(out.iterdir()):
        return
    links = sorted(p.name for p in out.iterdir() if p.is_symlink())
    if links:
        raise ValueError(f'--out {out_dir!r} holds symbolic links ({", ".join(links[:5])}), as a Hub cache does: '
                         f'give an empty or new folder')
    foreign = sorted(p.name for p in out.iterdir() if p.name not in STAGED_FILES + (STAGING_MARKER,))
    if foreign or not (_is_earlier_staging(out) or _staging_marker(out) is not None):
        shown = ', '.join((foreign or sorted(p.name for p in out.iterdir()))[:5])
        raise ValueError(f'--out {out_dir!r} holds files that sd-zoo did not stage ({shown}): give an empty or '
                         f'new folder')
    earlier = _staging_marker(out)
    if not overwrite and (source is None or earlier != source):
        whose = f'run {earlier["run"]!r}, {earlier["checkpoint"]}' if earlier else 'unknown origin'
        raise ValueError(f'--out {out_dir!r} holds another staging (of {whose}): add --overwrite to replace it, '
                         f'or give an empty or new folder')


def _staging_marker(out: Path) -> Optional[Dict[str, str]]:
    """The run and checkpoint that sd-zoo's marker names, or None where it is absent or not sd-zoo's. The marker is
    written before any staged file, so it also vouches for a staging cut short before its config.json."""
    import json
    try:
        marker = json.loads((out / STAGING_MARKER).read_text())
    except (OSError, ValueError):
        return None
    keys = ('run', 'run_digest', 'checkpoint')
    return {k: marker[k] for k in keys} if isinstance(marker, dict) and all(
        isinstance(marker.get(k), str) for k in keys) else None


def prepare_out_dir(out_dir: str, source: Optional[Dict[str, str]] = None, overwrite: bool = False) -> Path:
    """The checked ``--out`` folder, emptied of an earlier staging's files (only those), created if new, and
    marked with ``source``."""
    import json
    check_out_dir(out_dir, source, overwrite)
    out = Path(out_dir)
    if out.is_dir():
        for p in out.iterdir():
            p.unlink()  # an earlier staging's files only, none a link (checked above)
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        (out / STAGING_MARKER).write_text(json.dumps(source))
    return out


def _is_earlier_staging(out: Path) -> bool:
    """sd-zoo's staging writes config.json naming an sd-zoo architecture; without it, the files are not ours."""
    import json
    import timm
    try:
        arch = json.loads((out / 'config.json').read_text())['architecture']
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(arch, str) and arch.startswith('sd_') and timm.is_model(arch)


def check_data(data: EvalData, weights: Weights) -> None:
    """The split to measure exists, is readable and fits the model's classes (a typo fails here, not after
    staging)."""
    from .data import DataSource, check_class_count, image_mode, read_split
    source = DataSource(dataset=data.dataset, root=data.data_dir, download=data.download,
                        img_mode=image_mode(weights.input_config))
    split = read_split(source, data.split)
    check_class_count(split.classes, weights.model.num_classes, source.describe(data.split))


def check_selection(run: RunFolder, data: EvalData, what: str) -> None:
    """model_best (and timm's kept checkpoint-N files) are the epochs with the best accuracy on the run's
    validation data: refuse them when that data is the test split or the split the card reports (the card would
    show accuracy the weights were chosen on)."""
    if _chosen_by_accuracy(run) and not run.args.get('val_holdout') and not run.args.get('val_split'):
        raise ValueError(f'{what}: {str(run.checkpoint)!r} was kept for its accuracy on a split that nothing records '
                         f'(no args.yaml beside it says which; it may be test data): publish the last epoch '
                         f'(--checkpoint last)')
    chosen_on = _selection_split(run)
    if chosen_on is None:
        return
    # timm's reader finds an evaluation split under any of these names: --split val may read the folder of
    # a run's --val-split validation
    reported = bool(data) and (chosen_on == data.split or {chosen_on, data.split} <= _EVAL_SPLIT_NAMES)
    if reported or _is_test_split(chosen_on, run.args.get('dataset') or ''):
        which = 'the split this card reports' if reported else 'test data'
        raise ValueError(f'{what}: {str(run.checkpoint)!r} was kept for its accuracy on the {chosen_on!r} split '
                         f'({which}; the run had no --val-holdout): publish the last epoch (--checkpoint last), or '
                         f'train with --val-holdout N')


_EVAL_SPLIT_NAMES = {'val', 'valid', 'validation', 'eval', 'evaluation'}


def _selection_split(run: RunFolder) -> Optional[str]:
    """The split model_best (or a kept checkpoint-N, timm's best few) was chosen on; None for a checkpoint
    not chosen by accuracy (last.pth.tar, the last epoch's checkpoint-N) or chosen on held-out training images."""
    if run.args.get('val_holdout') or not _chosen_by_accuracy(run):
        return None
    return run.args.get('val_split') or None


def _chosen_by_accuracy(run: RunFolder) -> bool:
    kept = re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', run.checkpoint.name)
    if kept:
        is_last = (run.path / 'last.pth.tar').is_file() and finished_epochs(run) == int(kept.group(1)) + 1
        return not is_last
    return run.checkpoint.name == 'model_best.pth.tar'


def _is_test_split(split: str, dataset: str) -> bool:
    from .data import TORCH_DATASETS
    return split == 'test' or (dataset in TORCH_DATASETS and split != 'train')  # torchvision: train or test


def check_baseline(weights: Weights, baseline: str, which: str, use_ema: bool) -> Weights:
    """The constant-depth twin, loaded like this model (its EMA weights with --ema: an error where it has none)
    and checked to be comparable."""
    twin = run_weights(RunFolder.open(baseline, which), None, use_ema)
    _check_twin(weights, twin, baseline)
    return twin


def _check_twin(weights: Weights, twin: Weights, baseline: str) -> None:
    model, base_model = weights.model, twin.model
    arch, base_arch = model.pretrained_cfg['architecture'], base_model.pretrained_cfg['architecture']
    if base_arch != arch:
        raise ValueError(f'--baseline {baseline!r} trained {base_arch!r}, not {arch!r}: give the constant-depth '
                         f'twin of this run')
    if base_model.drop_path_rate != 0.0:
        raise ValueError(f'--baseline {baseline!r} was trained with drop_path {base_model.drop_path_rate:g}: the '
                         f'baseline must be the constant-depth twin (drop_path 0)')
    if model.drop_path_rate == 0.0:
        raise ValueError(f'--baseline {baseline!r}: this run trained with constant depth too (drop_path 0), so there '
                         f'is no stochastic depth to compare; publish it without --baseline')
    if base_model.num_classes != model.num_classes:
        raise ValueError(f'--baseline {baseline!r} has {base_model.num_classes} classes, this model '
                         f'{model.num_classes}: give the twin trained on the same data')
    inputs = [{k: tuple(c[k]) for k in ('input_size', 'mean', 'std')} for c in (weights.input_config,
                                                                               twin.input_config)]
    if inputs[0] != inputs[1]:
        raise ValueError(f'--baseline {baseline!r} trained on input {inputs[1]}, this model on {inputs[0]}: give '
                         f'the twin trained with the same normalization')
    _check_same_schedule(weights.run, twin.run, baseline)


def _check_same_schedule(run: RunFolder, base: RunFolder, baseline: str) -> None:
    """A twin stopped early (16 of 50 epochs) is not 'the same recipe': both runs must have finished as many
    epochs."""
    epochs = finished_epochs(run), finished_epochs(base)
    if None in epochs or epochs[0] != epochs[1]:
        shown = ['an unknown number of' if e is None else str(e) for e in epochs]
        raise ValueError(f'--baseline {baseline!r} finished {shown[1]} epochs, this run {shown[0]}: compare runs '
                         f'that finished the same schedule')


def finished_epochs(run: RunFolder) -> Optional[int]:
    """Epochs the run completed, from its last checkpoint; None when no checkpoint says."""
    from timm.utils import load_checkpoint_metadata
    last = run.path / 'last.pth.tar'
    try:
        meta = load_checkpoint_metadata(str(last if last.is_file() else run.checkpoint))
    except Exception:  # not a timm training checkpoint (a safetensors file, a bare state_dict)
        return None
    epoch = meta.get('epoch') if isinstance(meta, dict) else None
    if not isinstance(epoch, int):
        return None
    return epochs_done(meta)


# ---------------------------------------------------------------------------------------------- staging


def save_weights(model: torch.nn.Module, folder: Path, repo_id: str, tag: Optional[str],
                 input_config: Dict[str, Any], label_names: Optional[Sequence[str]] = None) -> None:
    """model.safetensors and config.json in timm's format, with the input the weights were trained on; the
    config names a data set (tag) and the classes of the outputs (label names) only when they are known."""
    from timm.models import save_for_hf
    model.pretrained_cfg = {**{k: v for k, v in model.pretrained_cfg.items() if k not in ('tag', 'label_names')},
                            **({'tag': tag} if tag else {})}
    pretrained_cfg = {k: input_config[k] for k in INPUT_KEYS if k in input_config}
    pretrained_cfg['hf_hub_id'] = repo_id
    model_config: Dict[str, Any] = dict(pretrained_cfg=pretrained_cfg)
    if label_names is not None and len(label_names) == model.num_classes:
        model_config['label_names'] = list(label_names)
    save_for_hf(model, folder, model_config=model_config, model_args=sd_model_args(model), safe_serialization=True)
    # safetensors writes its file owner-only (0600): give it the mode of config.json (the user's umask)
    os.chmod(folder / 'model.safetensors', (folder / 'config.json').stat().st_mode & 0o777)


def run_classes(run: RunFolder, tag: Optional[str]) -> Optional[List[str]]:
    """The classes of the run's outputs, in label order: its training folder's class folders (sorted as timm's
    reader sorts them) where the folder is still there, torchvision's CIFAR-10 classes for a run on
    torch/cifar10 or tagged cifar10 with no folder to read; None when nothing says."""
    from timm.utils.misc import natural_key
    args = run.args or {}
    data_dir, split = args.get('data_dir'), args.get('train_split') or 'train'
    folder = os.path.join(data_dir, split) if data_dir and not args.get('dataset') else None
    if folder and os.path.isdir(folder):
        return sorted((d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith('.')),
                      key=natural_key)
    if args.get('dataset') == 'torch/cifar10' or (tag == 'cifar10' and not folder):
        return list(CIFAR10_CLASSES)
    return None


def _check_export(out: Path, model: torch.nn.Module) -> None:
    """The exported files, loaded the way users load them, must reproduce the trained model exactly."""
    import timm
    exported = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    size = min(int(model.pretrained_cfg['input_size'][-1]), 64)
    x = torch.randn(2, input_channels(model), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(exported(x), model(x)):
            raise RuntimeError('the exported files do not reproduce the trained model')


def _evaluate(folder: Path, data: EvalData) -> Dict[str, Any]:
    """Accuracy of exported files, loaded the way users load them (their config's normalization)."""
    from .evaluation import validate
    return validate(f'local-dir:{folder}', data_dir=data.data_dir, dataset=data.dataset,
                    dataset_download=data.download, split=data.split, workers=2, device='cpu')


def compare_with_baseline(plan: Plan) -> Dict[str, Any]:
    """Accuracy (the twin exported and validated exactly like this model) and training time of the twin."""
    run, base = plan.weights.run, plan.baseline.run
    differs = sorted(k for k in set(run.args) | set(base.args)
                     if k not in _NON_RECIPE_ARGS and run.args.get(k) != base.args.get(k))
    results = None
    if plan.data:
        with tempfile.TemporaryDirectory(prefix='sd-zoo-baseline-') as folder:
            save_weights(plan.baseline.model, Path(folder), plan.repo_id, plan.tag, plan.baseline.input_config,
                         run_classes(plan.baseline.run, plan.tag))
            results = _evaluate(Path(folder), plan.data)
    # where and how the runs ran: not the recipe, but an epoch's time depends on them
    ran_differently = sorted(k for k in _RUNTIME_ARGS if run.args.get(k) != base.args.get(k))
    return dict(run_dir=str(base.path), checkpoint=base.checkpoint.name, recipe_differs=differs,
                results=results, times=training_times(base.path), ran_differently=ran_differently)


def stage(plan: Plan, out_dir: str) -> Dict[str, Any]:
    """Write the Hub repository's files into ``out_dir`` and check that they reproduce the trained model."""
    model, run = plan.weights.model, plan.weights.run
    out = prepare_out_dir(out_dir, staging_source(run), plan.overwrite)
    save_weights(model, out, plan.repo_id, plan.tag, plan.weights.input_config, run_classes(run, plan.tag))
    plots = ['training_curves.png'] if plot_curves(training_curves(run.path),
                                                   out / 'training_curves.png') else []
    plot_schedule(model, out / 'survival_schedule.png')
    plots.append('survival_schedule.png')
    _check_export(out, model)
    results = _evaluate(out, plan.data) if plan.data else None
    comparison = compare_with_baseline(plan) if plan.baseline else None
    card = model_card(model, repo_id=plan.repo_id, arch=plan.arch, tag=plan.tag, checkpoint_name=run.checkpoint.name,
                      args=run.args, times=training_times(run.path), results=results, plots=plots,
                      data_note=plan.data_note, use_ema=plan.use_ema, comparison=comparison,
                      train_note=plan.train_note, finished_epochs=finished_epochs(run))
    (out / 'README.md').write_text(card)
    files = sorted(p.name for p in out.iterdir() if p.name != STAGING_MARKER)
    if any(f.endswith(('.bin', '.pth', '.pt', '.pkl', '.tar')) for f in files):
        raise RuntimeError(f'pickle files in the staged repository: {files}')
    return dict(out_dir=str(out), files=files, results=results, architecture=plan.arch, tag=plan.tag,
                baseline=comparison)


# ---------------------------------------------------------------------------------------------- pushing


def refuse_public_repo(api, repo_id: str) -> None:
    """--private cannot make an existing public repository private (create_repo keeps its visibility):
    pushing there would publish the files to everyone."""
    from huggingface_hub.utils import RepositoryNotFoundError
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        return  # created private by the push
    if not info.private:
        raise ValueError(f'--private: {repo_id!r} already exists and is public, so pushing would publish these '
                         f'files to everyone: make the repository private on the Hub first, or drop --private')


def check_private_target(repo_id: str, token: Optional[str]) -> None:
    """Before staging: a --private push must not land in an existing public repository."""
    from huggingface_hub import HfApi
    from .network import bounded_hub
    try:
        with bounded_hub():
            refuse_public_repo(HfApi(token=token), repo_id)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f'--private: cannot tell whether {repo_id!r} is public ({_failure(e)}); nothing was '
                         f'staged or pushed') from e


def push(staged_dir: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload the staged folder in one commit (huggingface_hub's upload_folder); returns the commit URL. The staged
    files are not touched; of the repository's files, those sd-zoo stages are replaced or removed, others kept. A Hub that refuses, drops the connection or stays silent fails within
    SD_ZOO_HUB_TIMEOUT seconds (sd_zoo.network)."""
    from huggingface_hub import HfApi
    from .network import bounded_hub
    api = HfApi(token=token)
    with bounded_hub():
        if private:
            refuse_public_repo(api, repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # an earlier publication's files that this one does not stage (a plot it has no data for) go in the same
        # commit: the card must not show another run's curves; files sd-zoo never stages are left alone
        info = api.upload_folder(repo_id=repo_id, folder_path=staged_dir, revision=revision,
                                 ignore_patterns=[STAGING_MARKER], delete_patterns=list(STAGED_FILES),
                                 commit_message=commit_message or f'Publish {repo_id} with sd-zoo')
    return info.commit_url


def publish(source: str, *, repo_id: str, model: Optional[str] = None, checkpoint: str = 'last',
            ema: bool = False, tag: Optional[str] = None, out: Optional[str] = None, dry_run: bool = False,
            data_dir: Optional[str] = None, dataset: str = '', dataset_download: bool = False, split: str = 'test',
            data_note: str = '', baseline: Optional[str] = None, train_note: str = '', private: bool = False,
            revision: Optional[str] = None, commit_message: Optional[str] = None,
            token: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Check every input, stage a run or checkpoint as a Hub repository (``out``, else a new temporary folder,
    removed after a successful push) and push it in one commit (not with ``dry_run``). A failed push leaves
    the staged folder as it was."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f'publish(): source must be a run folder or checkpoint path, got {type(source).__name__}')
    check_repo_id(repo_id, '--repo-id', need_org=True)
    plan = plan_publication(source, repo_id=repo_id, model_name=model, which=checkpoint, use_ema=ema, tag=tag,
                            out_dir=out, data=EvalData(data_dir, dataset, dataset_download, split),
                            baseline=baseline, data_note=data_note, train_note=train_note, overwrite=overwrite)
    if private and not dry_run:
        check_private_target(repo_id, token)
    out_dir = out or tempfile.mkdtemp(prefix='sd-zoo-publish-')
    try:
        staged = stage(plan, out_dir)
    except BaseException:
        if not out:
            shutil.rmtree(out_dir, ignore_errors=True)  # the temporary folder made above: half a staging
        raise
    print(f'staged {", ".join(staged["files"])} in {out_dir}')
    if dry_run:
        return staged
    try:
        staged['commit_url'] = push(out_dir, repo_id, private, revision, commit_message, token)
    except Exception as e:
        detail = _failure(e)
        raise ValueError(f'pushing to {repo_id!r} failed ({detail}); the staged files are intact in {out_dir}: fix '
                         f'the cause and run the same command again') from e
    print(f'pushed: {staged["commit_url"]}')
    if not out:
        shutil.rmtree(out_dir)  # the temporary folder made above, nothing else
        staged['out_dir'] = None
    return staged


def _failure(error: Exception) -> str:
    """Why a push failed, in a few words: a silent Hub is named as such, not as a bare 'timed out'."""
    import httpx2
    from .network import hub_timeout
    if isinstance(error, httpx2.TimeoutException):
        return f'the Hub gave no answer in {hub_timeout():g} s (SD_ZOO_HUB_TIMEOUT; {type(error).__name__})'
    text = str(error).splitlines()[0][:200] if str(error).strip() else ''
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_publish_parser().parse_args(argv)
    return publish(**vars(args))
