"""Does a subset step get cheaper once every batch size it draws has run? oneDNN builds a kernel (a primitive)
for each new input shape and caches it; subset blocks see a new batch size most steps at first. Interleaved steps
of sd_resnet110 (batch 128, p_L 0.5): constant, batch gates, subset gates, timed over steps [W, W + S) for
each warm-up length W. Usage: python results/bench_cpu_2026-12-05/subset_warmup.py fp32|bf16 THREADS S W1 W2 ..."""
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import sd_zoo  # noqa: F401

mode, threads, steps, warmups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(w) for w in sys.argv[4:]]
torch.set_num_threads(threads)
amp = mode == 'bf16'
torch.manual_seed(0)
constant = timm.create_model('sd_resnet110', drop_path_rate=0.0)
models = dict(constant=constant, batch=timm.create_model('sd_resnet110', drop_path_rate=0.5),
              subset=timm.create_model('sd_resnet110', drop_path_rate=0.5, sd_granularity='subset'))
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
if amp:
    x = x.contiguous(memory_format=torch.channels_last)


def make_step(model):
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
    return step


step_of = {name: make_step(m) for name, m in models.items()}
done = 0
for warm in warmups:
    for _ in range(warm - done):
        for step in step_of.values():
            step()
    times = {name: [] for name in step_of}
    for _ in range(steps):
        for name, step in step_of.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    done = warm + steps
    for name in ('batch', 'subset'):
        ratios = [a / b for a, b in zip(times[name], times['constant'])]
        q = statistics.quantiles(ratios, n=4)
        print(f'{mode} {threads}t after {warm:>4} steps: {name:<7} / constant {statistics.median(ratios):.3f} '
              f'({q[0]:.3f}-{q[2]:.3f}), constant {statistics.median(times["constant"]):.3f} s', flush=True)
