"""The README's benchmark tables, made from this folder's JSONs (run.sh wrote them): every figure with its
per-step spread (p25-p75 of the per-step ratios to the step beside it, interleaved).
Usage: python results/bench_cpu_2026-12-05/tables.py > results/bench_cpu_2026-12-05/tables.md"""
import json
import sys
from pathlib import Path

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)


def load(name):
    path = here / f'{name}.json'
    return json.loads(path.read_text()) if path.exists() else None


def spread(q):
    return f"{q['median']:.3f} ({q['p25']:.3f}-{q['p75']:.3f})"


def env_line(res):
    e = res['environment']
    return (f"{e['cpu_model']}, {e['torch_threads']} threads, torch {e['torch']}, timm {e['timm']}, "
            f"{e['date_utc']}")


def train_table(names, title):
    runs = {n: load(n) for n in names}
    runs = {n: r for n, r in runs.items() if r and 'train' in r}
    if not runs:
        return
    print(f'\n#### {title}\n')
    print('| train step / constant | ' + ' | '.join(f'`{n}`' for n in runs) + ' |')
    print('|---|' + '---|' * len(runs))
    rows = [('batch gates (`sd_batch`)', 'sd_batch'), ('subset gates (`sd_subset`)', 'sd_subset'),
            ('fixed-size subset (`sd_fixed_subset`, DINOv2)', 'sd_fixed_subset'),
            ('per-sample mask (`sd_sample`)', 'sd_sample'), ("timm `DropPath`", 'timm_droppath'),
            ('every gate closed (stem, head, shortcuts)', 'stem_head')]
    for label, key in rows:
        cells = [spread(r['train']['ratio_spread'][key]) if key in r['train']['ratio_spread'] else '-'
                 for r in runs.values()]
        print(f'| {label} | ' + ' | '.join(cells) + ' |')
    print('| limit: schedule | ' + ' | '.join(f"{r['train']['limit_ratio']:.3f}" for r in runs.values()) + ' |')
    print('| limit: cost-weighted | ' + ' | '.join(f"{r['train']['stage_costs']['limit_ratio']:.3f}"
                                                  for r in runs.values()) + ' |')
    print('| constant step, median s | ' + ' | '.join(f"{r['train']['variants']['constant']['median_s']:.3f}"
                                                      for r in runs.values()) + ' |')
    if any('ratio_to_droppath' in r['train'] for r in runs.values()):
        for key in ('sd_batch', 'sd_subset', 'sd_fixed_subset'):
            cells = [spread(r['train']['ratio_to_droppath_spread'][key])
                     if key in r['train'].get('ratio_to_droppath_spread', {}) else '-' for r in runs.values()]
            print(f'| **{key} / DropPath** | ' + ' | '.join(cells) + ' |')
    for n, r in runs.items():
        c = r['config']
        print(f"\n`{n}`: `sd-zoo bench` --model {c['model']} --batch-size {c['batch_size']}"
              f"{' --img-size ' + str(c['img_size']) if c['img_size'] else ''} --drop-path {c['drop_path']} "
              f"--steps {c['steps']}{' --amp' if c['amp'] else ''}{' --channels-last' if c['channels_last'] else ''}"
              f" ({env_line(r)})")


def other_table():
    r = load('sd_resnet110_fp32')
    if not r or 'ddp' not in r:
        return
    print('\n#### DDP, eval, memory (`sd_resnet110_fp32`)\n')
    print('| | SD / constant |')
    print('|---|---|')
    ddp = r['ddp']
    for key in ('sd_batch', 'sd_subset'):
        print(f"| 2-rank DDP ({ddp['backend']}, {ddp['per_rank_batch']} per rank), `{key}` | "
              f"{spread(ddp['ratio_spread'][key])} |")
    ev = r['eval']
    ips = ' vs '.join(f'{v:.1f}' for v in ev['images_per_s'].values())
    print(f"| eval: folded SD / plain ResNet ({ips} img/s) | {ev['ratio']:.3f} (outputs equal to "
          f"{ev['max_rel_output_diff']:.1e}) |")
    mem = r['memory']
    print(f"| peak training memory ({mem['sd_batch']['peak_mib']:.0f} vs {mem['constant']['peak_mib']:.0f} MiB) | "
          f"{mem['peak_ratio']:.3f} (saved activations {mem['saved_activations_ratio']:.3f}) |")


def compile_table():
    runs = {n: load(n) for n in ('sd_resnet110_fp32_compile', 'sd_resnet110_bf16_cl_compile')}
    runs = {n: r for n, r in runs.items() if r and 'compile' in r}
    if not runs:
        return
    print('\n#### Compiled blocks (`compile_blocks`, what `--torchcompile` does), sd_resnet110\n')
    print('| compiled step / compiled constant | ' + ' | '.join(f'`{n}`' for n in runs) + ' |')
    print('|---|' + '---|' * len(runs))
    for key in ('sd_batch_compiled', 'sd_subset_compiled'):
        print(f'| {key} | ' + ' | '.join(spread(r['compile']['ratio_spread'][key]) for r in runs.values()) + ' |')
    print('| graphs (batch / subset / constant) | ' + ' | '.join(
        '{sd_batch} / {sd_subset} / {constant}'.format(**r['compile']['graphs_per_variant']) for r in runs.values())
        + ' |')
    print('| constant compiled step, median s | ' + ' | '.join(
        f"{r['compile']['variants']['constant_compiled']['median_s']:.3f}" for r in runs.values()) + ' |')


def data_table():
    for name in ('data_fp32_cl', 'data_bf16_cl'):
        r = load(name)
        if not r or 'data' not in r:
            continue
        print(f'\n#### Data path, whole epochs (`{name}`, one epoch per cell: no spread)\n')
        print('| model / loader | constant img/s | SD img/s | epoch SD / constant | step SD / constant |')
        print('|---|---|---|---|---|')
        for model, m in r['data']['models'].items():
            for kind in ('timm', 'memory'):
                ips = m['images_per_s'][kind]
                print(f"| {model} / {kind} | {ips['constant']:.1f} | {ips['sd_batch']:.1f} | "
                      f"{m['epoch_ratio'][kind]:.3f} | {m['step_ratio']:.3f} |")


train_table(['sd_resnet110_fp32', 'sd_resnet110_bf16_cl', 'sd_resnet20_fp32_cl', 'sd_resnet20_bf16_cl',
             'sd_resnet50_fp32'], 'sd-zoo ResNets: train step / constant depth, median (p25-p75 per step)')
other_table()
compile_table()
data_table()
train_table(['vit_small_patch16_224_fp32', 'vit_small_patch16_224_bf16', 'convnext_tiny_fp32', 'convnext_tiny_bf16'],
            'timm ViT / ConvNeXt, drop path 0.4 (timm per-block rates), 112 px, batch 32')
