"""torch.hub entry points for sd-zoo: ``torch.hub.load('OWNER/sd-zoo', 'sd_resnet110')``.

Every model that ``import sd_zoo`` registers in timm is an entry point with the same name; keyword
arguments go to ``timm.create_model`` (``drop_path_rate``, ``sd_rule``, ``num_classes``, ...).
``pretrained=True`` loads the weights that ship in the sd_zoo package where there are some (offline;
``sd_zoo.SHIPPED_WEIGHTS``), else published safetensors weights from the Hugging Face Hub
(``hub_id='ORG/NAME'``, or the config's own hub id) through huggingface_hub: cached, verified, offline
mode honoured. ``hub_id`` always means the Hub; a folder is ``hub_id='local-dir:PATH'``.
"""
dependencies = ['torch', 'timm']

import timm as _timm

import sd_zoo as _sd_zoo  # noqa: F401  registers the sd models
from sd_zoo.hub import load_published as _load_published


def _create(model_name: str, **kwargs):
    """timm.create_model, with a keyword the model does not take as a ValueError that names it."""
    try:
        return _timm.create_model(model_name, **kwargs)
    except TypeError as e:
        if 'keyword argument' not in str(e):
            raise
        unknown = str(e).split('argument', 1)[-1].strip()
        raise ValueError(f'{model_name} does not take {unknown}: its arguments are timm.create_model\'s and the '
                         f'model\'s (help: torch.hub.help(..., {model_name!r}))') from e


def _make_entrypoint(model_name: str):
    def entrypoint(pretrained: bool = False, hub_id: str = None, **kwargs):
        if hub_id is not None and not pretrained:
            raise ValueError(f'hub_id={hub_id!r} names weights to load: add pretrained=True (without it the model '
                             f'is randomly initialised)')
        if not pretrained:
            return _create(model_name, **kwargs)
        cfg = _timm.models.get_pretrained_cfg(model_name)
        if hub_id is None and cfg.file:
            # weights shipped in the sd_zoo package: timm's own loader, offline; num_classes re-heads it
            return _create(model_name, pretrained=True, **kwargs)
        hub_id = hub_id or cfg.hf_hub_id
        if not hub_id:
            raise ValueError(f'{model_name} has no published weights yet: pass hub_id="ORG/NAME" of a repository '
                             f'made with sd-zoo publish')
        num_classes = kwargs.pop('num_classes', None)
        model = _load_published(hub_id, model_name=model_name, **kwargs)
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)  # a new head, as timm and the shipped weights give
        return model.train()  # as timm.create_model returns it

    model_fn = _timm.models.model_entrypoint(model_name)
    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__doc__ = (
        f'{(model_fn.__doc__ or model_name).strip()}\n\n'
        f'pretrained=False: ``timm.create_model({model_name!r}, **kwargs)`` after ``import sd_zoo``.\n'
        f'pretrained=True: the weights shipped in sd_zoo, or the Hub repo ``hub_id`` (ORG/NAME).\n'
        f'Shipped weights: {", ".join(_timm.list_pretrained(model_name + ".*")) or "none"}; '
        f'dataset tags: {", ".join(_timm.models.get_arch_pretrained_cfgs(model_name))}.')
    return entrypoint


for _name in _timm.list_models('sd_*'):
    globals()[_name] = _make_entrypoint(_name)
