"""``sd-zoo publish``: a training run or checkpoint to a Hugging Face Hub repository, in one command.

Staging (always local, no token): ``model.safetensors`` (never pickle; each block's eval scale is in the
weights, so the published model evaluates exactly like the trained one), ``config.json`` in timm's format
with every stochastic-depth setting in ``model_args``, ``README.md`` (the model card, with results measured
by validating the exported files) and plots. Pushing: one atomic commit through huggingface_hub with the
user's token; a failure leaves the staged folder as it was, and publishing again updates the repo.
"""
import argparse
import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .stochastic_depth import stochastic_blocks

SD_ARGS = ('drop_path_rate', 'sd_rule', 'sd_granularity', 'sd_scaling', 'sd_seed', 'shortcut_type', 'depth',
           'zero_init_last')
PAPER_ERROR = {  # Table 1 of the paper, test error % (constant depth, stochastic depth)
    ('sd_resnet110', 'cifar10'): (6.41, 5.25), ('sd_resnet110', 'cifar100'): (27.76, 24.98),
    ('sd_resnet1202', 'cifar10'): (6.67, 4.91), ('sd_resnet152_cifar', 'svhn'): (1.80, 1.75),
}
DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN'}
CIFAR10_LABELS = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
CITATION = """@inproceedings{huang2016deep,
  title={Deep Networks with Stochastic Depth},
  author={Huang, Gao and Sun, Yu and Liu, Zhuang and Sedra, Daniel and Weinberger, Kilian Q.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2016}
}"""


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


