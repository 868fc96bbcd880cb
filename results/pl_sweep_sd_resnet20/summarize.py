# Table of the p_L sweep: held-out top-1 and training loss at the last epoch, mean active blocks.
import csv, json, statistics, sys
from pathlib import Path
root = Path(sys.argv[1] if len(sys.argv) > 1 else '.')
print('| p_L | held-out top-1 (5k train images, epoch 7) | held-out loss | train loss | active blocks / 9 |')
print('|---|---|---|---|---|')
for run in sorted(root.glob('pL*'), key=lambda r: float(r.name[2:])):
    if not (run / 'results.json').exists():
        continue
    last = list(csv.DictReader(open(run / 'summary.csv')))[-1]
    epochs = list(csv.DictReader(open(run / 'epochs.csv')))
    active = statistics.fmean(float(r['mean_active_blocks']) for r in epochs)
    print(f'| {run.name[2:]} | {float(last["eval_top1"]):.2f} | {float(last["eval_loss"]):.3f} | '
          f'{float(last["train_loss"]):.3f} | {active:.2f} |')
