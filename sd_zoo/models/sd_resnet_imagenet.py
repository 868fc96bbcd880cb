"""ImageNet ResNets with stochastic depth, weight-compatible with timm's ResNets.

The paper's ImageNet model is a ResNet-152 (bottleneck blocks, projection shortcuts where dimensions
change) trained with p_L = 0.5, linear decay. These models are timm's own ``ResNet`` built from
stochastic-depth subclasses of timm's ``BasicBlock`` / ``Bottleneck``: the module tree and state_dict keys
are timm's (plus one ``eval_scale`` buffer per block), so timm's constant-depth weights load as an
initialisation (they evaluate unscaled), and every timm ResNet feature works unchanged.

:func:`add_stochastic_depth` gives any timm ResNet-family model built from timm's blocks (resnet*,
resnext*, seresnet*, wide_resnet*, ...) the same stochastic depth (batch or subset mode), in place or as a copy.
"""
import copy
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..stochastic_depth import StochasticResidual, check_model_sd_args, check_sd_args, survival_schedule

_IDEMPOTENT_ACTS = (nn.ReLU, nn.ReLU6, nn.Identity)  # act(act(x)) == act(x): a dropped block may skip it

__all__ = ['SDResNet', 'SDBasicBlock', 'SDBottleneck', 'add_stochastic_depth', 'plain_state_dict']


class _TimmBlockSD(StochasticResidual):
    """Stochastic depth on a timm residual block: its branch and shortcut, its module names."""

    def __init__(self, *args, survival_prob: float = 1.0, granularity: str = 'batch', scaling: str = 'paper',
                 block_index: int = 0, seed: int = 0, **kwargs):
        super(StochasticResidual, self).__init__(*args, **kwargs)  # the timm block's own __init__ (next in MRO)
        self.init_stochastic_depth(survival_prob, granularity, scaling, block_index, seed,
                                   device=kwargs.get('device'), dtype=kwargs.get('dtype'))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        return x

    @torch.jit.unused
    def dropped_output(self, shortcut: torch.Tensor) -> torch.Tensor:
        # an identity shortcut carries the previous block's activation output: ReLU of it is itself (a
        # projection's output is not); any other activation (SiLU, GELU) is applied, out of place, since
        # the previous activation's backward may still need that tensor
        if self.downsample is None and isinstance(getattr(self, self.last_act), _IDEMPOTENT_ACTS):
            return shortcut
        return self.act(shortcut.clone() if self.downsample is None else shortcut)

    @torch.jit.unused
    def branch_parameters(self):
        skip = set() if self.downsample is None else {id(p) for p in self.downsample.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in skip)


class SDBasicBlock(_TimmBlockSD, BasicBlock):
    """timm's BasicBlock with stochastic depth (same modules and keys)."""
    last_norm = 'bn2'
    last_act = 'act2'

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        return x


class SDBottleneck(_TimmBlockSD, Bottleneck):
    """timm's Bottleneck with stochastic depth (same modules and keys)."""
    last_norm = 'bn3'
    last_act = 'act3'

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(x)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        return x


_SD_CLASSES = {BasicBlock: SDBasicBlock, Bottleneck: SDBottleneck}


def _sd_class_for(block: nn.Module):
    for base, sd_cls in _SD_CLASSES.items():
        if type(block) is base:
            return sd_cls
    return None


def _apply_schedule(model: nn.Module, survival_prob_last: float, rule: str, granularity: str, scaling: str,
                    seed: int, persistent: bool = True) -> None:
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    probs = survival_schedule(len(blocks), survival_prob_last, rule)
    for block in blocks:  # every block is checked before any is changed: an error leaves the model as it was
        if getattr(block, 'drop_path', None) is not None:
            raise ValueError('the model already has timm DropPath in its blocks: build it with drop_path_rate=0')
        if not isinstance(block, StochasticResidual) and _sd_class_for(block) is None:
            raise ValueError(f'{type(block).__name__} is not timm\'s BasicBlock or Bottleneck')
    for index, (block, p) in enumerate(zip(blocks, probs)):
        if not isinstance(block, StochasticResidual):
            block.__class__ = _sd_class_for(block)
        ref = next(block.parameters())
        block.init_stochastic_depth(p, granularity, scaling, index, seed, persistent=persistent,
                                    device=ref.device, dtype=ref.dtype)


