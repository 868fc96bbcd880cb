"""Loading published sd-zoo weights: ``sd_zoo.hub.load_published`` (kept here for torch.hub and existing
code; the implementation lives in :mod:`sd_zoo.loading`)."""
from .loading import load_published

__all__ = ['load_published']
