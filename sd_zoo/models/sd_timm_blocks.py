"""Compute-skipping stochastic depth for timm's Vision Transformers and ConvNeXts.

timm's ``DropPath`` multiplies a per-sample mask after the residual branch has run on the whole batch, so a
dropped branch costs as much as a kept one. :func:`add_stochastic_depth_to_blocks` converts a timm
``VisionTransformer`` family model (its ``Block`` and ``ResPostBlock``: the attention and the MLP branch each
get a gate) or a ``ConvNeXt`` (``ConvNeXtBlock``) so that dropped branches are not computed:

* each ``drop_path`` / ``drop_path1`` / ``drop_path2`` slot holds a :class:`StochasticBranch` with the survival
  probability of the DropPath it replaces (timm's per-block rates), so module names and state_dict keys stay
  timm's (a gate holds no parameters and saves nothing) and pretrained timm weights load unchanged;
* ``'batch'`` gates skip a branch for the whole mini-batch (identical on every DDP rank); ``'subset'`` gates keep
  timm's per-sample survival (each sample keeps each branch with its own probability) and run the branch on the
  kept samples only; ``'fixed_subset'`` gates run it on a random subset of a fixed size (DINOv2's way);
* a kept branch is scaled by 1/p as timm's DropPath scales it, so eval outputs are exactly timm's; a dropped
  branch's parameters get exactly-zero gradients (DDP without ``find_unused_parameters``), and gradient
  checkpointing recomputes with the same gates.

In eval (and under TorchScript) a converted block runs timm's own forward, in which a gate is the identity.
"""
import copy
import logging
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtBlock
from timm.models.vision_transformer import Block, ResPostBlock

from ..stochastic_depth import StochasticResidual, check_sd_args

__all__ = ['StochasticBranch', 'SDViTBlock', 'SDViTResPostBlock', 'SDConvNeXtBlock', 'add_stochastic_depth_to_blocks',
           'convertible_blocks', 'branch_rates', 'vit_tiny_patch16_224_sd', 'vit_small_patch16_224_sd',
           'vit_base_patch16_224_sd', 'deit_small_patch16_224_sd', 'convnext_atto_sd', 'convnext_tiny_sd']

_logger = logging.getLogger(__name__)


class StochasticBranch(StochasticResidual):
    """The gate of one residual branch of a timm block, in the block's DropPath slot.

    ``residual(x)`` is ``shortcut(x) + branch(x) / p`` with the branch skipped when the gate drops it (the block's
    training forward calls it); ``forward`` is the identity, what a DropPath is at eval, for timm's own forward.
    The block is held as a plain reference, not a submodule, so its modules keep their names and keys."""

    def __init__(self, owner: nn.Module, branch_fn: str, param_names: Sequence[str], survival_prob: float,
                 granularity: str, block_index: int, seed: int, shortcut_fn: Optional[str] = None):
        nn.Module.__init__(self)
        self.__dict__['_owner'] = owner
        self.branch_fn, self.shortcut_fn, self.param_names = branch_fn, shortcut_fn, tuple(param_names)
        ref = next(owner.parameters())
        self.init_stochastic_depth(survival_prob, granularity, 'inverted', block_index, seed, persistent=False,
                                   device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.unused
    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_train(x)

    @torch.jit.unused
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.__dict__['_owner'], self.branch_fn)(x)

    @torch.jit.unused
    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.shortcut_fn is None else getattr(self.__dict__['_owner'], self.shortcut_fn)(x)

    @torch.jit.unused
    def branch_parameters(self) -> Iterator[nn.Parameter]:
        owner = self.__dict__['_owner']
        for name in self.param_names:
            part = getattr(owner, name)
            params = [part] if isinstance(part, nn.Parameter) else part.parameters() if part is not None else []
            yield from (p for p in params if p.requires_grad)

    @torch.jit.unused
    def _branch_modules(self) -> Iterator[nn.Module]:
        owner = self.__dict__['_owner']
        for name in self.param_names:
            part = getattr(owner, name)
            if isinstance(part, nn.Module):
                yield from part.modules()

    def extra_repr(self) -> str:
        return f'{self.branch_fn}, ' + super().extra_repr()


