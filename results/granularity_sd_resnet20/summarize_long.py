# Table of the run_long.py runs: last-epoch test top-1 and median epoch time per mode and seed.
import csv, statistics, sys
from pathlib import Path
root = Path(sys.argv[1] if len(sys.argv) > 1 else '.')
print('| mode | seed | test top-1 (epoch 7) | median epoch (s) | images/s |\n|---|---|---|---|---|')
by_mode = {}
for run in sorted(root.glob('*_s*')):
    mode, seed = run.name.rsplit('_s', 1)
    last = list(csv.DictReader(open(run / 'summary.csv')))[-1]
    epochs = list(csv.DictReader(open(run / 'epochs.csv')))
    wall = statistics.median(float(r['wall_s']) for r in epochs)
    ips = statistics.median(float(r['images_per_s']) for r in epochs)
    by_mode.setdefault(mode, []).append((float(last['eval_top1']), wall))
    print(f'| {mode} | {seed} | {float(last["eval_top1"]):.2f} | {wall:.1f} | {ips:.0f} |')
for mode, rows in by_mode.items():
    print(f'| {mode} | mean | {statistics.fmean(r[0] for r in rows):.2f} | {statistics.fmean(r[1] for r in rows):.1f} | |')
