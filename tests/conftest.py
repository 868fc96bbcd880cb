import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hubconf.py and an uninstalled checkout
# decoded data sets (the in-memory loader's cache) go under the checkout's git-ignored .cache, not ~/.cache
os.environ.setdefault('SD_ZOO_CACHE', str(ROOT / '.cache' / 'sd_zoo'))

import sd_zoo  # noqa: E402,F401  registers the models


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SHARED_CIFAR10 = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
DATA_CACHE = ROOT / '.cache' / 'data'


def extract_cifar10() -> Path:
    """The shared CIFAR-10 JPEG archive, unpacked once into .cache/data (git-ignored)."""
    import tarfile
    target = DATA_CACHE / 'cifar10'
    done = DATA_CACHE / '.cifar10-extracted'
    if not done.exists():
        DATA_CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR10) as tar:
            tar.extractall(DATA_CACHE, filter='data')
        done.touch()
    return target


@pytest.fixture(scope='session')
def cifar10_dir() -> Path:
    if not SHARED_CIFAR10.exists():
        pytest.skip(f'the shared CIFAR-10 archive is absent ({SHARED_CIFAR10}): a checkout without ../shared/data')
    return extract_cifar10()


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """huggingface_hub pointed at a loopback endpoint in this process, with its own empty cache."""
    from huggingface_hub import constants

    def point(endpoint: str, offline: bool = False):
        # what HF_ENDPOINT sets when huggingface_hub is imported
        monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            endpoint + '/{repo_id}/resolve/{revision}/{filename}')
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)
        monkeypatch.setenv('SD_ZOO_HUB_TIMEOUT', '2')
        monkeypatch.setenv('HF_HUB_DISABLE_XET', '1')
        monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True, raising=False)
    return point


def make_image_folder(root: Path, classes=10, splits=(('train', 4), ('test', 2)), size: int = 32, seed: int = 0,
                      suffix: str = '.png', split_sizes=None, compress_level=None) -> Path:
    """An image folder of random RGB images: ``root/SPLIT/CLASS/i.png``. ``classes`` is a count (class0,
    class1, ...) or the class names; ``split_sizes`` gives a split other images' size."""
    from PIL import Image
    names = [f'class{c}' for c in range(classes)] if isinstance(classes, int) else list(classes)
    g = torch.Generator().manual_seed(seed)
    for split, n in splits:
        px = (split_sizes or {}).get(split, size)
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (torch.rand(px, px, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / name / f'{i}{suffix}',
                                          **({} if compress_level is None else dict(compress_level=compress_level)))
    return root


@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory) -> Path:
    """A 10-class image folder of random 32x32 images (train 4 / test 2 per class)."""
    return make_image_folder(tmp_path_factory.mktemp('tiny'))


def check_checkpointing_recomputes_the_same_gates(model: torch.nn.Module, x: torch.Tensor, steps: int = 3) -> list:
    """``model`` (training) against a gradient-checkpointed copy: the same gates and kept samples, outputs and
    gradients, step after step; recomputation in backward draws nothing new. Returns each step's draws."""
    import copy
    from sd_zoo import stochastic_blocks

    def draws(m):
        return [(bool(b.last_gate), None if b.last_keep is None else b.last_keep.tolist())
                for b in stochastic_blocks(m)]
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    seen = []
    for _ in range(steps):
        model.zero_grad()
        ckpt.zero_grad()
        out, out_ckpt = model(x), ckpt(x)
        seen.append(draws(model))
        assert seen[-1] == draws(ckpt)
        torch.testing.assert_close(out_ckpt, out)
        out.square().mean().backward()
        out_ckpt.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert draws(ckpt) == seen[-1]  # recomputation in backward drew no new gates or masks
    return seen
