"""torch.hub entry points for sd-zoo: ``torch.hub.load('OWNER/sd-zoo', 'sd_resnet110')``.

Every model that ``import sd_zoo`` registers in timm is an entry point with the same name; keyword
arguments go to ``timm.create_model`` (``drop_path_rate``, ``sd_rule``, ``num_classes``, ...).
"""
dependencies = ['torch', 'timm']

import timm as _timm

import sd_zoo as _sd_zoo


def _make_entrypoint(model_name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _timm.create_model(model_name, pretrained=pretrained, **kwargs)

    model_fn = _timm.models.model_entrypoint(model_name)
    entrypoint.__name__ = entrypoint.__qualname__ = model_name
    entrypoint.__doc__ = (
        f'{(model_fn.__doc__ or model_name).strip()}\n\n'
        f'Same as ``timm.create_model({model_name!r}, pretrained=pretrained, **kwargs)`` after ``import sd_zoo``.\n'
        f'Pretrained tags: {", ".join(_timm.models.get_arch_pretrained_cfgs(model_name)) or "none"}.')
    return entrypoint


for _name in _timm.list_models(module=['sd_resnet_cifar']):
    globals()[_name] = _make_entrypoint(_name)
