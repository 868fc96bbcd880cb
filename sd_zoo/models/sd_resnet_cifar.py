"""CIFAR-style ResNets with stochastic depth, as in Huang et al. 2016 (arXiv:1603.09382).

The paper's networks (He et al. 2016's CIFAR ResNets): a 3x3 conv stem with 16 channels, three stages
of n post-activation basic blocks with 16, 32 and 64 channels, global average pooling and a linear
classifier, 6n + 2 layers in all. Transition blocks (first of stages 2 and 3) halve the resolution;
their shortcut is 2x2 average pooling with stride 2 followed by zero-padding of the channels, so no
shortcut has parameters. ResNet-110 (n = 18, 54 blocks) is the paper's CIFAR model, ResNet-1202
(n = 200) its very deep one, and the 152-layer net (n = 25) its SVHN model.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype, register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..stochastic_depth import StochasticResidual, check_model_sd_args, survival_schedule

__all__ = ['SDCifarResNet', 'CifarBasicBlock', 'shipped_weights_dir', 'SHIPPED_WEIGHTS', 'arch_depth']

SHORTCUT_TYPES = ('avg', 'subsample')


class CifarBasicBlock(StochasticResidual):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

    The shortcut has no parameters: identity, or for a transition (stride 2, more channels) spatial
    downsampling ('avg': 2x2 average pooling, the paper's and its authors' Torch code, ResidualDrop.lua;
    'subsample': 1x1 stride-2 subsampling, He et al.'s option A as fb.resnet.torch has it) followed by
    zero-padding of the new channels.
    """
    last_norm = 'bn2'

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            shortcut_type: str = 'avg',
            survival_prob: float = 1.0,
            granularity: str = 'batch',
            scaling: str = 'paper',
            block_index: int = 0,
            seed: int = 0,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(survival_prob, granularity, scaling, block_index, seed, **dd)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.stride = stride
        self.pad_chs = out_chs - in_chs
        self.pool_kernel = 2 if shortcut_type == 'avg' else 1

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        return self.bn2(x)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.pool_kernel, self.stride)
        if self.pad_chs > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_chs))
        return x

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x)

    # dropped_output is the shortcut itself: the block input is post-ReLU (>= 0), so are its pooled and
    # zero-padded versions, and ReLU(shortcut) == shortcut.


