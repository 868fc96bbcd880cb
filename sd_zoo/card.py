"""The model card of a published model: Hub metadata (with ``model-index`` results), the architecture and
its stochastic-depth settings, the recipe and its wall-clock time, measured results beside the paper's, the
comparison with a constant-depth twin, plots, usage and citation."""
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from .stochastic_depth import stochastic_blocks

PAPER_ERROR = {  # Table 1 of the paper, test error % (constant depth, stochastic depth)
    ('sd_resnet110', 'cifar10'): (6.41, 5.25), ('sd_resnet110', 'cifar100'): (27.76, 24.98),
    ('sd_resnet1202', 'cifar10'): (6.67, 4.91), ('sd_resnet152_cifar', 'svhn'): (1.80, 1.75),
    ('sd_resnet152', 'in1k'): (21.78, 21.98),
}
# Constant-depth weights a user would compare against (top-1 % on the original CIFAR-10 test set)
ANCHORS = {
    ('sd_resnet20', 'cifar10'): (('He et al. 2016, ResNet-20 (64k iterations, about 164 epochs)', 91.25),
                                 ("akamaster/pytorch_resnet_cifar10's resnet20 (200 epochs, zero-padding "
                                  "shortcuts)", 91.73),
                                 ("chenyaofo/pytorch-cifar-models' cifar10_resnet20 (torch.hub, 200 epochs)", 92.60)),
    ('sd_resnet56', 'cifar10'): (('He et al. 2016, ResNet-56 (64k iterations, about 164 epochs)', 93.03),
                                 ("akamaster/pytorch_resnet_cifar10's resnet56 (200 epochs, zero-padding "
                                  "shortcuts)", 93.39),
                                 ("chenyaofo/pytorch-cifar-models' cifar10_resnet56 (torch.hub, 200 epochs)", 94.37)),
}
DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN', 'in1k': 'ImageNet-1k'}
HUB_DATASETS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'svhn': 'svhn', 'in1k': 'imagenet-1k'}
CITATION = """@inproceedings{huang2016deep,
  title={Deep Networks with Stochastic Depth},
  author={Huang, Gao and Sun, Yu and Liu, Zhuang and Sedra, Daniel and Weinberger, Kilian Q.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2016}
}"""
RECIPE_KEYS = ('epochs', 'batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'sched', 'decay_milestones',
               'decay_epochs', 'decay_rate', 'min_lr', 'warmup_epochs', 'warmup_lr', 'warmup_prefix',
               'cooldown_epochs', 'sched_on_updates', 'smoothing', 'model_ema',
               'model_ema_decay', 'cifar_aug', 'amp', 'channels_last', 'val_holdout', 'seed')
# timm's args.yaml holds every default: these keys only mean something to some schedules
# (timm's create_scheduler_v2: poly reads decay_rate as its power, wsd/rsqrt decay_epochs as the decay phase)
_SCHEDULE_KEYS = {'decay_milestones': ('multistep',), 'decay_epochs': ('step', 'wsd', 'rsqrt'),
                  'decay_rate': ('step', 'multistep', 'plateau', 'poly'),
                  'min_lr': ('cosine', 'tanh', 'plateau', 'poly', 'wsd', 'rsqrt')}
_ONLY_WITH = {'model_ema_decay': 'model_ema'}
_GATES = {
    'batch': 'every mini-batch, each residual block is skipped (replaced by its shortcut, not computed) with '
             'probability 1 - p_l',
    'subset': 'every mini-batch, each sample skips each residual block with probability 1 - p_l; the block\'s '
              'branch is computed only for the samples that keep it',
    'fixed_subset': 'every mini-batch, each residual block\'s branch is computed for a random subset of '
                    'max(int(n p_l), 1) of its n samples (the others skip it), as in DINOv2',
    'sample': 'every mini-batch, each sample drops each residual branch with probability 1 - p_l (the branch is '
              'computed for the whole batch and masked, like timm\'s DropPath)',
}
_TEST_TIME = {'paper': 'At test time all blocks run, each branch scaled by p_l.',
              'inverted': 'Training scales a kept branch by 1/p_l, so at test time all blocks run unscaled.'}


