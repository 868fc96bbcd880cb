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


def train(config: str = '', **options):
    """Train a model (see :func:`sd_zoo.training.train`): a recipe name or file, and sd-zoo train's flags."""
    from .training import train as _train
    return _train(config, **options)


def validate(model, **options):
    """Top-1 / top-5 / loss of a model on a data split (see :func:`sd_zoo.evaluation.validate`)."""
    from .evaluation import validate as _validate
    return _validate(model, **options)


def publish(source, **options):
    """Stage a run as a Hub repository and push it (see :func:`sd_zoo.publishing.publish`)."""
    from .publishing import publish as _publish
    return _publish(source, **options)

__all__ = [
    'survival_schedule', 'expected_depth', 'StochasticResidual', 'stochastic_blocks', 'fold_survival_scale',
    'set_gate_seed', 'compile_blocks', 'add_stochastic_depth', 'plain_state_dict', 'SHIPPED_WEIGHTS',
    'shipped_weights_dir', 'train', 'validate', 'publish',
]
