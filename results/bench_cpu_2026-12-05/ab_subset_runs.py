"""A/B of how a subset block adds its kept rows on a CPU, interleaved steps (sd_resnet110, batch 128, p_L 0.5):
one index_add_ (what ships: row by row, one thread) against run by run, one add_ per run of consecutive kept
rows (which uses every thread, at one op per run; it lost and was not kept). Usage: python results/bench_cpu_2026-12-05/ab_subset_runs.py fp32|bf16 THREADS STEPS"""
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import sd_zoo.stochastic_depth as sdm

mode, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
amp = mode == 'bf16'
by_index_add = sdm._add_rows_  # what ships


def runs_of(index):
    values, runs = index.tolist(), []
    for i, value in enumerate(values):
        if runs and value == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((value, i, 1))
    return runs


def by_runs(base, index, rows, alpha=1.0):
    view = sdm._rows_first(base)
    source = (rows.permute(0, 2, 3, 1) if view is not base else rows).to(base.dtype)
    for start, first, length in runs_of(index):
        view[start:start + length].add_(source[first:first + length], alpha=alpha)
    return base


torch.manual_seed(0)
constant = timm.create_model('sd_resnet110', drop_path_rate=0.0)
models = dict(constant=constant, batch=timm.create_model('sd_resnet110', drop_path_rate=0.5),
              subset_runs=timm.create_model('sd_resnet110', drop_path_rate=0.5, sd_granularity='subset'),
              subset_index_add=timm.create_model('sd_resnet110', drop_path_rate=0.5, sd_granularity='subset'))
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
if amp:
    x = x.contiguous(memory_format=torch.channels_last)


def make_step(name, model):
    model.load_state_dict(constant.state_dict())
    model.train()
    if amp:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        sdm._add_rows_ = by_index_add if name == 'subset_index_add' else by_runs
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


step_of = {name: make_step(name, m) for name, m in models.items()}
times = {name: [] for name in step_of}
for i in range(steps + 2):
    for name, step in step_of.items():
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times[name].append(time.perf_counter() - t0)
for name, t in times.items():
    ratios = [a / b for a, b in zip(t, times['constant'])]
    q = statistics.quantiles(ratios, n=4)
    print(f'{mode} {threads}t {name:<18} {statistics.median(t):.4f} s  / constant {statistics.median(ratios):.3f} '
          f'({q[0]:.3f}-{q[2]:.3f})')
