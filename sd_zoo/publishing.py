"""``sd-zoo publish``: a training run or checkpoint to a Hugging Face Hub repository, in one command.

Staging (always local, no token): ``model.safetensors`` (never pickle; each block's eval scale is in the
weights, so the published model evaluates exactly like the trained one), ``config.json`` in timm's format
with every stochastic-depth setting in ``model_args``, ``README.md`` (the model card, with results measured
by validating the exported files) and plots. Pushing: one atomic commit through huggingface_hub with the
user's token; a failure leaves the staged folder as it was, and publishing again updates the repo.
"""
import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .card import input_channels, model_card, plot_curves, plot_schedule, sd_model_args
from .runs import Run, build_run_model, read_csv, resolve_run, training_times

CIFAR10_LABELS = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
STAGED_FILES = ('model.safetensors', 'config.json', 'README.md', 'training_curves.png', 'survival_schedule.png')
# run settings that do not change the recipe: where and how it ran, not what it trained
_NON_RECIPE_ARGS = {'drop_path', 'experiment', 'output', 'resume', 'data_dir', 'workers', 'no_progress',
                    'log_interval', 'checkpoint_hist', 'device', 'dataset_download', 'pin_mem', 'config', 'loader'}


def build_publish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sd-zoo publish', description=__doc__.split('\n\n')[0])
    p.add_argument('source', help='a training output folder (sd-zoo train / timm train.py) or a checkpoint file')
    p.add_argument('--repo-id', required=True, help='ORG/NAME of the Hub repository')
    p.add_argument('--model', default=None, help='architecture (default: from the run\'s args.yaml / checkpoint)')
    p.add_argument('--checkpoint', default='best', choices=('best', 'last'), help='which checkpoint of a folder')
    p.add_argument('--ema', action='store_true', default=False, help='publish the EMA weights')
    p.add_argument('--tag', default=None, help='dataset tag of the config (cifar10, cifar100, svhn)')
    p.add_argument('--out', default=None, help='stage here (default: a temporary folder, kept on failure)')
    p.add_argument('--dry-run', action='store_true', default=False, help='stage only, push nothing (no token)')
    p.add_argument('--data-dir', default=None, help='validate the exported files on this dataset for the card')
    p.add_argument('--dataset', default='', help="'' (image folder), torch/cifar10, torch/cifar100 or torch/svhn")
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


def _evaluate(model: str, checkpoint: str, data_dir: Optional[str], dataset: str, split: str) -> Dict[str, Any]:
    from .evaluation import validate
    return validate(model, checkpoint=checkpoint, pretrained=not checkpoint, data_dir=data_dir, dataset=dataset,
                    split=split, workers=2, device='cpu')


def compare_with_baseline(run: Run, arch: str, baseline: str, which: str,
                          data_dir: Optional[str], dataset: str, split: str) -> Dict[str, Any]:
    """Accuracy and training time of the constant-depth twin, measured the same way as the SD model."""
    base = resolve_run(baseline, which)
    base_model = build_run_model(base)  # the model as trained: its real drop_path_rate
    base_arch = base_model.pretrained_cfg['architecture']
    if base_arch != arch:
        raise ValueError(f'--baseline {baseline!r} trained {base_arch!r}, not {arch!r}: give the constant-depth '
                         f'twin of this run')
    if base_model.drop_path_rate != 0.0:
        raise ValueError(f'--baseline {baseline!r} was trained with drop_path {base_model.drop_path_rate:g}: the '
                         f'baseline must be the constant-depth twin (drop_path 0)')
    differs = sorted(k for k in set(run.args) | set(base.args)
                     if k not in _NON_RECIPE_ARGS and run.args.get(k) != base.args.get(k))
    results = _evaluate(arch, str(base.checkpoint), data_dir, dataset, split) if (data_dir or dataset) else None
    return dict(run_dir=str(base.run_dir), checkpoint=base.checkpoint.name, recipe_differs=differs,
                results=results, times=training_times(base.run_dir))


def _tag_for(model: torch.nn.Module, args: Dict[str, Any], tag: Optional[str]) -> str:
    """The dataset tag: given, else the trained name's tag, else the data set's name, else by class count."""
    if tag:
        return tag
    name = str(args.get('model') or '')
    if '.' in name:
        return name.split('.', 1)[1]
    where = f'{args.get("dataset") or ""} {args.get("data_dir") or ""}'.lower()
    for t in ('cifar100', 'cifar10', 'svhn'):
        if t in where:
            return t
    if not hasattr(model, 'depth'):
        return 'in1k'
    return 'cifar100' if model.num_classes == 100 else 'cifar10'


def prepare_out_dir(out_dir: str) -> Path:
    """An empty or new folder, or an earlier staging by sd-zoo (its files are replaced). Anything else in it is
    the user's, even under a name sd-zoo stages (a README.md of their own): refuse rather than delete it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f'--out {out_dir!r} is a file, not a folder')
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in STAGED_FILES)
        if foreign or not _is_earlier_staging(out):
            shown = ', '.join((foreign or sorted(p.name for p in out.iterdir()))[:5])
            raise ValueError(f'--out {out_dir!r} holds files that sd-zoo did not stage ({shown}): give an empty or '
                             f'new folder')
        for p in out.iterdir():
            p.unlink()  # an earlier staging's files only (checked above)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_earlier_staging(out: Path) -> bool:
    """sd-zoo's staging writes config.json naming an sd-zoo architecture; without it, the files are not ours."""
    import timm
    try:
        arch = json.loads((out / 'config.json').read_text())['architecture']
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(arch, str) and arch.startswith('sd_') and timm.is_model(arch)


