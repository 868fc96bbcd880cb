"""The layering the README states, read from the code: imports flow one way, commands -> application modules ->
models -> core, and no module imports the package root (it imports what it uses)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'sd_zoo'
LEVEL = {'stochastic_depth': 0, 'models': 1,
         'data': 2, 'engine': 2, 'runs': 2, 'loading': 2, 'published': 2, 'card': 2, 'network': 2, 'cache': 2,
         'hub': 2, 'recipes': 2, 'checkpoints': 2, 'train_args': 2, 'checks': 2,
         'training': 3, 'evaluation': 3, 'publishing': 3, 'bench': 3, 'bench_data': 3, 'cli': 4}


def _internal_imports(path: Path):
    """(line, imported top-level sd_zoo module or '<root>') for every sd_zoo import in the file."""
    here = list(path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = here[:len(here) - node.level + 1] + (node.module.split('.') if node.module else [])
            for name in ([parts[0]] if parts else [a.name for a in node.names]):
                yield node.lineno, name
        elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'sd_zoo':
            yield node.lineno, node.module.split('.')[1] if '.' in node.module else '<root>'
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'sd_zoo':
                    yield node.lineno, alias.name.split('.')[1] if '.' in alias.name else '<root>'


def test_every_module_has_a_level():
    modules = {p.relative_to(PACKAGE).parts[0].removesuffix('.py') for p in PACKAGE.rglob('*.py')} - {'__init__'}
    assert modules == set(LEVEL), 'a new module: give it its level in LEVEL'


def test_imports_flow_one_way_and_never_through_the_package_root():
    wrong = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if path == PACKAGE / '__init__.py':
            continue
        me = path.relative_to(PACKAGE).parts[0].removesuffix('.py')
        for line, target in _internal_imports(path):
            if target == '<root>' or LEVEL[target] > LEVEL[me]:
                wrong.append(f'{path.relative_to(PACKAGE.parent)}:{line} {me} imports {target}')
    assert not wrong, wrong
