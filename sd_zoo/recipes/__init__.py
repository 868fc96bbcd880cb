"""Training recipes that ship with sd-zoo: timm train.py ``--config`` files, addressable by name.

``sd-zoo train --config cifar10_resnet110_sd`` (a path still works), ``sd-zoo recipes`` lists them with the
paper setting each one reproduces (its first comment line), ``sd-zoo recipes --path NAME`` prints the file for
timm's own ``train.py --config``.
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))


def list_recipes() -> Dict[str, str]:
    """Recipe name -> its one-line description."""
    out = {}
    for name in sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith('.yaml')):
        with open(os.path.join(RECIPES_DIR, f'{name}.yaml')) as f:
            first = f.readline().strip()
        out[name] = first.lstrip('# ').strip()
    return out


def resolve_recipe(name_or_path: str) -> str:
    """The YAML file of a recipe name (``cifar10_resnet110_sd``) or a path; anything else is an error. A bare
    recipe name that is also a file here is ambiguous, never silently the file: write ``./NAME`` for it."""
    name = name_or_path[:-5] if name_or_path.endswith('.yaml') else name_or_path
    path = os.path.join(RECIPES_DIR, f'{os.path.basename(name)}.yaml')
    is_recipe = os.path.isfile(path) and os.path.basename(name) == name
    if is_recipe and os.path.isfile(name_or_path) and os.path.realpath(name_or_path) != os.path.realpath(path):
        raise ValueError(f'config {name_or_path!r} is both a recipe name and a file here: write ./{name_or_path} '
                         f'for the file, or run elsewhere for the recipe')
    if is_recipe:
        return path
    if os.path.isfile(name_or_path):
        return name_or_path
    raise ValueError(f'config {name_or_path!r} is neither a file nor a recipe name (recipes: '
                     f'{", ".join(list_recipes())}; see sd-zoo recipes)')


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(prog='sd-zoo recipes', description='The training recipes that ship with sd-zoo.')
    p.add_argument('--path', metavar='NAME', default=None, help='print the YAML file of recipe NAME')
    args = p.parse_args(argv)
    if args.path:
        path = resolve_recipe(args.path)
        print(path)
        return [path]
    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, desc in recipes.items():
        print(f'{name:<{width}}  {desc}')
    return list(recipes)
