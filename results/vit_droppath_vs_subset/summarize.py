"""Table of the DropPath-vs-subset runs (run.sh): last-epoch top-1 on the full test split (validate_test.json,
written by finish.sh), wall-clock per epoch (median) and in all, images/s, active branches per step.
Usage: python results/vit_droppath_vs_subset/summarize.py [OUT] > results/vit_droppath_vs_subset/table.md"""
import csv
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else '/work/runs/vit_cmp')
here = Path(__file__).parent
print('| run | top-1, full test split (last epoch) | median epoch s | all epochs s | median img/s | active branches |')
print('|---|---|---|---|---|---|')
by_mode = {}
for mode in ('droppath', 'subset'):
    for seed in (0, 1):
        name = f'vit_{mode}_seed{seed}'
        rows = list(csv.DictReader(open(here / name / 'epochs.csv')))
        top1 = json.load(open(here / name / 'validate_test.json'))['top1']
        walls = [float(r['wall_s']) for r in rows]
        ips = [float(r['images_per_s']) for r in rows]
        gates = int(float(rows[-1]['num_blocks'] or 0))
        active = f"{rows[-1]['mean_active_blocks']} / {gates}" if gates else '- (DropPath computes every branch)'
        by_mode.setdefault(mode, []).append((top1, sum(walls)))
        print(f'| {name} | {top1:.2f} | {statistics.median(walls):.1f} | {sum(walls):.0f} | '
              f'{statistics.median(ips):.1f} | {active} |')
for mode, vals in by_mode.items():
    print(f'\n{mode}: mean top-1 {statistics.fmean(v[0] for v in vals):.2f} '
          f'(seeds {", ".join(f"{v[0]:.2f}" for v in vals)}), mean wall {statistics.fmean(v[1] for v in vals):.0f} s')
