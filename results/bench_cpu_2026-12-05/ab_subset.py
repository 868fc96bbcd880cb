"""A/B of three ways to end a subset block, interleaved steps (sd_resnet110, batch 128, p_L 0.5): the kept rows
added and activated only and put into the copy with index_copy_ (what ships), the same put as a loop of slice
copies over the runs of consecutive kept rows, and index_add_ into the copy with the whole batch activated (what
shipped before). Usage: python results/bench_cpu_2026-12-05/ab_subset.py fp32|bf16 THREADS STEPS"""
import sys, time, statistics, copy, torch, timm, sd_zoo
import sd_zoo.stochastic_depth as sdm
from sd_zoo.models.sd_resnet_cifar import CifarBasicBlock
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
amp = sys.argv[1] == 'bf16'
orig_copy = sdm._write_rows_
def runs_of(idx):
    i = idx.tolist(); out = []; start = prev = i[0]; p0 = 0
    for j, v in enumerate(i[1:], 1):
        if v != prev + 1:
            out.append((start, p0, prev - start + 1)); start = v; p0 = j
        prev = v
    out.append((start, p0, prev - start + 1)); return out
def copy_loop(base, index, rows, alpha=None):
    if alpha is not None:
        return orig_copy(base, index, rows, alpha)
    view = sdm._rows_first(base)
    src = (rows.permute(0, 2, 3, 1) if view is not base else rows).to(base.dtype)
    for s, p, l in runs_of(index):
        view[s:s + l].copy_(src[p:p + l])
    return base
torch.manual_seed(0)
const = timm.create_model('sd_resnet110', drop_path_rate=0.0)
def mk(**kw):
    m = timm.create_model('sd_resnet110', drop_path_rate=0.5, **kw); m.load_state_dict(const.state_dict()); return m
models = dict(constant=const, batch=mk(), subset_put_index_copy=mk(sd_granularity='subset'),
              subset_put_loop=mk(sd_granularity='subset'), subset_add_act_all=mk(sd_granularity='subset'))
x = torch.randn(128, 3, 32, 32); y = torch.randint(0, 10, (128,))
cl = amp
if cl:
    x = x.contiguous(memory_format=torch.channels_last)
    for m in models.values(): m.to(memory_format=torch.channels_last)
def step_fn(name, m):
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    m.train()
    def step():
        sdm._write_rows_ = copy_loop if name == 'subset_put_loop' else orig_copy
        CifarBasicBlock.act_keeps_shortcut = (lambda self: False) if name == 'subset_add_act_all' else (lambda self: True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    return step
steps = {n: step_fn(n, m) for n, m in models.items()}
times = {n: [] for n in steps}
N = int(sys.argv[3]) if len(sys.argv) > 3 else 15
for i in range(N + 2):
    for n, f in steps.items():
        t0 = time.perf_counter(); f(); dt = time.perf_counter() - t0
        if i >= 2: times[n].append(dt)
c = times['constant']
for n, t in times.items():
    r = [a / b for a, b in zip(t, c)]
    q = statistics.quantiles(r, n=4)
    print(f'{sys.argv[1]} {n:<24} {statistics.median(t):.4f}s  ratio {statistics.median(r):.3f} ({q[0]:.3f}-{q[2]:.3f})')
