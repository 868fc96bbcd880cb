import sys, time, statistics, torch, timm, sd_zoo, torch.nn.functional as F
from sd_zoo.stochastic_depth import compile_blocks
mode = sys.argv[1]
torch.manual_seed(0)
m = timm.create_model('sd_resnet56', drop_path_rate=0.1).to(memory_format=torch.channels_last).train()
if mode == 'compiled':
    compile_blocks(m)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
ts = []
for i in range(18):
    t0 = time.perf_counter()
    loss = F.cross_entropy(m(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    ts.append(time.perf_counter() - t0)
print(mode, 'median s/step over steps 4-18:', round(statistics.median(ts[3:]), 3), 'first', round(ts[0], 1))
