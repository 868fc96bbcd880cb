"""Loading models and weights: names (tagged or not), checkpoints, Hub repositories and local folders.

One place for the rules the commands share:

* a model name is a registered architecture or ``arch.tag`` (timm's pretrained tags, e.g.
  ``sd_resnet20.cifar100``: its config sets num_classes, mean/std and input size); anything else is a one-line
  error that lists the choices;
* ``hf-hub:ORG/NAME`` (or a bare ``ORG/NAME`` given to :func:`load_published`) always means the Hub, never a
  folder that happens to have that name; local folders are ``local-dir:PATH``;
* weights are safetensors or timm checkpoints read with ``weights_only=True``: nothing is ever unpickled;
* a file that is not weights for the model, a corrupt download, a class-count or architecture mismatch, and an
  unreachable Hub are each named as such.
"""
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

import torch

from . import models  # noqa: F401  registers the sd architectures with timm, whoever calls
from .published import PublishedConfig, check_published_config, check_published_weights

__all__ = ['check_model_name', 'load_model', 'load_weights', 'load_state', 'load_published', 'read_state_dict',
           'shape_kwargs_from_weights']

WEIGHTS_NAME = 'model.safetensors'
PICKLE_NAMES = ('pytorch_model.bin', 'model.pth', 'model.pt')
HUB_PREFIX, LOCAL_PREFIX = 'hf-hub:', 'local-dir:'


def check_model_name(name: str) -> str:
    """``name`` if it is a registered architecture or ``arch.tag``; else a ValueError naming the choices."""
    import timm
    from timm.models import get_arch_name, is_model
    if not isinstance(name, str) or not name:
        raise ValueError(f'a model name is needed, got {name!r}')
    arch = get_arch_name(name)
    if not is_model(arch):
        raise ValueError(f'unknown model {name!r}: sd-zoo models are {", ".join(timm.list_models("sd_*"))}')
    if arch != name:
        tags = timm.list_models(f'{arch}.*', include_tags=True)
        if name not in tags:
            raise ValueError(f'unknown tag in {name!r}: {arch} has {", ".join(tags) or "no tags"}')
    return name


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights in a safetensors file or a timm checkpoint (``weights_only``: nothing unpickled)."""
    import timm
    if not os.path.isfile(path):
        raise ValueError(f'checkpoint {path!r} does not exist')
    if use_ema:
        check_has_ema(path)
    try:
        state_dict = timm.models.load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as e:  # torch.load / safetensors raise many types for a file that is not a checkpoint
        first = str(e).splitlines()[0] if str(e) else ''
        raise ValueError(f'{path!r} is not a timm checkpoint or safetensors file ({type(e).__name__}: '
                         f'{first[:200]})') from e
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f'{path!r} holds no model state_dict')
    return state_dict


EMA_KEYS = ('state_dict_ema', 'model_ema')  # where timm's load_state_dict looks for EMA weights


def check_has_ema(path: str) -> None:
    """timm's load_state_dict(use_ema=True) quietly returns the plain weights of a checkpoint without EMA
    weights (and of any safetensors file): asking for EMA weights that are not there is an error."""
    if path.endswith('.safetensors'):
        raise ValueError(f'{path!r} is a safetensors file of one set of weights: it has no separate EMA weights '
                         f'(drop --use-ema / --ema)')
    from timm.utils import load_checkpoint_metadata
    try:  # weights_only (timm allows its args Namespace), tensors memory-mapped: cheap
        checkpoint = load_checkpoint_metadata(path)
    except Exception:
        return  # not a checkpoint: read_state_dict says so
    if isinstance(checkpoint, dict) and not any(checkpoint.get(k) is not None for k in EMA_KEYS):
        raise ValueError(f'{path!r} has no EMA weights (its run trained without --model-ema): drop --use-ema / '
                         f'--ema to use its weights')


def shape_kwargs_from_weights(arch: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """num_classes and in_chans as the weights have them (the classifier's rows, the first conv's inputs),
    so a checkpoint rebuilds its own model whatever its head or input channels."""
    import timm
    cfg = timm.models.get_pretrained_cfg(arch)
    out = {}
    classifier = state_dict.get(f'{cfg.classifier}.weight') if cfg and cfg.classifier else None
    if classifier is not None:
        out['num_classes'] = int(classifier.shape[0])
    first_conv = state_dict.get(f'{cfg.first_conv}.weight') if cfg and cfg.first_conv else None
    if first_conv is not None and first_conv.dim() == 4:
        out['in_chans'] = int(first_conv.shape[1])
    return out


def load_weights(model: torch.nn.Module, checkpoint: str, use_ema: bool = False) -> None:
    """Load ``checkpoint`` into ``model`` strictly, with a ValueError that says why it does not fit (or why
    it would evaluate to nothing: NaN or infinite weights)."""
    load_state(model, read_state_dict(checkpoint, use_ema=use_ema), checkpoint)


def load_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: str) -> None:
    """:func:`load_weights` of weights already read from ``checkpoint``."""
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f'the weights in {checkpoint!r} hold NaN or infinite values ({bad}): the run diverged '
                         f'before this checkpoint, or the file was altered')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(e)
        detail = detail if len(detail) <= 240 else detail[:240] + ' ...'
        raise ValueError(f'the weights in {checkpoint!r} do not fit {model.pretrained_cfg.get("architecture", "")} '
                         f'with {model.num_classes} classes: {detail} (pass the matching model name)') from e


def load_model(name: str, pretrained: bool = False, num_classes: Optional[int] = None) -> torch.nn.Module:
    """A model in eval mode from a name (with its pretrained weights where asked), ``hf-hub:ORG/NAME`` or
    ``local-dir:PATH``. A training checkpoint's model is its run's: ``sd_zoo.runs.RunFolder.model``."""
    import timm
    if name.startswith((HUB_PREFIX, LOCAL_PREFIX)):
        return load_published(name, num_classes=num_classes).eval()
    check_model_name(name)
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:  # timm: 'No pretrained weights exist for ...'
        if not (pretrained and 'pretrained' in str(e)):
            raise
        raise ValueError(f'{name} has no pretrained weights: sd-zoo ships {", ".join(timm.list_pretrained("sd_*"))}'
                         f' (or give --checkpoint)') from e
    return model.eval()


# ---------------------------------------------------------------------------------------------- Hub / folders


def check_repo_id(repo_id: str, flag: str = '', need_org: bool = False) -> None:
    """A Hub repository id by huggingface_hub's rule (with ``need_org``, ORG/NAME); else a one-line ValueError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        if need_org and '/' not in repo_id:
            raise HFValidationError('no ORG/')
        validate_repo_id(repo_id)
    except HFValidationError as e:
        hint = f' (for the folder, write local-dir:{repo_id})' if os.path.isdir(repo_id) else ''
        raise ValueError(f'{flag + " " if flag else ""}{repo_id!r} is not a Hub repository id ORG/NAME{hint}') from e


