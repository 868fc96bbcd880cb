"""The tables of speed.json (measure.py's output) in markdown:  python summarize.py [speed.json]"""
import json
import statistics
import sys

res = json.load(open(sys.argv[1] if len(sys.argv) > 1 else 'speed.json'))
print(f"{res['cpu']}, {res['threads']} threads, torch {res['torch']}, timm {res['timm']}, {res['date']}\n")
print('| model | step | img/s median (min-max) | warm-up s |')
print('|---|---|---|---|')
for name, m in res['models'].items():
    for key, c in m['compute_only'].items():
        print(f"| {name} | {key} | {c['img_s_median']:.0f} ({c['img_s_min']:.0f}-{c['img_s_max']:.0f}) | "
              f"{c['warmup_s']:.1f} |")
print('\n| model | recipe end to end | training loop img/s (epochs 1-2) | whole epoch s (train + validate + save) |'
      ' loop / compute-only | whole epoch / compute-only | autocast |')
print('|---|---|---|---|---|---|---|')
for name, m in res['models'].items():
    for key, e in m['end_to_end'].items():
        print(f"| {name} | {key} | {statistics.fmean(e['train_img_s'][1:]):.0f} | "
              f"{', '.join(f'{s:.1f}' for s in e['whole_epoch_s'])} | {e['train_vs_compute_only']:.3f} | "
              f"{e['whole_epoch_vs_compute_only']:.3f} | {e['precision']} |")
