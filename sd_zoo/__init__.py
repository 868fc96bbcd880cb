"""sd-zoo: stochastic-depth ResNets (Huang et al. 2016) in timm's model registry.

``import sd_zoo`` registers the ``sd_*`` models, so ``timm.create_model('sd_resnet110')`` works.
"""
from .stochastic_depth import (
    compile_blocks,
    expected_depth,
    fold_survival_scale,
    set_gate_seed,
    stochastic_blocks,
    StochasticResidual,
    survival_schedule,
)
from . import hub  # noqa: F401  sd_zoo.hub.load_published
from .models import *
from .models.sd_resnet_cifar import SHIPPED_WEIGHTS, shipped_weights_dir
from .models.sd_resnet_imagenet import add_stochastic_depth, plain_state_dict

__version__ = '0.1.0'
__all__ = [
    'survival_schedule', 'expected_depth', 'StochasticResidual', 'stochastic_blocks', 'fold_survival_scale',
    'set_gate_seed', 'compile_blocks', 'add_stochastic_depth', 'plain_state_dict', 'SHIPPED_WEIGHTS',
    'shipped_weights_dir',
]