def _read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def resolve_source(source: str, which: str = 'best') -> Dict[str, Any]:
    """The checkpoint file, run folder and training arguments behind ``source``."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f'{source!r} does not exist: give a training output folder or a checkpoint file')
    if path.is_dir():
        names = ['model_best.pth.tar', 'last.pth.tar'] if which == 'best' else ['last.pth.tar']
        ckpt = next((path / n for n in names if (path / n).exists()), None)
        if ckpt is None:
            raise ValueError(f'{source!r} has no {" or ".join(names)}: is it a training output folder?')
        run_dir = path
    else:
        ckpt, run_dir = path, path.parent
    args = {}
    if (run_dir / 'args.yaml').exists():
        with open(run_dir / 'args.yaml') as f:
            args = yaml.safe_load(f) or {}
    return dict(checkpoint=ckpt, run_dir=run_dir, args=args)


def _model_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(args.get('model_kwargs') or {})
    if args.get('drop_path') is not None:
        kwargs['drop_path_rate'] = args['drop_path']
    if args.get('drop') is not None:
        kwargs['drop_rate'] = args['drop']
    if args.get('num_classes'):
        kwargs['num_classes'] = args['num_classes']
    return kwargs


def build_model(source: Dict[str, Any], model_name: Optional[str], use_ema: bool) -> torch.nn.Module:
    import timm
    import sd_zoo  # noqa: F401
    from .evaluation import load_weights
    name = model_name or source['args'].get('model')
    if not name:
        meta = torch.load(source['checkpoint'], map_location='cpu', weights_only=False) \
            if str(source['checkpoint']).endswith(('.pth', '.tar')) else {}
        name = meta.get('arch') if isinstance(meta, dict) else None
    if not name or name.split('.')[0] not in timm.list_models('sd_*'):
        raise ValueError(f'cannot tell the sd-zoo architecture of {str(source["checkpoint"])!r} '
                         f'(got {name!r}): pass --model')
    model = timm.create_model(name, **_model_kwargs(source['args']))
    load_weights(model, str(source['checkpoint']), use_ema=use_ema)
    return model.eval()


def sd_model_args(model: torch.nn.Module) -> Dict[str, Any]:
    """Every argument that rebuilds this model, stochastic-depth settings included."""
    blocks = stochastic_blocks(model)
    first = blocks[0]
    return dict(
        depth=model.depth, num_classes=model.num_classes, in_chans=model.in_chans,
        drop_rate=float(model.drop_rate), drop_path_rate=model.drop_path_rate, sd_rule=model.sd_rule,
        sd_granularity=first.granularity, sd_scaling=first.scaling, sd_seed=first.gate_seed,
        shortcut_type=model.shortcut_type,
    )


def _median(values: List[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def training_times(run_dir: Path) -> Optional[Dict[str, float]]:
    """Wall-clock time of a run from its epochs.csv: total and median epoch (robust to pauses)."""
    walls = [float(e['wall_s']) for e in _read_csv(run_dir / 'epochs.csv') if e.get('wall_s')]
    if not walls:
        return None
    return dict(epochs=len(walls), total_s=sum(walls), median_epoch_s=_median(walls))


# run settings that do not change the recipe: where and how it ran, not what it trained
_NON_RECIPE_ARGS = {'drop_path', 'experiment', 'output', 'resume', 'data_dir', 'workers', 'no_progress',
                    'log_interval', 'checkpoint_hist', 'device', 'dataset_download', 'pin_mem', 'config'}


def _evaluate(model: str, checkpoint: str, data_dir: Optional[str], dataset: str, split: str) -> Dict[str, Any]:
    from .evaluation import validate
    return validate(model, checkpoint=checkpoint, pretrained=not checkpoint, data_dir=data_dir, dataset=dataset,
                    split=split, workers=2, device='cpu')


def compare_with_baseline(source: Dict[str, Any], arch: str, baseline: str, which: str,
                          data_dir: Optional[str], dataset: str, split: str) -> Dict[str, Any]:
    """Accuracy and training time of the constant-depth twin, measured the same way as the SD model."""
    base = resolve_source(baseline, which)
    base_model = build_model(base, None, use_ema=False)  # the model as trained: its real drop_path_rate
    base_arch = base_model.pretrained_cfg['architecture']
    if base_arch != arch:
        raise ValueError(f'--baseline {baseline!r} trained {base_arch!r}, not {arch!r}: give the constant-depth '
                         f'twin of this run')
    if base_model.drop_path_rate != 0.0:
        raise ValueError(f'--baseline {baseline!r} was trained with drop_path {base_model.drop_path_rate:g}: the '
                         f'baseline must be the constant-depth twin (drop_path 0)')
    sd_args, base_args = source['args'], base['args']
    differs = sorted(k for k in set(sd_args) | set(base_args)
                     if k not in _NON_RECIPE_ARGS and sd_args.get(k) != base_args.get(k))
    results = _evaluate(arch, str(base['checkpoint']), data_dir, dataset, split) if (data_dir or dataset) else None
    return dict(run_dir=str(base['run_dir']), checkpoint=base['checkpoint'].name, recipe_differs=differs,
                results=results, times=training_times(base['run_dir']))


def _tag_for(args: Dict[str, Any], tag: Optional[str], num_classes: int) -> str:
    if tag:
        return tag
    dataset = str(args.get('dataset') or '')
    for t in ('cifar100', 'cifar10', 'svhn'):
        if t in dataset or t in str(args.get('data_dir') or ''):
            return t
    return 'cifar100' if num_classes == 100 else 'cifar10'


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError('the model card\'s plots need matplotlib: pip install "sd-zoo[publish]"') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: List[Dict[str, str]], path: Path) -> bool:
    if not rows:
        return False
    plt = _pyplot()
    epochs = [int(r['epoch']) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [float(r['train_loss']) for r in rows], label='train loss')
    if rows[0].get('eval_loss'):
        ax1.plot(epochs, [float(r['eval_loss']) for r in rows], label='eval loss')
        ax2.plot(epochs, [100 - float(r['eval_top1']) for r in rows], color='C2')
    ax1.set_xlabel('epoch'), ax1.set_ylabel('loss'), ax1.legend()
    ax2.set_xlabel('epoch'), ax2.set_ylabel('eval top-1 error (%)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_schedule(model: torch.nn.Module, path: Path) -> None:
    plt = _pyplot()
    probs = [b.survival_prob for b in stochastic_blocks(model)]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(probs) + 1), probs, marker='.', lw=1)
    ax.set_ylim(0, 1.05), ax.set_xlabel('residual block l'), ax.set_ylabel('survival probability p_l')
    ax.set_title(f'{model.sd_rule} rule, p_L = {1 - model.drop_path_rate:g}: E[active] = {sum(probs):.2f} / '
                 f'{len(probs)}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage(source_path: str, out_dir: str, repo_id: str, model_name: Optional[str] = None, which: str = 'best',
          use_ema: bool = False, tag: Optional[str] = None, data_dir: Optional[str] = None, dataset: str = '',
          split: str = 'test', data_note: str = '', baseline: Optional[str] = None,
          train_note: str = '') -> Dict[str, Any]:
    """Write the Hub repository's files into ``out_dir`` and check that they reproduce the trained model."""
    import timm
    from timm.models import save_for_hf
    source = resolve_source(source_path, which)
    model = build_model(source, model_name, use_ema)
    arch = model.pretrained_cfg['architecture']
    tag = _tag_for(source['args'], tag, model.num_classes)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # restage from scratch: only files we write go into the commit
    out.mkdir(parents=True, exist_ok=True)

    model_args = sd_model_args(model)
    cfg_overlay = dict(timm.models.get_pretrained_cfg(f'{arch}.{tag}').to_dict()) \
        if f'{arch}.{tag}' in timm.list_models(f'{arch}.*', include_tags=True) else {}
    pretrained_cfg = {k: v for k, v in cfg_overlay.items() if k in ('mean', 'std', 'license', 'paper_ids',
                                                                    'paper_name', 'interpolation', 'crop_pct')}
    pretrained_cfg['hf_hub_id'] = repo_id
    label_names = CIFAR10_LABELS if model.num_classes == 10 and tag == 'cifar10' else None
    model_config = dict(pretrained_cfg=pretrained_cfg)
    if label_names:
        model_config['label_names'] = label_names
    save_for_hf(model, out, model_config=model_config, model_args=model_args, safe_serialization=True)
    plots = []
    if plot_curves(_read_csv(source['run_dir'] / 'summary.csv'), out / 'training_curves.png'):
        plots.append('training_curves.png')
    plot_schedule(model, out / 'survival_schedule.png')
    plots.append('survival_schedule.png')

    # the exported files, loaded the way users load them, must reproduce the trained model exactly
    exported = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(4, model.in_chans, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(exported(x), model(x)):
            raise RuntimeError('the exported files do not reproduce the trained model')
    results = _evaluate(f'local-dir:{out}', '', data_dir, dataset, split) if (data_dir or dataset) else None
    comparison = compare_with_baseline(source, arch, baseline, which, data_dir, dataset, split) if baseline else None
    card = model_card(model, repo_id, arch, tag, source, results, plots, data_note, use_ema, comparison,
                      train_note)
    (out / 'README.md').write_text(card)
    files = sorted(p.name for p in out.iterdir())
    if any(f.endswith(('.bin', '.pth', '.pt', '.pkl', '.tar')) for f in files):
        raise RuntimeError(f'pickle files in the staged repository: {files}')
    return dict(out_dir=str(out), files=files, results=results, architecture=arch, tag=tag, baseline=comparison)


def model_card(model, repo_id: str, arch: str, tag: str, source: Dict[str, Any], results, plots: List[str],
               data_note: str, use_ema: bool, comparison: Optional[Dict[str, Any]] = None,
               train_note: str = '') -> str:
    args = source['args']
    times = training_times(source['run_dir'])
    probs = [b.survival_prob for b in stochastic_blocks(model)]
    constant = model.drop_path_rate == 0
    datasets = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'svhn': 'svhn'}
    meta = dict(library_name='timm', license='apache-2.0', tags=['image-classification', 'timm', 'sd-zoo',
                                                                  'stochastic-depth'],
                datasets=[datasets.get(tag, tag)])
    if results:
        meta['metrics'] = ['accuracy']
    lines = ['---', yaml.safe_dump(meta, sort_keys=False).strip(), '---', '',
             f'# {repo_id.split("/")[-1]}', '',
             f'A {model.depth}-layer CIFAR-style ResNet trained with '
             f'{"constant depth (stochastic depth off, every block at every step)" if constant else "stochastic depth"}'
             f' on {DATASET_NAMES.get(tag, tag)}, from sd-zoo (`{arch}`, a timm plugin).', '',
             'Stochastic depth (Huang et al., 2016) trains a very deep residual network as an ensemble of '
             'shorter ones: every mini-batch, each residual block is skipped (replaced by its shortcut, not '
             'computed) with probability 1 - p_l. At test time all blocks run, each branch scaled by p_l, which '
             'cuts training time and improves test error.', '',
             '## Model', '',
             f'- architecture: `{arch}`, depth {model.depth}, {len(probs)} residual blocks, '
             f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.num_classes} classes',
             '- stochastic depth: off (drop_path_rate 0); pass drop_path_rate to fine-tune with it' if constant else
             f'- stochastic depth: p_L = {1 - model.drop_path_rate:g} ({model.sd_rule} rule), expected '
             f'{sum(probs):.2f} of {len(probs)} blocks per step, {stochastic_blocks(model)[0].granularity} '
             f'gates, {stochastic_blocks(model)[0].scaling} scaling (eval scales are stored in the weights)',
             f'- weights: {"EMA of " if use_ema else ""}`{source["checkpoint"].name}`', '']
    if args:
        keys = ('epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'sched', 'decay_milestones',
                'cifar_aug', 'val_holdout', 'seed')
        lines += ['## Training', '', '| setting | value |', '|---|---|',
                  *[f'| {k} | {args[k]} |' for k in keys if k in args]]
        if times is not None:
            lines.append(f'| wall-clock training time | {times["total_s"] / 3600:.2f} h over {times["epochs"]} '
                         f'epochs (median epoch {times["median_epoch_s"]:.1f} s) |')
        lines.append('')
        if train_note:
            lines += [train_note, '']
    lines += ['## Results', '']
    if results:
        paper = PAPER_ERROR.get((arch, tag))
        lines += ['Measured by `sd-zoo validate` on the exported files of this repository.', '',
                  '| data | images | top-1 | top-1 error | top-5 | paper (const -> SD) |', '|---|---|---|---|---|---|',
                  f'| {tag} {results["split"]} | {results["images"]} | {results["top1"]:.2f} | '
                  f'{results["top1_err"]:.2f} | {results["top5"]:.2f} | '
                  f'{f"{paper[0]} -> {paper[1]}" if paper else "n/a"} |', '']
        if data_note:
            lines += [data_note, '']
    else:
        lines += ['Not measured at publishing time (no --data-dir was given).', '']
    if comparison:
        lines += _comparison_lines(comparison, results, times)
    if plots:
        lines += ['## Plots', '', *[f'![{p[:-4]}]({p})' for p in plots], '']
    lines += ['## Usage', '', '```python', 'import timm, torch', 'import sd_zoo  # registers the sd-zoo models',
              '', f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
              'cfg = timm.data.resolve_data_config(model=model)', 'transform = timm.data.create_transform(**cfg)',
              '```', '', 'torch.hub:', '', '```python',
              f"model = torch.hub.load('OWNER/sd-zoo', '{arch}', pretrained=True, hub_id='{repo_id}')", '```', '',
              '## Citation', '', '```bibtex', CITATION, '```', '']
    return '\n'.join(lines)


