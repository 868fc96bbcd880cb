"""sd-zoo model families; importing this module registers every model with timm."""
from .sd_resnet_cifar import *
from .sd_resnet_imagenet import *
from .sd_timm_blocks import *
