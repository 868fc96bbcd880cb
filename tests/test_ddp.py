"""Two-process DDP on CPU (gloo), without find_unused_parameters: weights stay identical.

Batch gates agree on every rank; subset masks differ per rank (each rank sees its own samples), and a block
that no sample kept on one rank still takes part in the gradient all-reduce with zero gradients.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _build(kind: str):
    import timm
    import sd_zoo
    granularity = 'subset' if kind.endswith('_subset') else 'batch'
    kind = kind.removesuffix('_subset')
    if kind == 'converted_resnet18':  # sd_zoo.add_stochastic_depth on timm's own resnet18
        return sd_zoo.add_stochastic_depth(timm.create_model('resnet18', num_classes=10), drop_path_rate=0.5,
                                           sd_seed=7, sd_granularity=granularity)
    if kind == 'converted_vit':  # timm's ViT built with drop_path_rate, its per-block rates kept
        return sd_zoo.add_stochastic_depth(
            timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4, depth=4,
                              drop_path_rate=0.6), sd_seed=7, sd_granularity=granularity)
    return timm.create_model(kind, drop_path_rate=0.5, sd_seed=7, sd_granularity=granularity)


def _worker(rank: int, world_size: int, port: int, out_dir: str, kind: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        import sd_zoo
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.manual_seed(42 + rank)  # like timm's train.py: a different global seed on every rank
        model = _build(kind)
        # same initial weights on every rank come from DDP's broadcast of rank 0's parameters
        ddp = DDP(model)  # find_unused_parameters=False (the default), as timm's train.py wraps it
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
        gates, keeps = [], []
        for step in range(STEPS):
            x = torch.randn(4, 3, 16, 16)  # different data on every rank
            y = torch.randint(0, 10, (4,))
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            gates.append([bool(b.last_gate) for b in sd_zoo.stochastic_blocks(model)])
            keeps.append([None if b.last_keep is None else b.last_keep.tolist()
                          for b in sd_zoo.stochastic_blocks(model)])
        torch.save({'gates': gates, 'keeps': keeps,
                    'params': {k: v.detach().clone() for k, v in model.named_parameters()}},
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize('kind', ['sd_resnet20', 'converted_resnet18', 'sd_resnet20_subset', 'converted_vit',
                                  'converted_vit_subset'])
def test_ddp_two_ranks_identical_gates_and_weights(tmp_path, kind):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kind), nprocs=2, join=True)
    r0 = torch.load(tmp_path / 'rank0.pt')
    r1 = torch.load(tmp_path / 'rank1.pt')
    if kind.endswith('_subset'):
        assert r0['keeps'] != r1['keeps'], 'both ranks drew the same sample masks'
        for keeps in (r0['keeps'], r1['keeps']):
            assert len({str(k) for k in keeps}) > 1, 'masks did not change across steps'
            assert any(0 < len(k) < 4 for step in keeps for k in step if k is not None)
        # a branch no sample kept on one rank: the all-reduce still completes (zero gradients there)
        assert any(not all(g) for g in r0['gates'] + r1['gates']), 'no rank dropped a whole block'
    else:
        assert r0['gates'] == r1['gates']
        assert any(not all(g) for g in r0['gates']), 'no block was dropped: the test would prove nothing'
        assert len(set(map(tuple, r0['gates']))) > 1, 'gates did not change across steps'
    for name, p in r0['params'].items():
        assert torch.equal(p, r1['params'][name]), name