@register_notrace_function
def check_input_shape(x: torch.Tensor, in_chans: int, size_multiple: int = 1) -> None:
    """A batch (N, in_chans, H, W) with H and W positive multiples of ``size_multiple``: with the 'avg'
    shortcut an odd size at a stride-2 stage gives a 1-pixel shortcut that broadcasts silently."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            'expected an input batch of shape (N, ' + str(in_chans) + ', H, W), got ' + str(list(x.shape))
            + '; set in_chans when creating the model to change the number of input channels')
    h, w = int(x.shape[2]), int(x.shape[3])
    if h < size_multiple or w < size_multiple or h % size_multiple or w % size_multiple:
        need = 'that are positive multiples of ' + str(size_multiple) + ' (its two stride-2 stages halve them ' \
            'exactly)' if size_multiple > 1 else 'of at least 1 pixel'
        raise ValueError('input images of ' + str(w) + 'x' + str(h) + ' pixels: this CIFAR-style ResNet needs a '
                         'height and width ' + need + '; CIFAR and SVHN images are 32x32')


class SDCifarResNet(nn.Module):
    """CIFAR ResNet (depth 6n + 2) with stochastic depth.

    ``drop_path_rate`` is timm's name for 1 - p_L (0.5, the paper's p_L = 0.5, by default; 0 gives
    constant depth). ``sd_rule`` ('linear' or 'uniform'), ``sd_granularity`` ('batch' skips dropped
    blocks, 'sample' masks per sample, 'subset' runs each branch on its kept samples only, 'fixed_subset' on
    a random subset of fixed size), ``sd_scaling`` ('paper' or 'inverted') and ``sd_seed`` (the gate sequence; batch gates are identical
    on every DDP rank, subset masks differ per rank) select the rest.
    """

    def __init__(
            self,
            depth: int = 110,
            num_classes: int = 10,
            in_chans: int = 3,
            channels: Tuple[int, ...] = (16, 32, 64),
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.5,
            sd_rule: str = 'linear',
            sd_granularity: str = 'batch',
            sd_scaling: str = 'paper',
            sd_seed: int = 0,
            shortcut_type: str = 'avg',
            zero_init_last: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f'depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth!r}')
        check_model_sd_args(drop_path_rate, sd_rule, sd_granularity, sd_scaling)
        if shortcut_type not in SHORTCUT_TYPES:
            raise ValueError(f'unknown shortcut_type {shortcut_type!r}: choose one of {", ".join(SHORTCUT_TYPES)}')
        if not (isinstance(channels, (tuple, list)) and len(channels) == 3 and all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
            raise ValueError(f'channels must give the widths of the 3 stages as 3 positive integers, got {channels!r}')
        if list(channels) != sorted(channels):
            raise ValueError(f'channels {tuple(channels)} must not decrease: a transition shortcut zero-pads to the '
                             f'next stage\'s width')
        self.depth = depth
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.drop_path_rate = float(drop_path_rate)
        self.sd_rule = sd_rule
        self.shortcut_type = shortcut_type
        self.grad_checkpointing = False

        blocks_per_stage = (depth - 2) // 6
        num_blocks = 3 * blocks_per_stage
        survival = survival_schedule(num_blocks, 1.0 - drop_path_rate, sd_rule)

        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(channels[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module='act1')]

        in_chs, reduction, index = channels[0], 1, 0
        for stage_idx, out_chs in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(
                    in_chs, out_chs, stride=stride if i == 0 else 1, shortcut_type=shortcut_type,
                    survival_prob=survival[index], granularity=sd_granularity, scaling=sd_scaling,
                    block_index=index, seed=sd_seed, **dd))
                in_chs, index = out_chs, index + 1
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))

        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """He (fan_out) init for convs, BN at identity, as in the authors' code (fb.resnet.torch)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, CifarBasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|^bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.in_chans, 4 if self.shortcut_type == 'avg' else 1)
        return self.act1(self.bn1(self.conv1(x)))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (index 0) and of each stage (1-3), optionally with the final features."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(4, indices)
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        layer_names = ('layer1', 'layer2', 'layer3')
        if stop_early:
            layer_names = layer_names[:max_index]
        for feat_idx, name in enumerate(layer_names, start=1):
            layer = getattr(self, name)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(layer, x)
            else:
                x = layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages after the last wanted feature (and the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(4, indices)
        for name in ('layer1', 'layer2', 'layer3')[max_index:]:
            setattr(self, name, nn.Sequential())
        prune_end = max_index < 3
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


CIFAR_ARCH_DEPTHS = {**{f'sd_resnet{d}': d for d in (20, 32, 44, 56, 110, 1202)}, 'sd_resnet152_cifar': 152}


def arch_depth(arch: str) -> Optional[int]:
    """The depth a CIFAR architecture's name fixes; None for a model of another family."""
    return CIFAR_ARCH_DEPTHS.get(arch)


def _create_sd_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> SDCifarResNet:
    # the name fixes the depth: a depth argument (from a config.json's model_args, say) may only repeat it
    depth = CIFAR_ARCH_DEPTHS[variant]
    if kwargs.setdefault('depth', depth) != depth:
        raise ValueError(f'{variant} has depth {depth}, not {kwargs["depth"]!r}: name the model of that depth '
                         f'({", ".join(CIFAR_ARCH_DEPTHS)})')
    return build_model_with_cfg(
        SDCifarResNet, variant, pretrained,
        # features_only through forward_intermediates (timm's getter), so the input check of _stem runs there too
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def _cfg(num_classes: int, mean: Tuple[float, ...], std: Tuple[float, ...], **kwargs) -> Dict[str, Any]:
    # Only configs with real weights get a file / hf_hub_id: timm.list_pretrained('sd_*') lists exactly those.
    return {
        'num_classes': num_classes, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'crop_mode': 'center', 'interpolation': 'bilinear', 'mean': mean, 'std': std,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:1603.09382',
        'paper_name': 'Deep Networks with Stochastic Depth',
        **kwargs,
    }


CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _cifar10_cfg(**kwargs) -> Dict[str, Any]:
    # the class names, so that an evaluation matches a data set's classes to the outputs by name
    return _cfg(10, CIFAR10_MEAN, CIFAR10_STD, label_names=CIFAR10_CLASSES, **kwargs)


def _cifar100_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(100, CIFAR100_MEAN, CIFAR100_STD, **kwargs)


def _svhn_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(10, SVHN_MEAN, SVHN_STD, **kwargs)


# Weights that ship inside the package, so that pretrained=True works offline right after installing:
# sd_zoo/weights/<model>.<tag>/ holds the files `sd-zoo publish` stages for the Hub repo HUB_ORG/<model>.<tag>
# (config.json, model.safetensors, README.md model card). timm loads the local file first (its `file`
# source outranks `hf_hub_id`); the hub id says where the same files are published.
HUB_ORG = 'sd-zoo'
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / 'weights'
SHIPPED_WEIGHTS = ('sd_resnet20.cifar10', 'sd_resnet56.cifar10')


def shipped_weights_dir(name: str) -> Path:
    """The folder of weights shipped in the package for ``name`` (``model.tag``): a ``local-dir:`` source."""
    if name not in SHIPPED_WEIGHTS:
        raise ValueError(f'no weights ship with sd-zoo for {name!r}; shipped: {", ".join(SHIPPED_WEIGHTS)}')
    return WEIGHTS_DIR / name


def _weights(name: str) -> Dict[str, Any]:
    if name not in SHIPPED_WEIGHTS:
        return {}
    return dict(file=str(WEIGHTS_DIR / name / 'model.safetensors'), hf_hub_id=f'{HUB_ORG}/{name}')


_CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
_DATASET_CFGS = (('cifar10', _cifar10_cfg), ('cifar100', _cifar100_cfg), ('svhn', _svhn_cfg))

default_cfgs = generate_default_cfgs({
    **{f'sd_resnet{d}.{tag}': cfg(**_weights(f'sd_resnet{d}.{tag}')) for d in _CIFAR_DEPTHS
       for tag, cfg in _DATASET_CFGS},
    # the paper's SVHN model: the first tag is the default one
    **{f'sd_resnet152_cifar.{tag}': cfg(**_weights(f'sd_resnet152_cifar.{tag}')) for tag, cfg in (
        _DATASET_CFGS[2], _DATASET_CFGS[0], _DATASET_CFGS[1])},
})


@register_model
def sd_resnet20(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-20 (9 blocks) with stochastic depth, for fast experiments."""
    return _create_sd_cifar_resnet('sd_resnet20', pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def sd_resnet32(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-32 (15 blocks) with stochastic depth."""
    return _create_sd_cifar_resnet('sd_resnet32', pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def sd_resnet44(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-44 (21 blocks) with stochastic depth."""
    return _create_sd_cifar_resnet('sd_resnet44', pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def sd_resnet56(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-56 (27 blocks) with stochastic depth."""
    return _create_sd_cifar_resnet('sd_resnet56', pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def sd_resnet110(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-110 (54 blocks) with stochastic depth: the paper's CIFAR-10/100 model."""
    return _create_sd_cifar_resnet('sd_resnet110', pretrained, **dict(dict(depth=110), **kwargs))


@register_model
def sd_resnet1202(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """ResNet-1202 (600 blocks) with stochastic depth: the paper's very deep CIFAR-10 model.

    Its last branch BNs start at zero (``zero_init_last=True``): with the paper's init, an untrained
    model in eval mode (BN running statistics at identity) overflows to inf/NaN over 600 blocks. Pass
    ``zero_init_last=False`` for the paper's init when training from scratch as the paper did.
    """
    return _create_sd_cifar_resnet(
        'sd_resnet1202', pretrained, **dict(dict(depth=1202, zero_init_last=True), **kwargs))


@register_model
def sd_resnet152_cifar(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """152-layer CIFAR-style ResNet (75 blocks) with stochastic depth: the paper's SVHN model."""
    return _create_sd_cifar_resnet('sd_resnet152_cifar', pretrained, **dict(dict(depth=152), **kwargs))