class _ViTGates:
    """A ViT block's forward with its two gates: in training the attention branch's, then the MLP branch's; in
    eval timm's forward, in which a gate is the identity (TorchScript: eval only). ``_attn``/``_mlp`` are the
    branches."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if self.training:
            if torch.jit.is_scripting():  # as a ResNet block: the gates are Python, a scripted model infers only
                raise RuntimeError('a TorchScript stochastic-depth block cannot train: script the model in eval '
                                   'mode for inference, and train the Python model')
            return self._forward_sd(x, attn_mask, is_causal)
        x = x + self.drop_path1(self._attn(x, attn_mask, is_causal))
        return x + self.drop_path2(self._mlp(x))

    @torch.jit.unused
    def _forward_sd(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        if attn_mask is not None and self.drop_path1.granularity in ('subset', 'fixed_subset'):
            raise ValueError("subset gates with an attention mask (whose rows follow the batch): use 'batch' gates")
        self._attn_kwargs = (attn_mask, is_causal)
        x = self.drop_path1.residual(x)
        self._attn_kwargs = (None, False)  # the block keeps no mask (nor its memory) past the step
        return self.drop_path2.residual(x)

    @torch.jit.unused
    def _attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self._attn(x, *self._attn_kwargs)

    @torch.jit.unused
    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(x)


@register_notrace_module  # FX keeps the block a leaf: its gates are Python decisions
class SDViTBlock(_ViTGates, Block):
    """timm's ViT ``Block`` whose attention and MLP branches are skipped when their gates drop them."""
    branches = (('drop_path1', '_attn_branch', ('norm1', 'attn', 'ls1')),
                ('drop_path2', '_mlp_branch', ('norm2', 'mlp', 'ls2')))

    def _attn(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))


@register_notrace_module
class SDViTResPostBlock(_ViTGates, ResPostBlock):
    """timm's ViT ``ResPostBlock`` (norm after each branch) with compute-skipping gates."""
    branches = (('drop_path1', '_attn_branch', ('attn', 'norm1')),
                ('drop_path2', '_mlp_branch', ('mlp', 'norm2')))

    def _attn(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        return self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.mlp(x))


