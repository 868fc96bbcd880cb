"""A published folder or Hub repository as data: config.json checked against an allow-list schema, and its
weights checked against the model that config builds.

A config.json comes from outside (a download, a folder someone sent), so it may say only what an sd-zoo
model takes: the model arguments of its architecture, each of the right type, and the input settings of
its pretrained config (mean, std, input size, ...). It never names where weights come from (``url``,
``file``, ``hf_hub_id``, ``pretrained``) nor another depth than its architecture's name: sd-zoo loads the
folder's own model.safetensors and nothing else. The weights must then be exactly the model's: every key
(each block's eval scale included), each tensor's shape and dtype, and finite values.
"""
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .models.sd_resnet_cifar import SHORTCUT_TYPES, arch_depth
from .stochastic_depth import GRANULARITIES, RULES, SCALINGS

__all__ = ['PublishedConfig', 'check_published_config', 'check_published_weights', 'check_run_model_args',
           'check_run_inputs']

POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg')


def _int(least: int, most: Optional[int] = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least and (most is None or v <= most)


def _number(low: float, high: float) -> Callable[[Any], bool]:
    """A finite number in [low, high)."""
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and low <= v < high


def _choice(choices) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _list_of(check: Callable[[Any], bool], length: Optional[int] = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and bool(v) and (length is None or len(v) == length) \
        and all(check(x) for x in v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 1000


# Upper bounds: sizes a config.json may ask for before the weights (checked against a model built on the meta
# device) confirm them, so that a hostile file cannot make a model or an input that exhausts memory
MAX_CLASSES, MAX_CHANNELS, MAX_INPUT = 100_000, 4096, 4096
# model_args: what sd_zoo.card.sd_model_args writes, plus the pooling timm's save_for_hf adds
MODEL_ARGS: Dict[str, Callable[[Any], bool]] = dict(
    num_classes=_int(1, MAX_CLASSES), in_chans=_int(1, MAX_CHANNELS), drop_rate=_number(0.0, 1.0), drop_path_rate=_number(0.0, 1.0),
    sd_rule=_choice(RULES), sd_granularity=_choice(GRANULARITIES), sd_scaling=_choice(SCALINGS),
    sd_seed=_int(0), depth=_int(8), shortcut_type=_choice(SHORTCUT_TYPES), global_pool=_choice(POOL_TYPES),
    channels=_list_of(_int(1, MAX_CHANNELS), 3), zero_init_last=lambda v: isinstance(v, bool))
CIFAR_ONLY = ('depth', 'shortcut_type', 'channels')
# pretrained_cfg: the input settings a model is evaluated with, and descriptive text. Where weights come
# from (url, file, hf_hub_id, state_dict, source) is never taken from a file: hf_hub_id, which sd-zoo
# publish writes to describe the repository, is accepted and ignored; the others are errors.
PRETRAINED_CFG: Dict[str, Callable[[Any], bool]] = dict(
    input_size=_list_of(_int(1, MAX_INPUT), 3), fixed_input_size=lambda v: isinstance(v, bool),
    interpolation=_choice(('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming', 'random', '')),
    crop_pct=_number(0.01, 1.0 + 1e-9), crop_mode=_choice(('center', 'squash', 'border')),
    mean=_list_of(_number(-1e3, 1e3)), std=_list_of(_number(1e-6, 1e3)), num_classes=_int(1, MAX_CLASSES),
    # timm's save_for_hf writes null for a model saved at another input size than its architecture's
    pool_size=lambda v: v is None or _list_of(_int(1, MAX_INPUT), 2)(v), first_conv=_choice(('conv1',)), classifier=_choice(('fc',)),
    custom_load=lambda v: v is False, license=_text, paper_name=_text, paper_ids=_text, tag=_text,
    notes=_text, description=_text, origin_url=_text, label_names=_list_of(_text),
    label_descriptions=lambda v: isinstance(v, dict))
IGNORED_CFG = ('hf_hub_id',)
TOP_LEVEL: Dict[str, Callable[[Any], bool]] = dict(
    architecture=_text, num_classes=_int(1, MAX_CLASSES), num_features=_int(1, MAX_CHANNELS * 64),
    global_pool=_choice(POOL_TYPES), label_names=_list_of(_text), label_descriptions=lambda v: isinstance(v, dict), model_args=lambda v: True,
    pretrained_cfg=lambda v: True)


@dataclass(frozen=True)
class PublishedConfig:
    """What a checked config.json says: the architecture, the arguments that build it, and the input
    settings of its pretrained config (no weight source)."""
    architecture: str
    model_args: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]
    label_names: Optional[List[str]] = None


def _checked(section: Dict[str, Any], schema: Dict[str, Callable[[Any], bool]], what: str, where: str,
             ignored=()) -> Dict[str, Any]:
    unknown = sorted(k for k in section if k not in schema and k not in ignored)
    if unknown:
        raise ValueError(f'{where!r}: config.json\'s {what} has keys sd-zoo does not load: {", ".join(unknown)} '
                         f'(a published config says only what an sd-zoo model takes; weights come from the '
                         f'folder\'s own model.safetensors)')
    for key, value in section.items():
        if key in schema and not schema[key](value):
            raise ValueError(f'{where!r}: config.json\'s {what}.{key} is not a valid value: {value!r:.120}')
    return {k: v for k, v in section.items() if k in schema}


def check_published_config(config: Any, where: str) -> PublishedConfig:
    """``config`` (a parsed config.json) checked against the schema: a ValueError names the first problem."""
    import timm
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise ValueError(f'{where!r}: config.json is not a timm model config (no "architecture")')
    for key in ('model_args', 'pretrained_cfg'):
        if key in config and not isinstance(config[key], dict):  # null, [] or "" too: not a quiet default
            raise ValueError(f'{where!r}: config.json\'s {key} is not a mapping')
    _checked(config, TOP_LEVEL, 'top level', where)
    arch = config['architecture']
    if timm.models.get_arch_name(arch) != arch:
        raise ValueError(f'{where!r}: config.json names the architecture {arch!r} with a tag: it names the '
                         f'architecture alone, and pretrained_cfg.tag the tag')
    if not timm.models.is_model(arch) or not arch.startswith('sd_'):
        why = 'is not an sd-zoo model' if timm.models.is_model(arch) else 'no installed package registers'
        why = 'which ' + why if why.startswith('no') else why
        raise ValueError(f'{where!r}: config.json names the architecture {arch!r}, {why} (sd-zoo has '
                         f'{", ".join(timm.list_models("sd_*"))})')
    model_args = _checked(config.get('model_args') or {}, MODEL_ARGS, 'model_args', where)
    depth = arch_depth(arch)
    if depth is None and any(k in model_args for k in CIFAR_ONLY):
        raise ValueError(f'{where!r}: config.json\'s model_args give {", ".join(k for k in CIFAR_ONLY if k in model_args)}'
                         f', which only the CIFAR models take, to {arch}')
    if depth is not None and model_args.get('depth', depth) != depth:
        raise ValueError(f'{where!r}: config.json\'s model_args.depth {model_args["depth"]} contradicts its '
                         f'architecture {arch} (depth {depth})')
    cfg = _checked(config.get('pretrained_cfg') or {}, PRETRAINED_CFG, 'pretrained_cfg', where, IGNORED_CFG)
    in_chans = model_args.get('in_chans', 3)
    if 'input_size' in cfg and cfg['input_size'][0] != in_chans:
        raise ValueError(f'{where!r}: config.json\'s pretrained_cfg.input_size has {cfg["input_size"][0]} '
                         f'channels, the model {in_chans}')
    for key in ('mean', 'std'):
        if key in cfg and len(cfg[key]) not in (1, in_chans):
            raise ValueError(f'{where!r}: config.json\'s pretrained_cfg.{key} has {len(cfg[key])} values for '
                             f'{in_chans} input channels')
    classes = [n for n in (config.get('num_classes'), model_args.get('num_classes'), cfg.get('num_classes'))
               if n is not None]
    labels = config.get('label_names', cfg.get('label_names'))
    for names in (config.get('label_names'), cfg.get('label_names')):
        if names is not None:
            classes.append(len(names))
            repeated = sorted(n for n, count in Counter(names).items() if count > 1)
            if repeated:  # a class name maps to one index: a repeated one would mislabel a class
                raise ValueError(f'{where!r}: config.json\'s label_names repeat {", ".join(map(repr, repeated[:3]))}')
    if len(set(classes)) > 1:
        raise ValueError(f'{where!r}: config.json gives different class counts ({", ".join(map(str, classes))}) '
                         f'in num_classes, model_args, pretrained_cfg and label_names')
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # timm's cfgs hold tuples
    return PublishedConfig(architecture=arch, model_args=model_args, pretrained_cfg=cfg, label_names=labels)


# timm.create_model's own keywords: where weights come from and how the model is built, never a run's to say
CREATE_MODEL_KEYWORDS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir',
                         'scriptable', 'exportable', 'no_jit')


def check_run_model_args(kwargs: Dict[str, Any], arch: str) -> None:
    """A run folder's model arguments (args.yaml's --drop, --drop-path, --model-kwargs) when its model is rebuilt
    from them: for an sd-zoo architecture, the allow-list of a published config's model_args; for another timm
    model, plain values of its own keywords (never a weight source or one of create_model's keywords)."""
    if arch.startswith('sd_'):
        unknown = sorted(k for k in kwargs if k not in MODEL_ARGS)
        if unknown:
            raise ValueError(f'model arguments an {arch} run is not rebuilt with: {", ".join(unknown)} (it takes '
                             f'{", ".join(MODEL_ARGS)})')
        bad = next((k for k, v in kwargs.items() if not MODEL_ARGS[k](v)), None)
    else:
        bad = next((k for k, v in kwargs.items() if k in CREATE_MODEL_KEYWORDS or
                    not isinstance(v, (bool, int, float, str, type(None)))), None)
    if bad is not None:
        raise ValueError(f'model argument {bad}={kwargs[bad]!r:.80} is not one a run is rebuilt with')


# a run folder's input settings and model shape in args.yaml (timm's train.py flags), as a published config's
RUN_INPUTS: Dict[str, Callable[[Any], bool]] = dict(
    {k: PRETRAINED_CFG[k] for k in ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')},
    img_size=_int(1, MAX_INPUT), gp=lambda v: isinstance(v, str) and len(v) <= 20,
    num_classes=MODEL_ARGS['num_classes'], in_chans=MODEL_ARGS['in_chans'])


def check_run_inputs(values: Dict[str, Any]) -> None:
    """args.yaml's input settings and model shape where a run is rebuilt from it: each of the published config's
    types and ranges (a crop_pct of 0 or a text mean is this one-line error, not a crash in a transform)."""
    for key, check in RUN_INPUTS.items():
        value = values.get(key)
        if value is not None and not check(list(value) if isinstance(value, tuple) else value):
            raise ValueError(f'{key} {value!r:.80} is not a valid value')
    in_chans, size = values.get('in_chans') or 3, values.get('input_size')
    for key in ('mean', 'std'):
        if values.get(key) is not None and len(values[key]) not in (1, in_chans):
            raise ValueError(f'{key} has {len(values[key])} values for {in_chans} input channels')
    if size is not None and size[0] != in_chans:
        raise ValueError(f'input_size has {size[0]} channels, the model {in_chans}')


def check_published_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], where: str) -> None:
    """The weights are exactly ``model``'s: the same keys (every eval scale), shapes and dtypes (nothing is
    cast), and finite values. A published folder whose weights say less is an error, not a quiet default."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        detail = '; '.join(f'{what} {", ".join(keys[:4])}{" ..." if len(keys) > 4 else ""}'
                           for what, keys in (('missing', missing), ('unexpected', unexpected)) if keys)
        raise ValueError(f'{where!r}: the weights do not fit {model.pretrained_cfg.get("architecture")} built '
                         f'from config.json: {detail}')
    for key, want in expected.items():
        have = state_dict[key]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise ValueError(f'{where!r}: weight {key} is {have.dtype} {tuple(have.shape)}, the model has '
                             f'{want.dtype} {tuple(want.shape)}')
        if have.is_floating_point() and not torch.isfinite(have).all():
            raise ValueError(f'{where!r}: weight {key} holds NaN or infinite values')