def _check_export(out: Path, model: torch.nn.Module) -> None:
    """The exported files, loaded the way users load them, must reproduce the trained model exactly."""
    import timm
    exported = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    size = min(int(model.pretrained_cfg['input_size'][-1]), 64)
    x = torch.randn(2, input_channels(model), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(exported(x), model(x)):
            raise RuntimeError('the exported files do not reproduce the trained model')


def stage(source_path: str, out_dir: str, repo_id: str, model_name: Optional[str] = None, which: str = 'best',
          use_ema: bool = False, tag: Optional[str] = None, data_dir: Optional[str] = None, dataset: str = '',
          split: str = 'test', data_note: str = '', baseline: Optional[str] = None,
          train_note: str = '') -> Dict[str, Any]:
    """Write the Hub repository's files into ``out_dir`` and check that they reproduce the trained model."""
    import timm
    from timm.models import save_for_hf
    run = resolve_run(source_path, which)
    model = build_run_model(run, model_name, use_ema)
    arch = model.pretrained_cfg['architecture']
    tag = _tag_for(model, run.args, tag)
    out = prepare_out_dir(out_dir)
    tagged = f'{arch}.{tag}'
    cfg_overlay = timm.models.get_pretrained_cfg(tagged).to_dict() \
        if tagged in timm.list_models(f'{arch}.*', include_tags=True) else {}
    pretrained_cfg = {k: v for k, v in cfg_overlay.items() if k in ('mean', 'std', 'license', 'paper_ids',
                                                                    'paper_name', 'interpolation', 'crop_pct',
                                                                    'input_size')}
    pretrained_cfg['hf_hub_id'] = repo_id
    model_config: Dict[str, Any] = dict(pretrained_cfg=pretrained_cfg)
    if model.num_classes == 10 and tag == 'cifar10':
        model_config['label_names'] = CIFAR10_LABELS
    save_for_hf(model, out, model_config=model_config, model_args=sd_model_args(model), safe_serialization=True)
    plots = ['training_curves.png'] if plot_curves(read_csv(run.run_dir / 'summary.csv'),
                                                   out / 'training_curves.png') else []
    plot_schedule(model, out / 'survival_schedule.png')
    plots.append('survival_schedule.png')
    _check_export(out, model)
    results = _evaluate(f'local-dir:{out}', '', data_dir, dataset, split) if (data_dir or dataset) else None
    comparison = compare_with_baseline(run, arch, baseline, which, data_dir, dataset, split) if baseline else None
    card = model_card(model, repo_id=repo_id, arch=arch, tag=tag, checkpoint_name=run.checkpoint.name,
                      args=run.args, times=training_times(run.run_dir), results=results, plots=plots,
                      data_note=data_note, use_ema=use_ema, comparison=comparison, train_note=train_note)
    (out / 'README.md').write_text(card)
    files = sorted(p.name for p in out.iterdir())
    if any(f.endswith(('.bin', '.pth', '.pt', '.pkl', '.tar')) for f in files):
        raise RuntimeError(f'pickle files in the staged repository: {files}')
    return dict(out_dir=str(out), files=files, results=results, architecture=arch, tag=tag, baseline=comparison)


def push(staged_dir: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload the staged folder in one commit; returns the commit URL. The staged files are not touched. A Hub
    that refuses, drops the connection or stays silent fails within SD_ZOO_HUB_TIMEOUT seconds (sd_zoo.network)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from .network import bounded_hub
    api = HfApi(token=token)
    with bounded_hub():
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
               for p in sorted(Path(staged_dir).iterdir()) if p.is_file()]
        info = api.create_commit(repo_id, operations=ops, revision=revision,
                                 commit_message=commit_message or f'Publish {repo_id} with sd-zoo')
    return info.commit_url


def publish(source: str, *, repo_id: str, model: Optional[str] = None, checkpoint: str = 'best',
            ema: bool = False, tag: Optional[str] = None, out: Optional[str] = None, dry_run: bool = False,
            data_dir: Optional[str] = None, dataset: str = '', split: str = 'test', data_note: str = '',
            baseline: Optional[str] = None, train_note: str = '', private: bool = False,
            revision: Optional[str] = None, commit_message: Optional[str] = None,
            token: Optional[str] = None) -> Dict[str, Any]:
    """Stage a run or checkpoint as a Hub repository (``out``, else a new temporary folder) and push it in one
    commit (not with ``dry_run``). A failed push leaves the staged folder as it was."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        if '/' not in repo_id:
            raise HFValidationError('no ORG/')
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'--repo-id {repo_id!r} must be a Hub repository id ORG/NAME') from e
    out_dir = out or tempfile.mkdtemp(prefix='sd-zoo-publish-')
    staged = stage(source, out_dir, repo_id, model, checkpoint, ema, tag, data_dir, dataset, split, data_note,
                   baseline, train_note)
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
