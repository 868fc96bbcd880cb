"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, arXiv:1603.09382).

During training, residual block l survives a mini-batch with probability p_l. A dropped block is the
identity (its shortcut) and its residual branch is not computed at all, which is where the paper's
training-time saving comes from. At test time every block runs with its branch scaled by p_l.

This module holds the mechanism shared by every sd-zoo model:

* :func:`survival_schedule` / :func:`expected_depth` - the paper's linear-decay or uniform rule;
* :class:`StochasticResidual` - a residual block base class with batch gates that skip the branch,
  per-sample gates (DropPath-like, for comparison), per-sample gates that run the branch on the kept
  samples only (``subset``), ``paper`` or ``inverted`` scaling, reproducible gates (batch gates identical
  on every DDP rank), and exactly-zero gradients for dropped branches;
* :func:`fold_survival_scale` - folds the eval scale into the branch's last BN (a plain ResNet);
* :func:`compile_blocks` - ``torch.compile`` for the branches, so that gates never cause recompiles.
"""
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

__all__ = [
    'RULES', 'GRANULARITIES', 'SCALINGS', 'survival_schedule', 'expected_depth', 'check_sd_args',
    'check_model_sd_args',
    'StochasticResidual', 'stochastic_blocks', 'fold_survival_scale', 'compile_blocks',
    'set_gate_seed', 'subset_keep_indices', 'fixed_subset_size', 'active_blocks', 'mix_seeds',
]

RULES = ('linear', 'uniform')
GRANULARITIES = ('batch', 'sample', 'subset', 'fixed_subset')
SCALINGS = ('paper', 'inverted')


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'unknown stochastic-depth {name} {value!r}: choose one of {", ".join(choices)}')


def _check_survival_prob(survival_prob_last: float) -> None:
    if isinstance(survival_prob_last, bool) or not isinstance(survival_prob_last, (int, float)):
        raise ValueError(f'survival probability p_L must be a number in (0, 1], got {survival_prob_last!r}')
    if not 0.0 < survival_prob_last <= 1.0:
        raise ValueError(
            f'survival probability p_L = {survival_prob_last} is outside (0, 1]: p_L = 1 - drop_path_rate, '
            f'so drop_path_rate must be in [0, 1) (0.5 is the paper\'s setting, 0 is constant depth)')


def check_sd_args(
        survival_prob_last: float,
        rule: str = 'linear',
        granularity: str = 'batch',
        scaling: str = 'paper',
) -> None:
    """Raise a ValueError naming the first invalid stochastic-depth argument."""
    _check_survival_prob(survival_prob_last)
    _check_choice('rule', rule, RULES)
    _check_choice('granularity', granularity, GRANULARITIES)
    _check_choice('scaling', scaling, SCALINGS)


def check_model_sd_args(drop_path_rate: float, rule: str = 'linear', granularity: str = 'batch',
                        scaling: str = 'paper') -> None:
    """The models' form of :func:`check_sd_args`: timm's ``drop_path_rate`` (1 - p_L) instead of p_L."""
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)):
        raise ValueError(f'drop_path_rate (1 - p_L) must be a number in [0, 1), got {drop_path_rate!r}')
    check_sd_args(1.0 - drop_path_rate, rule, granularity, scaling)


def survival_schedule(num_blocks: int, survival_prob_last: float = 0.5, rule: str = 'linear') -> List[float]:
    """Survival probabilities p_1..p_L of the paper (Eq. 4).

    ``linear``: p_l = 1 - l / L * (1 - p_L), so the first block almost always survives and the last one
    survives with p_L. ``uniform``: p_l = p_L for every block.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f'num_blocks must be a positive integer, got {num_blocks!r}')
    _check_survival_prob(survival_prob_last)
    _check_choice('rule', rule, RULES)
    if rule == 'uniform':
        return [float(survival_prob_last)] * num_blocks
    return [1.0 - (l / num_blocks) * (1.0 - survival_prob_last) for l in range(1, num_blocks + 1)]


def expected_depth(num_blocks: int, survival_prob_last: float = 0.5, rule: str = 'linear') -> float:
    """Expected number of residual blocks that run in a training step (40.25 for ResNet-110 at p_L=0.5)."""
    return float(sum(survival_schedule(num_blocks, survival_prob_last, rule)))


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64 finaliser: a well-distributed 64-bit hash of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seeds(first: int, *rest: int) -> int:
    """A well-distributed 64-bit hash of integers (SplitMix64, folded): the key of a counter-based stream, so
    streams keyed by (seed, block, step, rank) or (seed, epoch, rank) never touch the global RNGs."""
    z = _mix64(first & _MASK64)
    for value in rest:
        z = _mix64(z ^ (value & _MASK64))
    return z


