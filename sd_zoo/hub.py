"""Loading published sd-zoo weights (Hub repositories or local folders) with clear errors.

``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` works as well after ``import sd_zoo``; this
loader is what ``hubconf.py`` and ``sd-zoo validate`` use, and it checks what timm leaves implicit: the
weights are safetensors (never pickle), they fit the requested architecture and class count, and a
corrupt or truncated file is named as such. Downloads go through huggingface_hub (cached, verified,
``HF_HUB_OFFLINE`` honoured).
"""
import json
import os
from typing import Optional

import torch

__all__ = ['load_published']

WEIGHTS_NAME = 'model.safetensors'
PICKLE_NAMES = ('pytorch_model.bin', 'model.pth', 'model.pt')


def _fetch(source: str, filename: str, revision: Optional[str]) -> Optional[str]:
    """Local path of ``filename`` from a folder or a Hub repo id; None when the repo has no such file."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(source, filename, revision=revision, library_name='sd-zoo')
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError as e:
        if filename != 'config.json':
            return None
        raise ValueError(f'{source!r}: {filename} is neither cached nor reachable ({e})') from e


def load_published(source: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                   revision: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """An sd-zoo model with published weights from a Hub repo id (``ORG/NAME``) or a local folder.

    ``model_name`` and ``num_classes``, when given, must match the published weights.
    """
    import timm
    import sd_zoo  # noqa: F401  registers the architectures
    from safetensors.torch import load_file
    for prefix in ('hf-hub:', 'local-dir:'):
        if source.startswith(prefix):
            source = source[len(prefix):]
    config_path = _fetch(source, 'config.json', revision)
    if config_path is None:
        raise ValueError(f'{source!r} has no config.json: it is not a timm model repository')
    try:
        with open(config_path) as f:
            config = json.load(f)
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise ValueError(f'{source!r}: config.json is not a timm model config ({e})') from e
    if arch not in timm.list_models():
        raise ValueError(f'{source!r}: config.json names the architecture {arch!r}, which no installed package '
                         f'registers (sd-zoo has {", ".join(timm.list_models("sd_*"))})')
    if model_name is not None and model_name.split('.')[0] != arch:
        raise ValueError(f'{source!r} holds {arch!r} weights, not {model_name!r}')
    weights = _fetch(source, WEIGHTS_NAME, revision)
    if weights is None:
        pickled = [n for n in PICKLE_NAMES if _fetch(source, n, revision)]
        reason = f'only pickle weights ({", ".join(pickled)}), which sd-zoo does not load' if pickled else \
            f'no {WEIGHTS_NAME}'
        raise ValueError(f'{source!r} has {reason}: publish safetensors weights (sd-zoo publish)')
    try:
        state_dict = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for a corrupt or truncated file
        raise ValueError(f'{source!r}: {WEIGHTS_NAME} is corrupt or truncated ({type(e).__name__}: {e}); '
                         f'delete it from the cache (huggingface-cli delete-cache) and download it again') from e
    model_args = dict(config.get('model_args') or {})
    weights_classes = config.get('num_classes', model_args.get('num_classes'))
    if num_classes is not None and weights_classes is not None and num_classes != weights_classes:
        raise ValueError(f'{source!r} has {weights_classes}-class weights, not {num_classes}: load them as they '
                         f'are and call model.reset_classifier({num_classes}) to fine-tune')
    model_args.update(kwargs)
    pretrained_cfg = dict(config.get('pretrained_cfg') or {}, architecture=arch)
    model = timm.create_model(arch, pretrained_cfg=pretrained_cfg, **model_args)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f'{source!r}: the weights do not fit {arch} built from config.json: '
                         f'{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}') from e
    return model.eval()