def _comparison_lines(comparison: Dict[str, Any], results, times) -> List[str]:
    base_results, base_times = comparison['results'], comparison['times']
    same = ('the same recipe except drop_path' if not comparison['recipe_differs'] else
            f'the same recipe except drop_path and: {", ".join(comparison["recipe_differs"])}')
    lines = ['## Stochastic depth vs. constant depth', '',
             f'The constant-depth twin (`{Path(comparison["run_dir"]).name}`, `{comparison["checkpoint"]}`) was '
             f'trained with {same}, and validated the same way.', '',
             '| | stochastic depth (this model) | constant depth |', '|---|---|---|']
    if results and base_results:
        lines += [f'| test top-1 | {results["top1"]:.2f} | {base_results["top1"]:.2f} |',
                  f'| test top-1 error | {results["top1_err"]:.2f} | {base_results["top1_err"]:.2f} |',
                  f'| test top-5 | {results["top5"]:.2f} | {base_results["top5"]:.2f} |']
    if times and base_times:
        ratio = times['median_epoch_s'] / base_times['median_epoch_s']
        lines += [f'| median epoch wall time | {times["median_epoch_s"]:.1f} s | '
                  f'{base_times["median_epoch_s"]:.1f} s |',
                  f'| total wall-clock | {times["total_s"] / 3600:.2f} h ({times["epochs"]} epochs) | '
                  f'{base_times["total_s"] / 3600:.2f} h ({base_times["epochs"]} epochs) |', '',
                  f'Training time saved by stochastic depth: {1 - ratio:.1%} per epoch (median epoch time ratio '
                  f'{ratio:.3f}; the median ignores epochs slowed by other work on the machine).']
    lines.append('')
    return lines


