"""Issue 23, part 2: what costs sd_resnet20 accuracy on the shared CIFAR-10 (one factor at a time).

Every run: sd_resnet20, 15 epochs, bf16 autocast + channels-last, seed 42, 45k training images; 5,000 held-out
*training* images (--val-holdout 5000) are what the variants are compared on. The reference is the 50-epoch
recipe shortened (cifar10_resnet20_sd: p_L 0.9, label smoothing 0.1, wd 5e-4, batch 128, cosine, EMA 0.999);
each variant changes one thing. After training, the last epoch's raw and EMA weights are evaluated on the
held-out images and on the test split (reported, never used to choose). Resumable: a finished variant is
skipped, an interrupted one resumes from its last.pth.tar.
    python run.py [VARIANT ...]        (default: all, in the order below)
    python run.py --table              the markdown table of what has finished (ABLATION_RUNS=. for the kept files)
"""
import json
import os
import sys

import torch

RUNS = os.environ.get('ABLATION_RUNS', '/work/runs/ablation')
DATA = os.environ.get('CIFAR10_DIR', '/work/data/cifar10')
COMMON = dict(dataset='', data_dir=DATA, epochs=15, val_holdout=5000, val_subset=0, amp=True,
              amp_dtype='bfloat16', seed=42, no_progress=True, log_interval=0, output=RUNS)
# one-cycle: linear warm-up over the first 30% (0.01 -> 0.1), then linear decay to 0 (timm's poly, power 1)
ONE_CYCLE = dict(sched='poly', decay_rate=1.0, warmup_epochs=4, warmup_lr=0.01, warmup_prefix=False)
VARIANTS = {
    'reference': {},
    'pL1.0': dict(drop_path=0.0),
    'pL0.8': dict(drop_path=0.2),
    'smoothing0': dict(smoothing=0.0),
    'wd1e-4': dict(weight_decay=1e-4),
    'batch256': dict(batch_size=256),
    'onecycle': ONE_CYCLE,
    'reference_fp32': dict(amp=False),  # part 1: same seed in float32 (bf16 parity)
}


def train_variant(name: str) -> None:
    import sd_zoo
    folder = os.path.join(RUNS, name)
    if os.path.exists(os.path.join(folder, 'results.json')):
        return
    last = os.path.join(folder, 'last.pth.tar')
    resume = dict(resume=last) if os.path.exists(last) else {}
    sd_zoo.train('cifar10_resnet20_sd', experiment=name, **dict(COMMON, **VARIANTS[name]), **resume)


def evaluate_last(name: str) -> dict:
    """Last epoch's raw and EMA weights on the held-out images and the test split (float32)."""
    from sd_zoo.data import Augmentation, DataSource, build_loaders, resolve_data_config
    from sd_zoo.engine import evaluate
    from sd_zoo.loading import load_weights
    import timm
    folder = os.path.join(RUNS, name)
    out_file = os.path.join(folder, 'last_epoch_eval.json')
    if os.path.exists(out_file):
        return json.load(open(out_file))
    model = timm.create_model('sd_resnet20', num_classes=10, drop_path_rate=VARIANTS[name].get('drop_path', 0.1))
    loaders = build_loaders(DataSource('', DATA), data_config=resolve_data_config(model, dict(
        mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))), train_split='train', val_split=None,
        test_split='test', batch_size=256, eval_batch_size=500, aug=Augmentation(cifar_aug=True),
        val_holdout=5000, seed=42)
    res = {}
    for weights in ('raw', 'ema'):
        load_weights(model, os.path.join(folder, 'last.pth.tar'), use_ema=weights == 'ema')
        for split, loader in (('holdout', loaders.val), ('test', loaders.test)):
            res[f'{weights}_{split}'] = dict(evaluate(model, loader, torch.device('cpu')))
    res['train_loss'] = float(open(os.path.join(folder, 'epochs.csv')).read().strip().splitlines()[-1].split(',')[5])
    res['epoch_s'] = [float(r.split(',')[1]) for r in open(os.path.join(folder, 'epochs.csv')).read().split()[1:]]
    with open(out_file + '.tmp', 'w') as f:
        json.dump(res, f, indent=1)
    os.replace(out_file + '.tmp', out_file)
    return res


def table() -> None:
    print('| variant | change from the reference | held-out top-1 raw | held-out top-1 EMA | test top-1 raw |'
          ' test top-1 EMA | last train loss | median epoch s |')
    print('|---|---|---|---|---|---|---|---|')
    for name, change in VARIANTS.items():
        f = os.path.join(RUNS, name, 'last_epoch_eval.json')
        if not os.path.exists(f):
            continue
        r = json.load(open(f))
        epoch_s = sorted(r['epoch_s'])[len(r['epoch_s']) // 2]
        print(f"| {name} | {', '.join(f'{k}={v}' for k, v in change.items()) or '-'} | "
              f"{r['raw_holdout']['top1']:.2f} | {r['ema_holdout']['top1']:.2f} | {r['raw_test']['top1']:.2f} | "
              f"{r['ema_test']['top1']:.2f} | {r['train_loss']:.3f} | {epoch_s:.1f} |")


if __name__ == '__main__':
    if sys.argv[1:] == ['--table']:
        table()
        sys.exit()
    for variant in sys.argv[1:] or list(VARIANTS):
        if variant not in VARIANTS:
            sys.exit(f'unknown variant {variant!r}: one of {", ".join(VARIANTS)}')
        train_variant(variant)
        evaluate_last(variant)