def sd_model_args(model: torch.nn.Module) -> Dict[str, Any]:
    """Every argument that rebuilds this model with timm.create_model, stochastic-depth settings included
    (the CIFAR family also has its depth and shortcut type; the ImageNet family's layout is its name's)."""
    first = stochastic_blocks(model)[0]
    args = dict(num_classes=model.num_classes, in_chans=input_channels(model), drop_rate=float(model.drop_rate),
                drop_path_rate=model.drop_path_rate, sd_rule=model.sd_rule, sd_granularity=first.granularity,
                sd_scaling=first.scaling, sd_seed=first.gate_seed)
    if hasattr(model, 'depth'):
        args.update(depth=model.depth, shortcut_type=model.shortcut_type)
    return args


def input_channels(model: torch.nn.Module) -> int:
    first_conv = model.pretrained_cfg.get('first_conv') or 'conv1'
    return int(model.get_submodule(first_conv).weight.shape[1])


def describe_model(model: torch.nn.Module, arch: str) -> str:
    if hasattr(model, 'depth'):
        return f'A {model.depth}-layer CIFAR-style ResNet'
    return f'An ImageNet-style ResNet (timm\'s `{arch.replace("sd_", "")}` layout, timm\'s state_dict keys)'


def card_metadata(repo_id: str, tag: Optional[str], results: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Hub front matter; ``model-index`` carries the measured results so the Hub shows them. Both name a
    data set, so without a known one (``tag`` None) there are neither."""
    meta: Dict[str, Any] = dict(library_name='timm', license='apache-2.0', pipeline_tag='image-classification',
                                tags=['image-classification', 'timm', 'sd-zoo', 'stochastic-depth'])
    if tag:
        meta['datasets'] = [HUB_DATASETS.get(tag, tag)]
    if results and tag:
        meta['metrics'] = ['accuracy']
        meta['model-index'] = [dict(name=repo_id.split('/')[-1], results=[dict(
            task=dict(type='image-classification', name='Image Classification'),
            dataset=dict(name=DATASET_NAMES.get(tag, tag), type=HUB_DATASETS.get(tag, tag), split=results['split']),
            metrics=[dict(type='accuracy', name='top-1 accuracy', value=round(results['top1'], 2)),
                     dict(type='accuracy', name='top-5 accuracy', value=round(results['top5'], 2))])])]
    return meta


def model_card(model, *, repo_id: str, arch: str, tag: Optional[str], checkpoint_name: str, args: Dict[str, Any],
               times: Optional[Dict[str, float]], results: Optional[Dict[str, Any]], plots: List[str],
               data_note: str = '', use_ema: bool = False, comparison: Optional[Dict[str, Any]] = None,
               train_note: str = '', finished_epochs: Optional[int] = None) -> str:
    lines = ['---', yaml.safe_dump(card_metadata(repo_id, tag, results), sort_keys=False).strip(), '---', '',
             f'# {repo_id.split("/")[-1]}', '']
    lines += _model_lines(model, arch, tag, checkpoint_name, use_ema)
    lines += _training_lines(args, times, train_note, finished_epochs)
    lines += _results_lines(arch, tag, results, data_note)
    lines += anchor_lines(arch, tag, results)
    if comparison:
        lines += comparison_lines(comparison, results, times)
    if plots:
        lines += ['## Plots', '', *[f'![{p[:-4]}]({p})' for p in plots], '']
    lines += ['## Usage', '', '```python', 'import timm, torch', 'import sd_zoo  # registers the sd-zoo models',
              '', f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
              'cfg = timm.data.resolve_data_config(model=model)', 'transform = timm.data.create_transform(**cfg)',
              '```', '', 'torch.hub:', '', '```python',
              f"model = torch.hub.load('OWNER/sd-zoo', '{arch}', pretrained=True, hub_id='{repo_id}')", '```', '',
              '## Citation', '', '```bibtex', CITATION, '```', '']
    return '\n'.join(lines)


def dataset_name(tag: Optional[str]) -> str:
    return DATASET_NAMES.get(tag, tag) if tag else 'an image data set that the run does not name'


def _model_lines(model, arch: str, tag: Optional[str], checkpoint_name: str, use_ema: bool) -> List[str]:
    blocks = stochastic_blocks(model)
    probs = [b.survival_prob for b in blocks]
    constant = model.drop_path_rate == 0
    how = 'constant depth (stochastic depth off, every block at every step)' if constant else 'stochastic depth'
    depth = f', depth {model.depth}' if hasattr(model, 'depth') else ''
    return [f'{describe_model(model, arch)} trained with {how} on {dataset_name(tag)}, from sd-zoo '
            f'(`{arch}`, a timm plugin).', '',
            f'Stochastic depth (Huang et al., 2016) trains a very deep residual network as an ensemble of '
            f'shorter ones: {_GATES[blocks[0].granularity]}. {_TEST_TIME[blocks[0].scaling]} In the paper it '
            f'shortens training, and lowers the test error of deep CIFAR networks (110 and 1202 layers).', '',
            '## Model', '',
            f'- architecture: `{arch}`{depth}, {len(probs)} residual blocks, '
            f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.num_classes} classes, '
            f'{input_channels(model)} input channels',
            '- stochastic depth: off (drop_path_rate 0); pass drop_path_rate to fine-tune with it' if constant else
            f'- stochastic depth: p_L = {1 - model.drop_path_rate:g} ({model.sd_rule} rule), expected '
            f'{sum(probs):.2f} of {len(probs)} blocks per step, {blocks[0].granularity} gates, '
            f'{blocks[0].scaling} scaling (eval scales are stored in the weights)',
            f'- weights: {"EMA of " if use_ema else ""}`{checkpoint_name}`', '']


def _training_lines(args: Dict[str, Any], times: Optional[Dict[str, float]], train_note: str,
                    finished_epochs: Optional[int] = None) -> List[str]:
    """The recipe (what args.yaml records; nothing for a checkpoint without one), the measured time, the note."""
    if not args and times is None and not train_note:
        return []
    rows = {k: args[k] for k in RECIPE_KEYS if args.get(k) not in (None, '') and _applies(k, args)}
    if 'epochs' in rows and isinstance(finished_epochs, int) and finished_epochs < rows['epochs']:
        rows['epochs'] = f'{finished_epochs} of {rows["epochs"]} planned (stopped early)'
    processes, accumulated = args.get('world_size') or 1, args.get('grad_accum_steps') or 1
    if 'batch_size' in rows and processes * accumulated > 1:  # what one update saw
        rows['batch_size'] = (f'{rows["batch_size"]} per process x {processes} processes x {accumulated} '
                              f'accumulated = {rows["batch_size"] * processes * accumulated} per update')
    lines = ['## Training', '', '| setting | value |', '|---|---|', *[f'| {k} | {v} |' for k, v in rows.items()]]
    if times is not None:
        lines.append(f'| wall-clock training time | {times["total_s"] / 3600:.2f} h over {times["epochs"]} '
                     f'epochs (median epoch {times["median_epoch_s"]:.1f} s) |')
    lines.append('')
    return lines + ([train_note, ''] if train_note else [])


def _applies(key: str, args: Dict[str, Any]) -> bool:
    if key == 'warmup_lr':
        return bool(args.get('warmup_epochs'))
    if key == 'warmup_prefix':  # shown only when set: it adds the warm-up epochs to --epochs
        return bool(args.get('warmup_epochs')) and bool(args.get(key))
    if key == 'cooldown_epochs':  # shown only when set: it adds epochs to --epochs
        return bool(args.get(key))
    if key in _ONLY_WITH:  # a setting that nothing read when its switch was off
        return bool(args.get(_ONLY_WITH[key]))
    return key not in _SCHEDULE_KEYS or args.get('sched') in _SCHEDULE_KEYS[key]


def _results_lines(arch: str, tag: Optional[str], results: Optional[Dict[str, Any]], data_note: str) -> List[str]:
    if not results:
        return ['## Results', '', 'Not measured at publishing time (no --data-dir was given).', '']
    paper = PAPER_ERROR.get((arch, tag))
    data = f'{tag} {results["split"]}' if tag else f'{results["split"]} split'
    lines = ['## Results', '', 'Measured by `sd-zoo validate` on the exported files of this repository.', '',
             '| data | images | top-1 | top-1 error | top-5 | paper (const -> SD) |', '|---|---|---|---|---|---|',
             f'| {data} | {results["images"]} | {results["top1"]:.2f} | '
             f'{results["top1_err"]:.2f} | {results["top5"]:.2f} | '
             f'{f"{paper[0]} -> {paper[1]}" if paper else "n/a"} |', '']
    return lines + ([data_note, ''] if data_note else [])


def anchor_lines(arch: str, tag: Optional[str], results: Optional[Dict[str, Any]]) -> List[str]:
    """This model beside the published constant-depth weights of the same architecture."""
    anchors = ANCHORS.get((arch, tag))
    if not anchors or not results:
        return []
    lines = ['## Against published weights', '', '| weights | test top-1 | this model minus it |', '|---|---|---|',
             f'| this model ({results["split"]}, {results["images"]} images) | {results["top1"]:.2f} | |']
    lines += [f'| {name} | {top1:.2f} | {results["top1"] - top1:+.2f} |' for name, top1 in anchors]
    return lines + ['', 'The published numbers are on the original lossless test images, each with the schedule '
                        'named; see the results\' note on the test images used here.', '']


def comparison_lines(comparison: Dict[str, Any], results, times) -> List[str]:
    base_results, base_times = comparison['results'], comparison['times']
    same = ('the same recipe except drop_path' if not comparison['recipe_differs'] else
            f'the same recipe except drop_path and: {", ".join(comparison["recipe_differs"])}')
    lines = ['## Stochastic depth vs. constant depth', '',
             f'The constant-depth twin (`{Path(comparison["run_dir"]).name}`, `{comparison["checkpoint"]}`) was '
             f'trained with {same}, and validated the same way.', '',
             '| | stochastic depth (this model) | constant depth |', '|---|---|---|']
    if results and base_results:
        split = results['split']
        lines += [f'| {split} top-1 | {results["top1"]:.2f} | {base_results["top1"]:.2f} |',
                  f'| {split} top-1 error | {results["top1_err"]:.2f} | {base_results["top1_err"]:.2f} |',
                  f'| {split} top-5 | {results["top5"]:.2f} | {base_results["top5"]:.2f} |']
    if times and base_times:
        ran_differently = comparison.get('ran_differently')
        lines += [f'| median epoch wall time | {times["median_epoch_s"]:.1f} s | '
                  f'{base_times["median_epoch_s"]:.1f} s |',
                  f'| total wall-clock | {times["total_s"] / 3600:.2f} h ({times["epochs"]} epochs) | '
                  f'{base_times["total_s"] / 3600:.2f} h ({base_times["epochs"]} epochs) |', '',
                  time_saving_line(times, base_times) if not ran_differently else
                  f'The training times are not compared: the runs differ in {", ".join(ran_differently)}, which an '
                  f'epoch\'s time depends on.']
    lines.append('')
    return lines


def time_saving_line(times: Dict[str, float], base_times: Dict[str, float]) -> str:
    """The measured per-epoch saving, beside the most the gates allowed: a dropped block saves its branch's
    work only, so the loader, the stem, the head and the optimizer step bound what any schedule can save."""
    if base_times['median_epoch_s'] <= 0:
        return ''
    ratio = times['median_epoch_s'] / base_times['median_epoch_s']
    saved = round(100 * (1 - ratio), 1)
    measured = (f'Training time saved by stochastic depth: {abs(saved):.1f}% per epoch' if saved >= 0 else
                f'Stochastic depth saved no training time here: its median epoch took {-saved:.1f}% longer')
    line = (f'{measured} (median epoch time ratio {ratio:.3f}; the median ignores epochs slowed by other work on '
            f'the machine).')
    if times.get('mean_active_blocks') is not None and times.get('num_blocks'):
        kept = times['mean_active_blocks'] / times['num_blocks']
        line += (f' The gates kept {times["mean_active_blocks"]:.2f} of {times["num_blocks"]} blocks per step on '
                 f'average: {1 - kept:.1%} of the blocks\' work was skipped, the most an epoch could save (the '
                 f'loader, stem, head and optimizer step always run).')
    return line


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError('the model card\'s plots need matplotlib: pip install "sd-zoo[publish]"') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def check_plotting() -> None:
    """The card's plots can be drawn (matplotlib is installed): asked before anything is staged."""
    _pyplot()


def plot_curves(rows: List[Dict[str, float]], path: Path) -> bool:
    """Training loss, eval loss and eval error per epoch (runs.training_curves); False when there are no rows."""
    if not rows:
        return False
    plt = _pyplot()
    epochs = [int(r['epoch']) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [r['train_loss'] for r in rows], label='train loss')
    if 'eval_loss' in rows[0]:
        ax1.plot(epochs, [r['eval_loss'] for r in rows], label='eval loss')
        ax2.plot(epochs, [100 - r['eval_top1'] for r in rows], color='C2')
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
