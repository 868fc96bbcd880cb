"""Does weight decay on BatchNorm and bias parameters matter? timm's optimizer factory leaves them out
(create_optimizer_v2's filter_bias_and_bn=True); the public CIFAR recipes (chenyaofo, akamaster) decay every
parameter. A 15-epoch A/B on the packaged cifar10_resnet20_sd recipe (200-epoch settings: p_L 0.9, no
smoothing, no EMA, wd 5e-4, cosine, bf16), seed 42, 45k training images, judged on 5,000 held-out training
images (the trainer's last-epoch evaluation, raw weights); the test split is not used.
    python run.py [VARIANT ...]     train (resumable; outputs in /work/runs/wd_bn_bias)
    python run.py --table           the markdown table (WD_RUNS=. for the files kept here)
"""
import json
import os
import sys

RUNS = os.environ.get('WD_RUNS', '/work/runs/wd_bn_bias')
DATA = os.environ.get('CIFAR10_DIR', '/work/data/cifar10')
COMMON = dict(dataset='', data_dir=DATA, epochs=15, val_holdout=5000, val_subset=0, seed=42, no_progress=True,
              log_interval=0, output=RUNS)
VARIANTS = {
    'timm_default': {},  # BatchNorm and bias without weight decay
    'decay_all': dict(opt_kwargs={'filter_bias_and_bn': False}),  # as the public recipes
}


def train_variant(name: str) -> None:
    import sd_zoo
    folder = os.path.join(RUNS, name)
    if os.path.exists(os.path.join(folder, 'results.json')):
        return
    last = os.path.join(folder, 'last.pth.tar')
    resume = dict(resume=last) if os.path.exists(last) else {}
    sd_zoo.train('cifar10_resnet20_sd', experiment=name, **dict(COMMON, **VARIANTS[name]), **resume)


def table() -> None:
    print('| variant | held-out top-1 (raw, last epoch) | held-out loss | last train loss | median epoch s |')
    print('|---|---|---|---|---|')
    for name in VARIANTS:
        folder = os.path.join(RUNS, name)
        if not os.path.exists(os.path.join(folder, 'results.json')):
            continue
        last = json.load(open(os.path.join(folder, 'results.json')))['last_eval']
        rows = open(os.path.join(folder, 'epochs.csv')).read().split()[1:]
        seconds = sorted(float(r.split(',')[1]) for r in rows)
        print(f'| {name} | {last["top1"]:.2f} | {last["loss"]:.3f} | {float(rows[-1].split(",")[5]):.3f} | '
              f'{seconds[len(seconds) // 2]:.1f} |')


if __name__ == '__main__':
    if sys.argv[1:] == ['--table']:
        table()
    else:
        for variant in sys.argv[1:] or list(VARIANTS):
            train_variant(variant)