def push(staged_dir: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload the staged folder in one commit; returns the commit URL. The staged files are not touched."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
           for p in sorted(Path(staged_dir).iterdir()) if p.is_file()]
    info = api.create_commit(repo_id, operations=ops, revision=revision,
                             commit_message=commit_message or f'Publish {repo_id} with sd-zoo')
    return info.commit_url


def publish(args: argparse.Namespace) -> Dict[str, Any]:
    if not args.dry_run and args.out is None:
        out_dir = tempfile.mkdtemp(prefix='sd-zoo-publish-')
    else:
        out_dir = args.out or tempfile.mkdtemp(prefix='sd-zoo-publish-')
    if '/' not in args.repo_id:
        raise ValueError(f'--repo-id {args.repo_id!r} must be ORG/NAME')
    staged = stage(args.source, out_dir, args.repo_id, args.model, args.checkpoint, args.ema, args.tag,
                   args.data_dir, args.dataset, args.split, args.data_note, args.baseline, args.train_note)
    print(f'staged {", ".join(staged["files"])} in {out_dir}')
    if args.dry_run:
        return staged
    try:
        staged['commit_url'] = push(out_dir, args.repo_id, args.private, args.revision, args.commit_message,
                                    args.token)
    except Exception as e:
        raise ValueError(f'pushing to {args.repo_id!r} failed ({type(e).__name__}: {e}); the staged files are '
                         f'intact in {out_dir}: fix the cause and run the same command again') from e
    print(f'pushed: {staged["commit_url"]}')
    return staged


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return publish(build_publish_parser().parse_args(argv))