def gate_uniform(seed: int, block_index: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, block, step).

    Counter-based, so every DDP rank draws the same gates without communicating and without touching
    the global RNGs (which timm's train.py seeds differently on each rank).
    """
    z = mix_seeds(seed, block_index, step)
    return (z >> 11) * (1.0 / (1 << 53))


_SUBSET_STREAM = 0x5B5E7  # keeps subset masks apart from the batch gates' stream


def subset_keep_indices(
        seed: int,
        block_index: int,
        step: int,
        rank: int,
        batch_size: int,
        survival_prob: float,
        fixed_size: bool = False,
) -> torch.Tensor:
    """Sorted indices (int64, CPU) of the samples that keep a block: each one independently with ``survival_prob``,
    or with ``fixed_size`` a uniformly random subset of :func:`fixed_subset_size` samples (DINOv2's way).

    Counter-based like :func:`gate_uniform`: a CPU generator seeded from a hash of (seed, block, step, rank),
    never the global RNG, so a rank's masks are reproducible and ranks (which see different data) draw
    different masks. Drawn on the CPU so that the subset size is known without a device sync.
    """
    z = mix_seeds(seed, _SUBSET_STREAM, block_index, step, rank)
    g = torch.Generator().manual_seed(z)
    if fixed_size:
        return torch.randperm(batch_size, generator=g)[:fixed_subset_size(batch_size, survival_prob)].sort().values
    return torch.nonzero(torch.rand(batch_size, generator=g) < survival_prob).squeeze(1)


def fixed_subset_size(batch_size: int, survival_prob: float) -> int:
    """The samples a ``'fixed_subset'`` branch runs on: ``max(int(n * p), 1)``, as DINOv2's ``drop_add_residual_
    stochastic_depth`` takes them (each sample then keeps the branch with probability k / n, scaled by n / k)."""
    return max(int(batch_size * survival_prob), 1)


def _rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for a channels_last batch its NHWC view: a view whose dim-0 rows are contiguous in memory, so
    row gathers and scatters keep the layout (``index_select`` alone returns a contiguous NCHW tensor)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


def _as_rows(view: torch.Tensor) -> torch.Tensor:
    """A contiguous rows-first view as a (rows, row length) matrix: CPU gathers on it copy whole rows at once."""
    return view.view(view.shape[0], -1) if view.dim() > 2 and view.is_contiguous() else view


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` in ``x``'s memory format (channels_last stays channels_last)."""
    view = _rows_first(x)
    rows = _as_rows(view).index_select(0, index).view((len(index),) + view.shape[1:])
    return rows.permute(0, 3, 1, 2) if view is not x else rows


def _add_rows_(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``base.index_add_(0, index, rows, alpha=alpha)`` through the rows-first views of both (no layout change).

    (Writing the kept rows with ``index_copy_`` instead, so that a ReLU block activates only those, was slower:
    on this project's CPU it runs at about half the speed of ``index_add_``; results/bench_cpu_2026-12-05.)"""
    view = _rows_first(base)
    source = (rows.permute(0, 2, 3, 1) if view is not base else rows).to(base.dtype)
    target = _as_rows(view)
    if target is not view:
        source = source.reshape(len(index), -1)
    target.index_add_(0, index, source, alpha=alpha)
    return base


class _SplitRows(torch.autograd.Function):
    """``x -> (copy of x, x's rows at index)``: the start of a subset block whose shortcut is the identity.

    The copy is the tensor the kept branch outputs are added into (``x`` itself is saved by the op that made it,
    or held by a caller, so it cannot be written). Backward returns ``grad_copy`` with ``grad_rows`` added at
    ``index``: one pass, where autograd's own gather backward would zero a full-size tensor, scatter into it, then
    add it to the shortcut's gradient. Both outputs and both gradients keep ``x``'s memory format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(index)
        return x.clone(), _take_rows(x, index)  # clone() preserves a dense tensor's strides

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_copy: torch.Tensor, grad_rows: Optional[torch.Tensor]):
        index, = ctx.saved_tensors
        if grad_rows is None:  # rows that reach no output (a branch that ignores its input)
            return grad_copy, None
        return _add_rows_(grad_copy.clone(), index, grad_rows), None


class _GatherRows(torch.autograd.Function):
    """``x``'s rows at ``index`` in ``x``'s memory format, with a backward that keeps that format too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        ctx.meta = (x.shape, x.stride() if dense else None, x.dtype, x.device)
        return _take_rows(x, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: torch.Tensor):
        index, = ctx.saved_tensors
        shape, stride, dtype, device = ctx.meta
        if stride is None:  # x was not dense: a contiguous gradient
            grad = torch.zeros(shape, dtype=dtype, device=device)
        else:  # zeros in x's layout (channels_last stays channels_last)
            grad = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
        return _add_rows_(grad, index, grad_rows), None


class _AddRows(torch.autograd.Function):
    """``base`` with ``scale * rows`` added at ``index``: the end of a subset block.

    ``inplace``: ``base`` is a copy made for this (see :class:`_SplitRows`) and is written in place; otherwise
    a new tensor in ``base``'s memory format, in the wider of the two dtypes (as ``base + rows`` would be under
    autocast). Backward passes ``grad`` to ``base`` and gathers the rows' gradient in ``grad``'s format."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, scale: float,
                inplace: bool) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.scale, ctx.base_dtype, ctx.rows_dtype = scale, base.dtype, rows.dtype
        dtype = torch.promote_types(base.dtype, rows.dtype)
        if inplace and dtype == base.dtype:
            ctx.mark_dirty(base)
            out = base
        else:
            out = base.clone() if dtype == base.dtype else base.to(dtype)
        return _add_rows_(out, index, rows, alpha=scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        index, = ctx.saved_tensors
        grad_rows = _take_rows(grad, index)
        if ctx.scale != 1.0:
            grad_rows = grad_rows.mul_(ctx.scale)
        return grad.to(ctx.base_dtype), grad_rows.to(ctx.rows_dtype), None, None, None


_graph_task_id = getattr(torch._C, '_current_graph_task_id', lambda: -1)


def _in_backward() -> bool:
    """True while autograd's engine runs a backward pass, i.e. when activation checkpointing recomputes."""
    return _graph_task_id() != -1


class _ZeroGradIdentity(torch.autograd.Function):
    """Identity on ``x`` that gives ``params`` exactly-zero gradients.

    A dropped block still takes part in backward through this one cheap node, so DDP without
    ``find_unused_parameters`` works and weight decay / momentum still apply (as in the authors' code).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.param_meta])


@register_notrace_module  # FX treats the block as a leaf so that gates stay live in traced models
class StochasticResidual(nn.Module):
    """Base class of a residual block ``out = act(shortcut(x) + branch(x))`` with stochastic depth.

    Subclasses define ``branch`` (the residual branch, unscaled), ``shortcut`` and ``act`` (the
    post-addition activation); ``dropped_output`` may be overridden when ``act(shortcut)`` differs
    from ``shortcut``.

    Training, ``granularity='batch'``: one gate per forward; a closed gate returns the shortcut without
    running the branch. ``'sample'``: a per-sample Bernoulli mask (always computes, like DropPath).
    ``'subset'``: a per-sample mask too, but the branch runs on the kept samples only (gathered, then
    added into the shortcut), so compute scales with the kept fraction; the branch's BatchNorms see the
    kept subset's statistics (see :meth:`_forward_subset`). ``'fixed_subset'``: the branch runs on a uniformly
    random subset of exactly ``max(int(n * p_l), 1)`` samples (DINOv2's way; a static shape), scaled by n / k under
    inverted scaling (paper scaling evaluates with p_l, within 1 / n of k / n).
    ``scaling='paper'``: unscaled in training, branch times p_l at eval. ``'inverted'``: kept branch
    divided by p_l in training, unscaled at eval. The eval scale lives in the ``eval_scale`` buffer, so
    a state_dict evaluates the same whatever survival arguments the loading model was built with.
    """

    def __init__(
            self,
            survival_prob: float = 1.0,
            granularity: str = 'batch',
            scaling: str = 'paper',
            block_index: int = 0,
            seed: int = 0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.init_stochastic_depth(survival_prob, granularity, scaling, block_index, seed, device=device, dtype=dtype)

    def init_stochastic_depth(
            self,
            survival_prob: float = 1.0,
            granularity: str = 'batch',
            scaling: str = 'paper',
            block_index: int = 0,
            seed: int = 0,
            persistent: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """Set (or reset) the block's stochastic-depth state; also used to convert an existing block.

        ``persistent=False`` keeps the eval scale out of the state_dict (for converted models whose keys
        must not change; valid when the eval scale is 1, i.e. inverted scaling).
        """
        check_sd_args(survival_prob, granularity=granularity, scaling=scaling)
        self.survival_prob = float(survival_prob)
        self.granularity = granularity
        self.scaling = scaling
        self.block_index = block_index
        self.gate_seed = int(seed)
        self.gate_step = 0  # training forwards drawn so far; with the seed, it fixes the next gate
        self.last_gate = True  # the branch ran in the last training forward (for at least one sample)
        self.last_keep: Optional[torch.Tensor] = None  # 'subset': the kept samples' indices (None: all)
        self.loaded_eval_scale = False  # the eval scale came with loaded weights (see _forward_train)
        scale = self.survival_prob if scaling == 'paper' else 1.0
        buffer_dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        self.register_buffer('eval_scale', torch.tensor(scale, device=device, dtype=buffer_dtype),
                             persistent=persistent)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.unused
    def dropped_output(self, shortcut: torch.Tensor) -> torch.Tensor:
        """Output of a dropped block; the shortcut itself when act(shortcut) == shortcut."""
        return shortcut

    @torch.jit.unused
    def branch_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters that a dropped block does not use (all of them, unless overridden)."""
        return (p for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if torch.jit.is_scripting():  # the gates are Python: a scripted model is for inference only
                raise RuntimeError('a TorchScript stochastic-depth block cannot train: script the model in eval '
                                   'mode for inference, and train the Python model')
            return self._forward_train(x)
        return self.act(torch.addcmul(self.shortcut(x), self.branch(x), self.eval_scale))

    @torch.jit.unused
    def next_gate(self) -> bool:
        """Draw this block's gate for the current training forward.

        Recomputation under activation checkpointing runs inside backward and reuses the gate of the
        forward it recomputes, so a checkpointed block computes the same function twice. It reuses the last
        draw: with checkpointing, one forward per backward (with two calls before one backward, the first would be
        recomputed with the second's gates).
        """
        if self.survival_prob >= 1.0:
            self.last_gate = True
        elif not _in_backward():
            self.last_gate = gate_uniform(self.gate_seed, self.block_index, self.gate_step) < self.survival_prob
            self.gate_step += 1
        return self.last_gate

    @torch.jit.unused
    def next_keep(self, batch_size: int) -> torch.Tensor:
        """Draw the indices of the samples that keep this block's branch (``'subset'``), on the CPU.

        Like :meth:`next_gate`, recomputation under activation checkpointing reuses the last draw.
        """
        if not _in_backward() or self.last_keep is None:
            self.last_keep = subset_keep_indices(
                self.gate_seed, self.block_index, self.gate_step, _rank(), batch_size, self.survival_prob,
                fixed_size=self.granularity == 'fixed_subset')
            self.gate_step += 1
        return self.last_keep

    @torch.jit.unused
    def _dropped(self, shortcut: torch.Tensor) -> torch.Tensor:
        """A dropped block: the shortcut, with exactly-zero gradients for the unused branch parameters."""
        out = self.dropped_output(shortcut)
        params = tuple(self.branch_parameters())
        if params and torch.is_grad_enabled():
            out = _ZeroGradIdentity.apply(out, *params)
        return out

    @torch.jit.unused
    def _forward_subset(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample gates that skip compute: ``out = act(shortcut + index_add(kept rows of branch))``.

        The branch runs on ``x``'s kept rows only, so its BatchNorms normalise with (and update their
        running statistics from) the kept subset's batch statistics, a smaller and varying batch. No sample
        kept: a dropped block (shortcut only, zero gradients). One sample kept at a 1x1 output resolution
        cannot be batch-normalised in training, so a BatchNorm block counts as dropped for the step as well (only
        tiny inputs reach 1x1; at a larger resolution, or without BatchNorm, a single kept sample runs as it is).
        """
        p = self.survival_prob
        if p < 1.0 and self._has_sync_bn():
            raise ValueError("'subset' gates cannot train with SyncBatchNorm: a rank where no sample keeps a block "
                             "would skip the BN's collective and hang the others; use 'batch' gates (or plain "
                             "BatchNorm)")
        shortcut = self.shortcut(x)
        if p >= 1.0:
            self.last_gate, self.last_keep = True, None
            return self.act(shortcut + self.branch(x))
        n = x.shape[0]
        keep = self.next_keep(n)
        k = keep.numel()
        if k == 1 and shortcut.shape[2:].numel() == 1 and self._has_batch_norm():
            keep = self.last_keep = keep[:0]
            k = 0
        self.last_gate = k > 0
        if k == 0:
            return self._dropped(shortcut)
        # inverted scaling divides by the probability a sample kept the branch: p, or k / n for a fixed-size subset
        scale = (n / k if self.granularity == 'fixed_subset' else 1.0 / p) if self.scaling == 'inverted' else 1.0
        if k == n:
            return self.act(torch.add(shortcut, self.branch(x), alpha=scale))
        index = keep.to(x.device)
        if shortcut is x:  # the identity: one copy of x to add into, and one backward pass for both paths
            base, rows = _SplitRows.apply(x, index)
        else:
            base, rows = shortcut, _GatherRows.apply(x, index)
        torch._dynamo.maybe_mark_dynamic(rows, 0)  # a compiled branch (compile_blocks) sees varying sizes
        return self.act(_AddRows.apply(base, self.branch(rows), index, scale, shortcut is x))

    @torch.jit.unused
    @torch.compiler.disable  # gates are Python decisions: whole-model compile breaks here, see compile_blocks
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, '_is_replica', False):  # set by nn.DataParallel's replicate
            raise ValueError('stochastic depth cannot train under nn.DataParallel: its replicas are thrown away '
                             'after each step, so the gate counter never advances and every step drops the same '
                             'blocks; use DistributedDataParallel')
        if getattr(self, 'loaded_eval_scale', False) and self._trains():  # getattr: blocks from before it
            self.adopt_own_eval_scale()
        p = self.survival_prob
        if self.granularity in ('subset', 'fixed_subset'):
            return self._forward_subset(x)
        if self.granularity == 'batch':
            shortcut = self.shortcut(x)
            if not self.next_gate():
                return self._dropped(shortcut)
            out = self.branch(x)
            if self.scaling == 'inverted' and p < 1.0:
                return self.act(torch.add(shortcut, out, alpha=1.0 / p))
            return self.act(shortcut + out)

        # 'sample': per-sample mask, always computed (timm DropPath / torchvision StochasticDepth style)
        shortcut = self.shortcut(x)
        out = self.branch(x)
        if p >= 1.0:
            return self.act(shortcut + out)
        keep = out.new_empty((out.shape[0],) + (1,) * (out.ndim - 1)).bernoulli_(p)
        if self.scaling == 'inverted':
            keep.div_(p)
        return self.act(torch.addcmul(shortcut, out, keep))

    @torch.jit.unused
    def _branch_modules(self) -> Iterator[nn.Module]:
        """The modules the branch runs (all of this block's, unless overridden)."""
        return self.modules()

    @torch.jit.unused
    def _has_sync_bn(self) -> bool:
        """Whether the branch uses SyncBatchNorm; looked up at each step (a few modules), not cached: a model may be
        converted with ``convert_sync_batchnorm`` after it has trained a step."""
        return any(isinstance(m, nn.SyncBatchNorm) for m in self._branch_modules())

    @torch.jit.unused
    def _has_batch_norm(self) -> bool:
        """Whether the branch batch-normalises (a LayerNorm branch, a ViT's or ConvNeXt's, runs one sample)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self._branch_modules())

    @torch.jit.unused
    def _trains(self) -> bool:
        """This forward can change the branch's weights: not a frozen branch, nor a no_grad pass in training
        mode (BN recalibration such as torch.optim.swa_utils.update_bn)."""
        return torch.is_grad_enabled() and any(True for _ in self.branch_parameters())

    @torch.jit.unused
    def adopt_own_eval_scale(self) -> None:
        """Evaluate with this block's own schedule again: p_l (paper scaling) or 1 (inverted).

        Loaded weights bring the eval scale of the schedule they were trained with, so they evaluate as
        trained whatever survival arguments this model was built with. Once the block trains, its own
        schedule is the one its weights follow: the first forward after a load that trains them calls this (so
        fine-tuning at another rate, or SD fine-tuning of constant-depth weights, evaluates by the paper's rule).
        """
        with torch.no_grad():
            self.eval_scale.fill_(self.survival_prob if self.scaling == 'paper' else 1.0)
        self.loaded_eval_scale = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + 'eval_scale'
        persistent = 'eval_scale' not in self._non_persistent_buffers_set
        holds_block = any(k.startswith(prefix) for k in state_dict)  # not, e.g., a head-only partial load
        if persistent and holds_block:
            if key not in state_dict:
                # weights of a plain (constant-depth) ResNet: they evaluate unscaled
                with torch.no_grad():
                    self.eval_scale.fill_(1.0)
                state_dict = {**state_dict, key: self.eval_scale}
            self.loaded_eval_scale = True
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f'survival_prob={self.survival_prob:.4f}, granularity={self.granularity}, '
                f'scaling={self.scaling}')


def stochastic_blocks(model: nn.Module) -> List[StochasticResidual]:
    """All stochastic-depth blocks of a model, in forward order."""
    return [m for m in model.modules() if isinstance(m, StochasticResidual)]


def set_gate_seed(model: nn.Module, seed: int, step: int = 0) -> None:
    """Restart every block's gate sequence at ``step`` of the sequence fixed by ``seed``."""
    for block in stochastic_blocks(model):
        block.gate_seed = int(seed)
        block.gate_step = int(step)


def active_blocks(blocks: List['StochasticResidual'], batch_size: int) -> float:
    """How many blocks the last training step ran, in whole-batch units: a batch gate counts 0 or 1, a
    subset block the fraction of samples it kept."""
    return float(sum(len(b.last_keep) / batch_size if b.last_keep is not None else float(b.last_gate)
                     for b in blocks))


@torch.no_grad()
def fold_survival_scale(model: nn.Module) -> nn.Module:
    """Fold each block's eval scale into the last BN of its branch, in place.

    The folded model computes exactly what it computed before in eval mode, with every eval scale at 1,
    i.e. it is a plain ResNet. Blocks name their last branch norm with the ``last_norm`` attribute.
    """
    blocks = stochastic_blocks(model)
    for block in blocks:
        if getattr(block, 'se', None) is not None and float(block.eval_scale) != 1.0:  # a scale of 1: nothing to fold
            raise ValueError(f'cannot fold the eval scale of {type(block).__name__}: its branch ends in an '
                             f'attention module after the last norm, which is not linear in the scale')
    for block in blocks:
        norm = getattr(block, getattr(block, 'last_norm', 'bn2'), None)
        if norm is None:  # a converted timm branch's gate: inverted scaling, its eval scale is always 1
            if float(block.eval_scale) != 1.0:
                raise ValueError(f'cannot fold the eval scale of {type(block).__name__}: it names no last norm')
            continue
        scale = block.eval_scale.to(norm.weight.dtype)
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        block.eval_scale.fill_(1.0)
        block.loaded_eval_scale = False  # the scale now lives in the BN: training must not restore it
    return model


_compiled_branches = {}


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` every block's residual branch, leaving the gates in eager Python.

    Whole-model ``torch.compile`` would specialise on Python gate values and recompile for each new
    pattern. Compiling the branch function instead gives one graph per block shape (a handful per
    model); gates still change every step and a dropped branch is still skipped. In ``'subset'`` mode the
    branch's batch size changes every step: the gathered rows are marked dynamic, so a block shape costs
    a static full-batch graph, one dynamic-batch graph and at most a batch-of-1 one, not a graph per
    subset size (and evaluation, its BatchNorms in eval mode, two more). All blocks of a class share one code object, whose graphs count against Dynamo's
    ``recompile_limit`` (8 by default): it is raised to what the compiled block shapes need, so that no block
    silently falls back to eager. Returns the model.
    """
    key = tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items()))
    for block in stochastic_blocks(model):
        cls = type(block)
        fn = _compiled_branches.get((cls, key))
        if fn is None:
            fn = _compiled_branches[(cls, key)] = torch.compile(cls.branch, **compile_kwargs)
        block.branch = fn.__get__(block)
        _compiled_shapes.setdefault(cls, set()).add(  # a gate of a ViT / ConvNeXt branch: its branch's shapes
            (getattr(block, 'branch_fn', None),) + tuple(tuple(p.shape) for p in block.branch_parameters()))
    _raise_recompile_limit()
    return model


_compiled_shapes: Dict[type, Set[Tuple]] = {}
# training: static batch, dynamic batch (a smaller last batch, or subset mode), batch of 1; evaluation (BN in eval
# mode is another graph): static batch, dynamic batch (the last one)
GRAPHS_PER_BLOCK_SHAPE = 5


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config
    needed = max(len(shapes) for shapes in _compiled_shapes.values()) * GRAPHS_PER_BLOCK_SHAPE + 2
    if dynamo_config.recompile_limit < needed:
        dynamo_config.recompile_limit = needed