def parse_source(source: str) -> Tuple[str, str, Optional[str]]:
    """('hub', repo_id, revision) or ('local', folder, None). ``local-dir:`` names a folder; anything else is
    a Hub repo id, even if a folder of that name exists here; ``ORG/NAME@REVISION`` pins a revision (as in
    timm's ``hf-hub:`` names)."""
    if source.startswith(LOCAL_PREFIX):
        folder = source[len(LOCAL_PREFIX):]
        if not os.path.isdir(folder):
            raise ValueError(f'{source!r}: {folder!r} is not a folder')
        return 'local', folder, None
    repo_id = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    repo_id, _, revision = repo_id.partition('@')
    check_repo_id(repo_id)
    return 'hub', repo_id, revision or None


def _fetch(kind: str, where: str, filename: str, revision: Optional[str]) -> Optional[str]:
    """Local path of ``filename`` in a folder or a Hub repo; None when the repository has no such file."""
    if kind == 'local':
        path = os.path.join(where, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from .network import HubTimeout, bounded_hub
    try:
        with bounded_hub():
            return hf_hub_download(where, filename, revision=revision, library_name='sd-zoo')
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: first (no answer, nothing cached)
        if constants.is_offline_mode():
            raise ValueError(f'{where!r}: {filename} is not in the cache and HF_HUB_OFFLINE is set: download it '
                             f'once online') from e
        raise ValueError(f'{where!r}: the Hub at {constants.ENDPOINT} is unreachable and {filename} is not in the '
                         f'cache (no network, or the Hub is down)') from e
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise ValueError(f'{where!r}: no such Hub repository (or it is private: log in with a token)') from e
    except RevisionNotFoundError as e:
        raise ValueError(f'{where!r}: no revision {revision!r}') from e
    except HfHubHTTPError as e:
        raise ValueError(f'{where!r}: the Hub answered an error ({str(e).splitlines()[0][:160]})') from e
    except HubTimeout as e:
        raise ValueError(f'{where!r}: {e}; {filename} is not in the cache') from e
    except OSError as e:  # a connection dropped mid-download (httpx errors are not OSErrors: below)
        raise ValueError(f'{where!r}: downloading {filename} failed ({type(e).__name__}: {e})') from e
    except Exception as e:
        import httpx2
        if isinstance(e, httpx2.HTTPError):
            raise ValueError(f'{where!r}: downloading {filename} from {constants.ENDPOINT} failed '
                             f'({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""})') from e
        raise


def _holds(kind: str, where: str, filename: str, revision: Optional[str]) -> bool:
    """Whether a folder or Hub repo has ``filename``, without downloading it (for the error message only)."""
    if kind == 'local':
        return os.path.isfile(os.path.join(where, filename))
    from huggingface_hub import HfApi
    from .network import bounded_hub
    try:
        with bounded_hub():
            return HfApi().file_exists(where, filename, revision=revision)
    except Exception:  # offline, or the Hub fails now: the message then just does not list it
        return False


def _read_config(kind: str, where: str, revision: Optional[str]) -> PublishedConfig:
    """config.json, parsed and checked against the schema (sd_zoo.published): data, never instructions."""
    path = _fetch(kind, where, 'config.json', revision)
    if path is None:
        raise ValueError(f'{where!r} has no config.json: it is not a timm model repository')
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's parser goes
        raise ValueError(f'{where!r}: config.json is not JSON ({type(e).__name__}: {str(e)[:160]})') from e
    return check_published_config(config, where)


def _no_constant(name: str):
    raise ValueError(f'{name} is not a JSON number')


def _read_published_weights(kind: str, where: str, revision: Optional[str]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    weights = _fetch(kind, where, WEIGHTS_NAME, revision)
    if weights is None:
        pickled = [n for n in PICKLE_NAMES if _holds(kind, where, n, revision)]
        reason = f'only pickle weights ({", ".join(pickled)}), which sd-zoo does not load' if pickled else \
            f'no {WEIGHTS_NAME}'
        raise ValueError(f'{where!r} has {reason}: publish safetensors weights (sd-zoo publish)')
    try:
        return load_file(weights)
    except Exception as e:  # safetensors raises its own error types for a corrupt or truncated file
        raise ValueError(f'{where!r}: {WEIGHTS_NAME} is corrupt or truncated ({type(e).__name__}: {e}); '
                         f'delete it from the cache (hf cache delete) and download it again') from e


def load_published(source: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                   revision: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """An sd-zoo model with published weights: a Hub repo id (``ORG/NAME`` or ``hf-hub:ORG/NAME``) or a
    folder (``local-dir:PATH``). ``model_name`` and ``num_classes``, when given, must match the weights.

    Why not timm's own ``hf-hub:`` / ``local-dir:`` loader: it builds whatever config.json says (its pretrained_cfg
    may name other weights) and loads weights non-strictly; this one reads config.json as data (sd_zoo.published)
    and the folder's own model.safetensors key by key."""
    import timm
    kind, where, pinned = parse_source(source)
    if pinned and revision and pinned != revision:
        raise ValueError(f'{source!r} pins the revision {pinned!r} but revision={revision!r} was given: give one')
    revision = pinned or revision
    if kind == 'local' and revision:
        raise ValueError(f'{source!r}: revision={revision!r} names a Hub revision; a local folder has none')
    config = _read_config(kind, where, revision)
    arch = config.architecture
    if model_name is not None and timm.models.get_arch_name(model_name) != arch:
        raise ValueError(f'{where!r} holds {arch!r} weights, not {model_name!r}')
    state_dict = _read_published_weights(kind, where, revision)
    # the architecture's own config (no weight source: sd-zoo loads the folder's file itself) with the
    # checked input settings of config.json; pretrained=False, so timm fetches nothing
    pretrained_cfg = dict(timm.models.get_pretrained_cfg(arch).to_dict(), **config.pretrained_cfg,
                          architecture=arch)
    for key in ('url', 'file', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'source', 'label_names',
                'label_descriptions', 'tag'):
        pretrained_cfg.pop(key, None)  # no weight source; the classes and data set are config.json's or none
    pretrained_cfg.update({k: v for k, v in config.pretrained_cfg.items() if k in ('tag', 'label_descriptions')})
    if config.label_names is not None:
        pretrained_cfg['label_names'] = list(config.label_names)
    with torch.device('meta'):  # shapes only: weights that do not fit fail before memory goes to the model
        skeleton = _create(arch, pretrained_cfg, dict(config.model_args, **kwargs), kwargs, where)
    check_published_weights(skeleton, state_dict, where)
    if num_classes is not None and num_classes != skeleton.num_classes:
        raise ValueError(f'{where!r} has {skeleton.num_classes}-class weights, not {num_classes}: load them as they '
                         f'are and call model.reset_classifier({num_classes}) to fine-tune')
    model = _create(arch, pretrained_cfg, dict(config.model_args, **kwargs), kwargs, where)
    model.load_state_dict(state_dict)
    return model.eval()


def _create(arch: str, pretrained_cfg: Dict[str, Any], model_args: Dict[str, Any], caller_kwargs: Dict[str, Any],
            where: str) -> torch.nn.Module:
    """``arch`` with config.json's checked arguments and the caller's; pretrained=False, so timm fetches nothing."""
    import timm
    try:
        return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    except TypeError as e:  # say whose argument it is: the caller's, or config.json's
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad and bad.group(1) in caller_kwargs:
            raise ValueError(f'{arch} does not take the argument {bad.group(1)}={caller_kwargs[bad.group(1)]!r}'
                             ) from e
        raise ValueError(f'{where!r}: config.json\'s model_args do not fit {arch} ({e})') from e
