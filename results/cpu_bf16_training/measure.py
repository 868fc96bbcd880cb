"""Issue 23, part 1: CPU training speed of the CIFAR recipes, compute-only step vs the recipe end to end.

Run on an otherwise idle machine:   python measure.py [--out speed.json]
For sd_resnet20 and sd_resnet56 (the cifar10_resnet20_sd / cifar10_resnet56_sd recipes):
* compute-only train step (forward, backward, Nesterov SGD step on one fixed batch of 128, channels-last),
  median of 40 steps after 10 warm-up steps (compiled variants: after 20), for float32 and bf16 autocast,
  constant depth and the recipe's stochastic depth, eager / block-compiled (sd_zoo.compile_blocks, what
  --torchcompile does) / whole-model torch.compile;
* the recipe end to end with `sd-zoo train` (in-memory loader, SD, label smoothing, EMA, per-epoch validation
  on 2,000 images and checkpointing): 3 epochs of 15,360 training images; the training loop's img/s of
  epochs 1-2 (epochs.csv) and the whole epoch's seconds (train + validate + checkpoint, from the checkpoints'
  times), in float32, in bf16, and in bf16 with --torchcompile.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

DATA = os.environ.get('CIFAR10_DIR', '/work/data/cifar10')
MODELS = {'sd_resnet20': 'cifar10_resnet20_sd', 'sd_resnet56': 'cifar10_resnet56_sd'}
IMAGES = 15360


def compute_only(name: str, drop_path: float, amp: bool, compile_mode: str, steps: int = 40) -> dict:
    import timm
    import sd_zoo
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=drop_path).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    forward = model
    if compile_mode == 'blocks':
        sd_zoo.compile_blocks(model)
    elif compile_mode == 'model':
        forward = torch.compile(model)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    warmup = 10 if compile_mode == 'eager' else 20
    times = []
    start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if i + 1 == warmup:
            warmup_s = time.perf_counter() - start
    t = times[warmup:]
    return dict(img_s_median=128 / statistics.median(t), img_s_min=128 / max(t), img_s_max=128 / min(t),
                warmup_s=warmup_s)


def end_to_end(recipe: str, amp: bool, torchcompile: bool, out: str) -> dict:
    exp = f'{recipe}_{"bf16" if amp else "fp32"}{"_compiled" if torchcompile else ""}'
    cmd = ['sd-zoo', 'train', '--config', recipe, '--dataset', '', '--data-dir', DATA, '--epochs', '3',
           '--train-subset', str(IMAGES), '--output', out, '--experiment', exp, '--no-progress',
           '--log-interval', '0', '--checkpoint-hist', '3']
    cmd += [] if amp else ['--no-amp']
    cmd += ['--torchcompile'] if torchcompile else []
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    folder = os.path.join(out, exp)
    rows = list(csv.DictReader(open(os.path.join(folder, 'epochs.csv'))))
    stamps = [os.path.getmtime(os.path.join(folder, f'checkpoint-{e}.pth.tar')) for e in range(3)]
    shown = ["''" if a == '' else 'DATA' if a == DATA else a for a in cmd]
    return dict(command=' '.join(shown), total_s=total,
                train_img_s=[float(r['images_per_s']) for r in rows], train_s=[float(r['wall_s']) for r in rows],
                whole_epoch_s=[b - a for a, b in zip(stamps, stamps[1:])],
                precision=json.load(open(os.path.join(folder, 'results.json'))).get('autocast'))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--out', default='speed.json')
    p.add_argument('--models', nargs='+', default=list(MODELS))
    args = p.parse_args()
    import timm
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               cpu=next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')),
                        platform.processor()),
               threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__, models={})
    tmp = tempfile.mkdtemp(prefix='speed_')
    for name in args.models:
        import yaml
        from sd_zoo.recipes import resolve_recipe
        drop_path = yaml.safe_load(open(resolve_recipe(MODELS[name])))['drop_path']
        m = res['models'][name] = dict(recipe=MODELS[name], drop_path=drop_path, compute_only={}, end_to_end={})
        for amp in (False, True):
            for dp in (0.0, drop_path):
                for mode in ('eager', 'blocks', 'model') if amp and dp else ('eager',):
                    key = f'{"bf16" if amp else "fp32"}_{"sd" if dp else "constant"}_{mode}'
                    m['compute_only'][key] = compute_only(name, dp, amp, mode)
                    print(name, key, m['compute_only'][key], flush=True)
        threads = torch.get_num_threads()  # one thread each: would two runs side by side train more per hour?
        torch.set_num_threads(1)
        m['compute_only']['bf16_sd_eager_1thread'] = compute_only(name, drop_path, True, 'eager')
        torch.set_num_threads(threads)
        print(name, '1 thread', m['compute_only']['bf16_sd_eager_1thread'], flush=True)
        for amp, comp in ((False, False), (True, False), (True, True)):
            key = f'{"bf16" if amp else "fp32"}{"_compiled" if comp else ""}'
            e = m['end_to_end'][key] = end_to_end(MODELS[name], amp, comp, tmp)
            ref = m['compute_only'][f'{"bf16" if amp else "fp32"}_sd_{"blocks" if comp else "eager"}']
            e['train_vs_compute_only'] = statistics.fmean(e['train_img_s'][1:]) / ref['img_s_median']
            e['whole_epoch_vs_compute_only'] = IMAGES / statistics.fmean(e['whole_epoch_s']) / ref['img_s_median']
            print(name, key, e, flush=True)
        with open(args.out + '.tmp', 'w') as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + '.tmp', args.out)


if __name__ == '__main__':
    sys.exit(main())