@register_notrace_module
class SDConvNeXtBlock(ConvNeXtBlock):
    """timm's ``ConvNeXtBlock`` whose branch (depthwise conv, norm, MLP, layer scale) is skipped when dropped."""
    branches = (('drop_path', '_branch', ('conv_dw', 'norm', 'mlp', 'gamma')),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if torch.jit.is_scripting():
                raise RuntimeError('a TorchScript stochastic-depth block cannot train: script the model in eval '
                                   'mode for inference, and train the Python model')
            return self.drop_path.residual(x)
        return self.drop_path(self._branch(x)) + self.shortcut(x)  # timm's forward, a gate the identity

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x

    @torch.jit.unused
    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


_SD_CLASSES = {Block: SDViTBlock, ResPostBlock: SDViTResPostBlock, ConvNeXtBlock: SDConvNeXtBlock}


def convertible_blocks(model: nn.Module) -> list:
    """The blocks :func:`add_stochastic_depth_to_blocks` converts (or has converted), in forward order."""
    return [m for m in model.modules() if type(m) in _SD_CLASSES or type(m) in _SD_CLASSES.values()]


def _drop_prob(slot: nn.Module) -> float:
    """The drop probability of a block's DropPath slot: timm's DropPath's, 0 for Identity, a gate's 1 - p."""
    if isinstance(slot, StochasticBranch):
        return 1.0 - slot.survival_prob
    if isinstance(slot, nn.Identity):
        return 0.0
    prob = getattr(slot, 'drop_prob', None)
    if prob is None:
        raise ValueError(f'{type(slot).__name__} is not timm\'s DropPath: cannot tell its rate')
    if not getattr(slot, 'scale_by_keep', True):
        raise ValueError('a DropPath with scale_by_keep=False: its eval outputs are not the inverted-scaled ones')
    return float(prob)


def _rates(blocks: list, drop_path_rate: Optional[float], uniform: bool = False) -> list:
    """Per-branch drop rates: the model's own (timm's per-block rates), or with ``drop_path_rate`` timm's
    linear rule over the blocks (0 at the first block, the rate at the last; ``uniform``: the rate everywhere),
    both branches of a block alike."""
    if uniform and drop_path_rate is None:
        raise ValueError("sd_rule='uniform' needs a drop_path_rate (without one the model's own rates are kept)")
    if drop_path_rate is None:
        return [[_drop_prob(getattr(b, slot)) for slot, _, _ in _SD_CLASSES.get(type(b), type(b)).branches]
                for b in blocks]
    n = len(blocks)
    return [[drop_path_rate * (1.0 if uniform else i / max(n - 1, 1))] * len(_SD_CLASSES.get(type(b), type(b)).branches)
            for i, b in enumerate(blocks)]


def add_stochastic_depth_to_blocks(model: nn.Module, drop_path_rate: Optional[float] = None,
                                   sd_granularity: str = 'batch', sd_seed: int = 0,
                                   inplace: bool = False, uniform: bool = False) -> nn.Module:
    """Convert a timm ViT-family model or ConvNeXt so that dropped residual branches are not computed.

    ``drop_path_rate=None`` keeps the model's own per-block rates (those it was built with, ``drop_path_rate=0.1``
    and so on); a number sets timm's linear rule to that rate. Returns the converted model (a copy unless
    ``inplace``); its eval outputs and state_dict keys are exactly the unconverted model's."""
    blocks = convertible_blocks(model)
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no timm ViT Block / ResPostBlock or ConvNeXtBlock to convert')
    if drop_path_rate is not None:
        check_sd_args(1.0 - drop_path_rate, granularity=sd_granularity)
    else:
        check_sd_args(1.0, granularity=sd_granularity)
    if sd_granularity == 'sample':
        raise ValueError("sd_granularity 'sample' computes every branch, as timm's DropPath does: keep DropPath, "
                         "or choose 'batch', 'subset' or 'fixed_subset'")
    rates = _rates(blocks, drop_path_rate, uniform)  # every block read before any changes: an error leaves the model as it was
    for rate in (r for block_rates in rates for r in block_rates):
        check_sd_args(1.0 - rate, granularity=sd_granularity)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = convertible_blocks(model)
    index = 0
    for block, block_rates in zip(blocks, rates):
        cls = _SD_CLASSES.get(type(block), type(block))
        block.__class__ = cls
        for (slot, branch_fn, params), rate in zip(cls.branches, block_rates):
            shortcut_fn = '_shortcut' if cls is SDConvNeXtBlock else None
            setattr(block, slot, StochasticBranch(block, branch_fn, params, 1.0 - rate, sd_granularity, index,
                                                  sd_seed, shortcut_fn=shortcut_fn))
            index += 1
    _warn_left_droppath(model)
    return model


def _warn_left_droppath(model: nn.Module) -> None:
    """A model with other residual blocks too (CrossViT's cross-attention, MobileViT's convolutions) keeps timm's
    DropPath there, computing what it drops: say so rather than let the saving look complete."""
    left = [name for name, m in model.named_modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    if left:
        _logger.warning(f'{len(left)} DropPath module(s) outside the converted blocks keep timm\'s masking, which '
                        f'computes what it drops: {", ".join(left[:3])}{", ..." if len(left) > 3 else ""}')


def branch_rates(model: nn.Module) -> Tuple[float, ...]:
    """Survival probability of every gate of a converted model, in forward order."""
    return tuple(m.survival_prob for m in model.modules() if isinstance(m, StochasticBranch))


# ---------------------------------------------------------------------------------------------- model names

# NAME_sd is timm's NAME converted: `timm.create_model('vit_small_patch16_224_sd', pretrained=True,
# drop_path_rate=0.1, sd_granularity='subset')`, and `--model vit_small_patch16_224_sd` in timm's train.py
# (--device-modules sd_zoo). pretrained=True loads timm's own weights for NAME. The names end in _sd (not sd_...)
# so that timm's own model tests treat each as the family it is (their filters match name prefixes).
CONVERTED_MODELS = ('vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224',
                    'deit_small_patch16_224', 'convnext_atto', 'convnext_tiny')


_WEIGHT_SOURCE_KEYS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'source', 'tag', 'architecture')


def _converted_cfg(base: str) -> dict:
    """NAME's default config as NAME_sd's, without a weight source of its own (pretrained=True goes through NAME)."""
    from timm.models import get_pretrained_cfg
    cfg = {k: v for k, v in get_pretrained_cfg(base).to_dict().items() if k not in _WEIGHT_SOURCE_KEYS}
    return dict(cfg, paper_ids='arXiv:1603.09382', paper_name='Deep Networks with Stochastic Depth',
                notes=f'{base} with compute-skipping stochastic depth (sd_zoo.add_stochastic_depth); weights: {base}\'s')


def _create_converted(variant: str, base: str, pretrained: bool = False, sd_granularity: str = 'batch',
                      sd_seed: int = 0, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> nn.Module:
    import timm
    # NAME builds and loads: NAME_sd.TAG is NAME.TAG's weights; a config of its own (hf-hub:, local-dir:) and
    # timm's train.py --pretrained-path overlay name the weights to load, which must reach NAME
    if isinstance(pretrained_cfg, str):
        base, pretrained_cfg = f'{base}.{pretrained_cfg}', None
    model = timm.create_model(base, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                              pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
    add_stochastic_depth_to_blocks(model, None, sd_granularity, sd_seed, inplace=True)
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else \
        dict(pretrained_cfg or _converted_cfg(base))
    overlay = {k: v for k, v in (pretrained_cfg_overlay or {}).items() if k not in _WEIGHT_SOURCE_KEYS}
    model.pretrained_cfg = model.default_cfg = dict(cfg, **overlay, architecture=variant)  # no weight source
    return model


default_cfgs = generate_default_cfgs({f'{base}_sd': _converted_cfg(base) for base in CONVERTED_MODELS})


@register_model
def vit_tiny_patch16_224_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's vit_tiny_patch16_224 whose dropped attention / MLP branches are not computed."""
    return _create_converted('vit_tiny_patch16_224_sd', 'vit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's vit_small_patch16_224 whose dropped attention / MLP branches are not computed."""
    return _create_converted('vit_small_patch16_224_sd', 'vit_small_patch16_224', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's vit_base_patch16_224 whose dropped attention / MLP branches are not computed."""
    return _create_converted('vit_base_patch16_224_sd', 'vit_base_patch16_224', pretrained, **kwargs)


@register_model
def deit_small_patch16_224_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's deit_small_patch16_224 whose dropped attention / MLP branches are not computed."""
    return _create_converted('deit_small_patch16_224_sd', 'deit_small_patch16_224', pretrained, **kwargs)


@register_model
def convnext_atto_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's convnext_atto whose dropped block branches are not computed."""
    return _create_converted('convnext_atto_sd', 'convnext_atto', pretrained, **kwargs)


@register_model
def convnext_tiny_sd(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's convnext_tiny whose dropped block branches are not computed."""
    return _create_converted('convnext_tiny_sd', 'convnext_tiny', pretrained, **kwargs)
