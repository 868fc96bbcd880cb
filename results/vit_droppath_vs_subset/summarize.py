"""Table of the DropPath-vs-subset runs (run.sh), one per drop path rate: last-epoch top-1 on the full test split
(validate_test.json, written by finish.sh), wall-clock per epoch (median and fastest: an epoch slowed by other work
on the cores moves the median of 8 little and the fastest not at all) and in all, images/s, active branches per
step; then each mode's mean over the seeds.
Usage: python results/vit_droppath_vs_subset/summarize.py > results/vit_droppath_vs_subset/table.md"""
import csv
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
for suffix, rate in (('', '0.1'), ('_dp04', '0.4')):
    if not (here / f'vit_droppath_seed0{suffix}').is_dir():
        continue
    print(f'### drop path {rate}\n')
    print('| run | top-1, full test split (last epoch) | median epoch s | fastest epoch s | all epochs s | '
          'median img/s | active branches |')
    print('|---|---|---|---|---|---|---|')
    by_mode = {}
    for mode in ('droppath', 'subset'):
        for seed in (0, 1):
            name = f'vit_{mode}_seed{seed}{suffix}'
            rows = list(csv.DictReader(open(here / name / 'epochs.csv')))
            top1 = json.load(open(here / name / 'validate_test.json'))['top1']
            walls = [float(r['wall_s']) for r in rows]
            ips = [float(r['images_per_s']) for r in rows]
            gates = int(float(rows[-1]['num_blocks'] or 0))
            active = (f"{statistics.fmean(float(r['mean_active_blocks']) for r in rows):.2f} / {gates}" if gates
                      else '- (DropPath computes every branch)')
            by_mode.setdefault(mode, []).append((top1, statistics.median(walls), min(walls)))
            print(f'| {name} | {top1:.2f} | {statistics.median(walls):.1f} | {min(walls):.1f} | {sum(walls):.0f} | '
                  f'{statistics.median(ips):.1f} | {active} |')
    print()
    for mode, vals in by_mode.items():
        print(f'- {mode}: mean top-1 {statistics.fmean(v[0] for v in vals):.2f} '
              f'(seeds {", ".join(f"{v[0]:.2f}" for v in vals)}), mean of the median epochs '
              f'{statistics.fmean(v[1] for v in vals):.1f} s, of the fastest {statistics.fmean(v[2] for v in vals):.1f} s')
    print()
