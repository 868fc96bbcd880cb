"""torch.compile: gates keep changing, compilations do not grow with gate patterns."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

from sd_zoo import compile_blocks, stochastic_blocks

pytestmark = pytest.mark.slow


def _train_steps(model, steps=8):
    x = torch.randn(4, 3, 16, 16)
    patterns = []
    for _ in range(steps):
        out = model(x)
        out.sum().backward()
        patterns.append(tuple(b.last_gate for b in stochastic_blocks(model)))
    return patterns


def test_compile_blocks_bounded_graphs_live_gates():
    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model('sd_resnet20', sd_seed=1).train()
    eager = copy.deepcopy(model)
    compile_blocks(model)
    patterns = _train_steps(model)
    assert len(set(patterns)) > 4, 'gates did not change from step to step'
    graphs = counters['stats']['unique_graphs']
    assert 0 < graphs <= 6, f'{graphs} graphs for {len(set(patterns))} gate patterns'
    assert all(p.grad is not None for p in model.parameters())
    assert patterns == _train_steps(eager), 'compiling changed the gate sequence'
    model.eval()
    eager.load_state_dict(model.state_dict())
    eager.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)


def test_whole_model_compile_trains_without_recompiling_per_pattern():
    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model('sd_resnet20', sd_seed=2).train()
    compiled = torch.compile(model)
    patterns = _train_steps(compiled, steps=10)
    assert len(set(patterns)) > 4
    assert counters['stats']['unique_graphs'] <= 4
    assert all(p.grad is not None for p in model.parameters())


def test_compile_blocks_subset_bounded_graphs_over_varying_subset_sizes():
    """The branch's batch size changes every step in subset mode; compilations must not follow it."""
    from sd_zoo.models.sd_resnet_cifar import CifarBasicBlock
    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Sequential(*[
        CifarBasicBlock(8, out, stride=s, survival_prob=0.5, granularity='subset', block_index=i, seed=3)
        for i, (out, s) in enumerate([(8, 1), (16, 2)])]).train()
    eager = copy.deepcopy(model)
    compile_blocks(model)
    x = torch.rand(8, 8, 8, 8)
    sizes = set()
    for step in range(30):
        out = model(x)
        out.sum().backward()
        sizes |= {len(b.last_keep) for b in stochastic_blocks(model)}
        ref = eager(x)  # the same masks: they depend on (seed, block, step, rank) only
        ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(sizes - {0, 8}) >= 4, f'subset sizes {sorted(sizes)}: too few to test recompilation'
    graphs = counters['stats']['unique_graphs']
    # per block shape: a static full-batch graph, a dynamic-batch one, at most a batch-of-1 one
    assert 0 < graphs <= 6, f'{graphs} graphs for subset sizes {sorted(sizes)}'


def test_compile_blocks_on_a_whole_subset_model_stays_compiled():
    """sd_resnet20 has 5 block shapes, each needing up to 3 graphs in subset mode and 2 more in eval: more than
    Dynamo's default recompile limit (8) for the one shared branch function. No block may fall back to eager."""
    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5, sd_granularity='subset', sd_seed=4).train()
    compile_blocks(model)
    previous = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a fallback to eager is an error here
    try:
        x = torch.randn(4, 3, 16, 16)  # small batches: subsets of 1 sample come often
        for _ in range(24):
            model(x).sum().backward()
        model.eval()  # evaluation between epochs: eval graphs too, at the full and at a smaller last batch
        with torch.no_grad():
            model(x), model(x[:3]), model(x[:2])
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = previous
    assert counters['stats']['unique_graphs'] > 8  # the default limit would have been hit
