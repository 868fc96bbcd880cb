"""Where a subset step's time goes: torch.profiler over training steps of sd_resnet110 (batch 128, p_L 0.5) at
constant depth, with batch gates and with subset gates, self CPU time per step grouped by what the ops do.
Usage: python results/bench_cpu_2026-12-05/profile_subset.py fp32|bf16 [THREADS] > profile_fp32.txt"""
import sys
from collections import defaultdict

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sd_zoo  # noqa: F401  (registers the models)

GROUPS = (('convolution', 'conv'), ('batch_norm', 'batchnorm'), ('threshold_backward', 'relu'),
          ('clamp_min', 'relu'), ('relu', 'relu'), ('index_select', 'gather/scatter'),
          ('index_add', 'gather/scatter'), ('index_copy', 'gather/scatter'), ('scatter_add', 'gather/scatter'),
          ('copy_', 'copy (clone, casts)'), ('clone', 'copy (clone, casts)'), ('fill_', 'fill / zero'),
          ('zero_', 'fill / zero'), ('add', 'add'), ('sgd', 'optimizer'), ('_foreach', 'optimizer'))


def group_of(name: str) -> str:
    name = name.lower()
    return next((g for key, g in GROUPS if key in name), 'other')


def main(mode: str, threads: int, steps: int = 6) -> None:
    torch.set_num_threads(threads)
    amp = mode == 'bf16'
    torch.manual_seed(0)
    constant = timm.create_model('sd_resnet110', drop_path_rate=0.0)
    models = dict(constant=constant, batch=timm.create_model('sd_resnet110', drop_path_rate=0.5),
                  subset=timm.create_model('sd_resnet110', drop_path_rate=0.5, sd_granularity='subset'))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    if amp:  # the CIFAR recipes' mode: bf16 autocast with channels-last
        x = x.contiguous(memory_format=torch.channels_last)
    print(f'sd_resnet110, batch 128, p_L 0.5, {mode}{" channels-last" if amp else ""}, {threads} threads, '
          f'self CPU ms per step (mean of {steps} profiled steps after 3 warm-up steps)\n')
    table, ops = {}, defaultdict(dict)
    for name, model in models.items():
        model.load_state_dict(constant.state_dict())
        model.train()
        if amp:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        groups = defaultdict(float)
        for event in prof.key_averages():
            if event.key.startswith('aten::'):
                groups[group_of(event.key)] += event.self_cpu_time_total / 1000 / steps
                ops[name][event.key] = event.self_cpu_time_total / 1000 / steps
        table[name] = groups
    names = sorted({g for t in table.values() for g in t}, key=lambda g: -table['subset'].get(g, 0))
    print(f"{'ops':<22}" + ''.join(f'{n:>10}' for n in table) + f"{'subset-batch':>14}")
    for g in names:
        print(f'{g:<22}' + ''.join(f'{t.get(g, 0):>10.1f}' for t in table.values())
              + f"{table['subset'].get(g, 0) - table['batch'].get(g, 0):>14.1f}")
    totals = {n: sum(t.values()) for n, t in table.items()}
    print(f"{'total (aten ops)':<22}" + ''.join(f'{v:>10.1f}' for v in totals.values())
          + f"{totals['subset'] - totals['batch']:>14.1f}")
    print(f"{'/ constant':<22}" + ''.join(f"{v / totals['constant']:>10.3f}" for v in totals.values()))
    diff = sorted(((ops['subset'].get(k, 0) - ops['batch'].get(k, 0), k) for k in set(ops['subset']) | set(ops['batch'])),
                  reverse=True)
    print('\nthe ops subset spends most over batch gates (ms per step, calls alike):')
    for d, k in diff[:10]:
        print(f'{k:<40}{d:>10.1f}')


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