def add_stochastic_depth(
        model: nn.Module,
        drop_path_rate: Optional[float] = None,
        sd_rule: str = 'linear',
        sd_scaling: str = 'inverted',
        sd_seed: int = 0,
        inplace: bool = False,
        sd_granularity: str = 'batch',
) -> nn.Module:
    """Give a timm model compute-skipping stochastic depth: a ResNet family model (timm BasicBlock / Bottleneck
    blocks), a Vision Transformer (``Block`` / ``ResPostBlock``: attention and MLP branches each gated) or a
    ConvNeXt (``ConvNeXtBlock``).

    Dropped blocks are skipped, get zero gradients (DDP-safe) and draw reproducible gates, as in the
    sd-zoo models: ``sd_granularity='batch'`` (default) drops a block for the whole mini-batch with
    rank-consistent gates, ``'subset'`` per sample, running the branch on the kept samples only (``'fixed_subset'``
    on a random subset of fixed size; ``'sample'``,
    a DropPath-like mask that always computes, is accepted for ResNets). With the default ``inverted`` scaling the
    eval outputs are unchanged and the state_dict keys are exactly the model's own (the eval scale of 1 is not
    saved); ``paper`` scaling (ResNets) saves each block's eval scale. ``drop_path_rate`` is 1 - p_L for ResNets
    (default 0.5, the paper's); for ViTs and ConvNeXts the default keeps the rates the model was built with (timm's
    per-block ``drop_path_rate`` schedule), and a number sets timm's linear rule (``sd_rule='uniform'``: that rate
    for every branch). Returns the converted model (a copy unless inplace).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'add_stochastic_depth(): model must be a torch.nn.Module, got {type(model).__name__}')
    if not any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        from .sd_timm_blocks import add_stochastic_depth_to_blocks, convertible_blocks
        if convertible_blocks(model):
            if drop_path_rate is None:
                check_sd_args(1.0, sd_rule, sd_granularity, sd_scaling)
            else:
                check_model_sd_args(drop_path_rate, sd_rule, sd_granularity, sd_scaling)
            if sd_scaling != 'inverted':
                raise ValueError("ViT and ConvNeXt blocks take sd_scaling='inverted' (timm's DropPath scaling, so "
                                 "eval outputs and keys stay timm's)")
            return add_stochastic_depth_to_blocks(model, drop_path_rate, sd_granularity, sd_seed, inplace,
                                                  uniform=sd_rule == 'uniform')
        raise ValueError(f'{type(model).__name__} has no timm BasicBlock / Bottleneck, ViT Block / ResPostBlock or '
                         f'ConvNeXtBlock blocks to convert')
    drop_path_rate = 0.5 if drop_path_rate is None else drop_path_rate
    check_model_sd_args(drop_path_rate, sd_rule, sd_granularity, sd_scaling)
    if not inplace:
        model = copy.deepcopy(model)
    plain = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))
             and not isinstance(m, StochasticResidual)]
    _apply_schedule(model, 1.0 - drop_path_rate, sd_rule, sd_granularity, sd_scaling, sd_seed,
                    persistent=sd_scaling == 'paper')
    for block in plain:  # weights trained without stochastic depth evaluate as they are (scale 1, as loading
        block.eval_scale.fill_(1.0)  # timm's weights into sd_resnet50 does) until the converted model trains:
        block.loaded_eval_scale = True  # its first training step takes p_l (paper scaling; inverted: 1 anyway)
    return model


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict of the plain timm model that computes what ``model`` computes in eval: a ResNet's eval
    scales folded into its norms; a converted ViT or ConvNeXt's own (inverted scaling leaves nothing to fold)."""
    from ..stochastic_depth import fold_survival_scale
    folded = fold_survival_scale(copy.deepcopy(model))
    return {k: v for k, v in folded.state_dict().items() if not k.endswith('eval_scale')}


class SDResNet(ResNet):
    """timm's ResNet with stochastic-depth blocks; ``drop_path_rate`` is 1 - p_L (default 0.5, the paper)."""

    def __init__(self, *args, drop_path_rate: float = 0.5, sd_rule: str = 'linear', sd_granularity: str = 'batch',
                 sd_scaling: str = 'paper', sd_seed: int = 0, **kwargs):
        check_model_sd_args(drop_path_rate, sd_rule, sd_granularity, sd_scaling)
        super().__init__(*args, drop_path_rate=0.0, **kwargs)
        self.drop_path_rate = float(drop_path_rate)
        self.sd_rule = sd_rule
        _apply_schedule(self, 1.0 - drop_path_rate, sd_rule, sd_granularity, sd_scaling, sd_seed)


def _create_sd_resnet(variant: str, pretrained: bool = False, **kwargs) -> SDResNet:
    return build_model_with_cfg(SDResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # No weights yet: no url / hf_hub_id, so timm.list_pretrained('sd_*') lists none of these.
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:1603.09382', 'paper_name': 'Deep Networks with Stochastic Depth',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'sd_resnet18.in1k': _cfg(),
    'sd_resnet34.in1k': _cfg(),
    'sd_resnet50.in1k': _cfg(),
    'sd_resnet101.in1k': _cfg(),
    'sd_resnet152.in1k': _cfg(),
})


@register_model
def sd_resnet18(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-18 (timm keys) with stochastic depth."""
    return _create_sd_resnet('sd_resnet18', pretrained, **dict(dict(block=SDBasicBlock, layers=(2, 2, 2, 2)), **kwargs))


@register_model
def sd_resnet34(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-34 (timm keys) with stochastic depth."""
    return _create_sd_resnet('sd_resnet34', pretrained, **dict(dict(block=SDBasicBlock, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def sd_resnet50(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-50 (timm keys) with stochastic depth."""
    return _create_sd_resnet('sd_resnet50', pretrained, **dict(dict(block=SDBottleneck, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def sd_resnet101(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-101 (timm keys) with stochastic depth."""
    return _create_sd_resnet('sd_resnet101', pretrained,
                             **dict(dict(block=SDBottleneck, layers=(3, 4, 23, 3)), **kwargs))


@register_model
def sd_resnet152(pretrained: bool = False, **kwargs) -> SDResNet:
    """ResNet-152 (timm keys) with stochastic depth: the paper's ImageNet model (50 blocks, p_L 0.5 linear)."""
    return _create_sd_resnet('sd_resnet152', pretrained,
                             **dict(dict(block=SDBottleneck, layers=(3, 8, 36, 3)), **kwargs))
