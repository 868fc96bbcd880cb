"""The data path: splits read safely, the in-memory loader (decode once, cache, augment on the device)
against timm's PIL path, sharding and resume."""
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from conftest import make_image_folder
from sd_zoo import data as sd_data
from sd_zoo.data import Augmentation, DataSource, TensorLoader, build_eval_loader, build_loaders, decode_split

CIFAR_CFG = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.4914, 0.4822, 0.4465),
                 std=(0.247, 0.2435, 0.2616), crop_pct=1.0, crop_mode='center')


def _image_folder(root: Path, splits=('train', 'test'), classes=('cat', 'dog', 'frog'), per_class=4, size=8):
    return make_image_folder(root, classes=classes, splits=[(s, per_class) for s in splits], size=size)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache' / 'decoded'


def test_decode_matches_timm_reader_and_is_cached(tmp_path, cache, monkeypatch):
    root = _image_folder(tmp_path / 'data')
    source = DataSource(root=str(root))
    decoded = decode_split(source, 'train')
    ds = sd_data.read_split(source, 'train')
    assert decoded.images.shape == (12, 3, 8, 8) and decoded.images.dtype == torch.uint8
    assert decoded.classes == ['cat', 'dog', 'frog']
    for i in range(len(ds)):  # same order, pixels and labels as timm's ImageDataset
        img, label = ds[i]
        assert torch.equal(decoded.images[i], torch.from_numpy(np.array(img)).permute(2, 0, 1))
        assert decoded.labels[i].item() == label
    files = list(cache.glob('*.safetensors'))
    assert len(files) == 1

    def no_decoding(*a, **k):
        raise AssertionError('decoded again although the folder did not change')
    monkeypatch.setattr(sd_data, '_decode_folder', no_decoding)
    again = decode_split(source, 'train')
    assert torch.equal(again.images, decoded.images) and torch.equal(again.labels, decoded.labels)
    monkeypatch.undo()
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))

    # a changed file is noticed: new key, decoded again, new pixels
    changed = root / 'train' / 'dog' / '0.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 10 ** 18))
    fresh = decode_split(source, 'train')
    assert len(list(cache.glob('*.safetensors'))) == 2
    idx = [i for i, (p, _) in enumerate(ds.reader.samples) if p.endswith(os.path.join('dog', '0.png'))][0]
    assert fresh.images[idx].sum() == 0 and not torch.equal(fresh.images, decoded.images)
    # another Pillow may decode JPEGs to other pixels: another key
    import PIL
    key = sd_data.folder_cache_key(str(root / 'train'))
    monkeypatch.setattr(PIL, '__version__', PIL.__version__ + '.other')
    assert sd_data.folder_cache_key(str(root / 'train')) != key
    monkeypatch.undo()
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    # a damaged cache file is decoded again, not trusted
    for f in cache.glob('*.safetensors'):
        f.write_bytes(b'garbage')
    assert torch.equal(decode_split(source, 'train').images, fresh.images)


def test_folder_errors(tmp_path, cache):
    root = _image_folder(tmp_path / 'data')
    source = DataSource(root=str(root))
    with pytest.raises(ValueError, match=r"split 'validation' not found.*its folders: test, train"):
        sd_data.read_split(source, 'validation')
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / 'train' / 'cat' / 'odd.png')
    with pytest.raises(ValueError, match='different sizes.*--loader timm'):
        decode_split(source, 'train')
    with pytest.raises(ValueError, match='over the in-memory limit'):
        decode_split(source, 'test', max_bytes=100)
    with pytest.raises(ValueError, match='not a folder'):
        DataSource(root=str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='unsupported dataset'):
        DataSource(dataset='torch/imagenet')
    with pytest.raises(ValueError, match="train and test, not 'valid'"):
        sd_data.read_split(DataSource(dataset='torch/cifar10', root=str(tmp_path)), 'valid')
    # timm reads 'validation' of a torchvision data set as its test split: here it is an error, so a run never
    # chooses its best epoch on test images unless it says --val-split test
    with pytest.raises(ValueError, match="train and test, not 'validation'.*--val-holdout"):
        sd_data.read_split(DataSource(dataset='torch/cifar10', root=str(tmp_path)), 'validation')
    # images lying in the split folder would be a class '' with label 0, shifting every other label
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'test' / 'loose.png')
    with pytest.raises(ValueError, match="directly in the split folder.*'loose.png'"):
        sd_data.read_split(source, 'test')


def test_auto_loader_falls_back_to_timm_for_images_it_cannot_hold(tmp_path, cache):
    """Images of several sizes, or of another size than the model's: --loader auto evaluates them with
    timm's loader (which resizes), --loader memory says to use it."""
    root = _image_folder(tmp_path / 'data', size=10)
    Image.fromarray(np.zeros((12, 9, 3), np.uint8)).save(root / 'test' / 'cat' / 'odd.png')
    cfg = dict(CIFAR_CFG, input_size=(3, 8, 8))
    source = DataSource(root=str(root))
    loader, n = build_eval_loader(source, 'test', data_config=cfg, batch_size=4, loader='auto', workers=0)
    assert n == 13 and not isinstance(loader, TensorLoader)
    assert next(iter(loader))[0].shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match='the images are 10x10 but the model takes 8x8.*--loader timm'):
        build_eval_loader(source, 'test', data_config=cfg, batch_size=4, loader='memory', workers=0)
    loaders = build_loaders(source, data_config=cfg, train_split='train', val_split=None, test_split=None,
                            batch_size=4, eval_batch_size=4, aug=Augmentation(cifar_aug=True), loader='auto',
                            workers=0)
    assert loaders.kind == 'timm' and next(iter(loaders.train))[0].shape[-2:] == (8, 8)
    # images of one size that is not the model's: refused from the first image's header, nothing decoded or cached
    uniform = DataSource(root=str(_image_folder(tmp_path / 'uniform', size=10)))
    loader, n = build_eval_loader(uniform, 'test', data_config=cfg, batch_size=4, loader='auto', workers=0)
    assert n == 12 and not isinstance(loader, TensorLoader) and not list(cache.glob('*.safetensors'))
    # validate's default split: an image folder's validation, a torchvision data set's test (it has no other)
    import sd_zoo
    with pytest.raises(ValueError, match="torch/cifar10 .*split 'test'"):
        sd_zoo.validate('sd_resnet20', pretrained=True, dataset='torch/cifar10', data_dir=str(tmp_path / 'none'),
                        quiet=True)


def test_an_unwritable_cache_costs_a_decode_not_the_run(tmp_path, monkeypatch, caplog):
    root = _image_folder(tmp_path / 'data')
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the cache folder would be')
    monkeypatch.setenv('SD_ZOO_CACHE', str(blocker))
    decoded = decode_split(DataSource(root=str(root)), 'train')
    assert decoded.images.shape == (12, 3, 8, 8)
    assert 'could not cache the decoded images' in caplog.text and blocker.read_text().startswith('a file')


@pytest.mark.parametrize('loader', ['memory', 'timm'])
def test_split_with_other_classes_is_an_error(tmp_path, cache, loader):
    root = _image_folder(tmp_path / 'data', splits=('train',))
    _image_folder(root, splits=('test',), classes=('cat', 'dog'))
    cfg = dict(CIFAR_CFG, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"classes of split 'test' differ.*missing \['frog'\]"):
        build_loaders(DataSource(root=str(root)), data_config=cfg, train_split='train', val_split='test',
                      test_split=None, batch_size=4, eval_batch_size=4, aug=Augmentation(cifar_aug=True),
                      loader=loader, workers=0)


def test_crop_and_flip_is_torchvision_pad_crop_flip():
    import torchvision.transforms.functional as TF
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    out = sd_data.crop_and_flip(images, offsets, flips, pad=4)
    for i in range(16):
        dy, dx = offsets[i].tolist()
        ref = TF.pad(images[i], [4])[:, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)


def _loader(decoded, **kw):
    kw = dict(dict(batch_size=8, mean=CIFAR_CFG['mean'], std=CIFAR_CFG['std'], device=torch.device('cpu'),
                   training=True, seed=3), **kw)
    return TensorLoader(decoded, **kw)


def _fake(n=40):
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return sd_data.DecodedImages(images, torch.arange(n), [str(i) for i in range(n)])


def test_tensor_loader_epochs_shards_and_resume():
    data = _fake(41)
    a, b = _loader(data), _loader(data)
    a.set_epoch(5)
    b.set_epoch(5)
    batches = list(a)
    assert len(batches) == len(a) == 5 and all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    for (xa, ya), (xb, yb) in zip(batches, b):  # the same (seed, epoch): the same batches, so resume is exact
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(6)
    assert not torch.equal(torch.cat([y for _, y in b]), torch.cat([y for _, y in batches]))
    labels = torch.cat([y for _, y in batches])
    assert len(set(labels.tolist())) == 40  # a permutation: no image twice in an epoch
    # two ranks: disjoint shards of the same permutation, like DistributedSampler(drop_last=True)
    shards = []
    for rank in (0, 1):
        r = _loader(data, rank=rank, world_size=2, batch_size=4)
        r.set_epoch(5)
        shards.append(torch.cat([y for _, y in r]))
        assert len(r) == 5
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_tensor_loader_augments_each_sample_independently():
    data = _fake(64)
    loader = _loader(data, batch_size=64)
    x, y = next(iter(loader))
    found = []
    for i in range(64):  # which (dy, dx, flip) produced sample i
        orig = data.images[y[i]:y[i] + 1]
        for dy in range(9):
            for dx in range(9):
                for flip in (False, True):
                    cand = sd_data.crop_and_flip(orig, torch.tensor([[dy, dx]]), torch.tensor([flip]), 4)
                    if torch.equal(loader.normalize(cand)[0], x[i]):
                        found.append((dy, dx, flip))
        assert len(found) == i + 1, f'sample {i} is no pad-crop-flip of its image'
    assert len(set(found)) > 30  # per sample, not one draw for the whole batch
    assert 16 < sum(f for _, _, f in found) < 48


def test_eval_loader_equals_timm_transform(cifar10_dir, cache):
    source = DataSource(root=str(cifar10_dir))
    mem, n = build_eval_loader(source, 'test', data_config=CIFAR_CFG, batch_size=100, loader='memory', subset=300,
                               seed=7, workers=2)
    pil, n2 = build_eval_loader(source, 'test', data_config=CIFAR_CFG, batch_size=100, loader='timm', subset=300,
                                seed=7, workers=0)
    assert n == n2 == 300
    for (xm, ym), (xp, yp) in zip(mem, pil):
        assert torch.equal(ym, yp) and torch.equal(xm, xp)  # bit-identical inputs


def test_every_pixel_value_normalizes_as_torchvision_does():
    """The in-memory loader against ToTensor + Normalize, for all 256 values of each channel: its CPU path and
    the lookup table it uses on other devices."""
    from torchvision.transforms import functional as TF
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16)
    images = sd_data.DecodedImages(images=values.unsqueeze(0).contiguous(), labels=torch.zeros(1, dtype=torch.long),
                                      classes=['a'])
    loader = sd_data.TensorLoader(images, batch_size=1, mean=mean, std=std, device=torch.device('cpu'),
                                  training=False)
    (x, _), = list(loader)
    expected = TF.normalize(TF.to_tensor(values.permute(1, 2, 0).numpy()), mean, std)
    assert torch.equal(x[0], expected)
    # the lookup that GPUs use (no GPU here: the table and its indexing, checked on the CPU)
    assert torch.equal(sd_data.lookup_normalized(loader.table, images.images)[0], expected)


@pytest.mark.slow
def test_validate_same_results_on_both_loaders(cifar10_dir, cache):
    import sd_zoo
    kw = dict(pretrained=True, data_dir=str(cifar10_dir), split='test', subset=1000, workers=0, quiet=True)
    mem = sd_zoo.validate('sd_resnet20.cifar10', loader='memory', **kw)
    pil = sd_zoo.validate('sd_resnet20.cifar10', loader='timm', **kw)
    for key in ('images', 'top1', 'top5', 'loss'):
        assert mem[key] == pil[key], key


def test_holdout_is_disjoint_and_sized():
    train_idx, val_idx = sd_data._split_parts(1000, val_holdout=100, train_subset=0, val_subset=0, seed=4)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert not set(val_idx) & set(train_idx) and set(val_idx) | set(train_idx) == set(range(1000))
    sub, val = sd_data._split_parts(1000, val_holdout=100, train_subset=50, val_subset=20, seed=4)
    assert len(sub) == 50 and set(sub) <= set(train_idx) and val == val_idx[:20]
    with pytest.raises(ValueError, match='--val-holdout 1000 must be between 1 and 999'):
        sd_data._split_parts(1000, val_holdout=1000, train_subset=0, val_subset=0, seed=4)


@pytest.mark.parametrize('loader', ['memory', 'timm'])
def test_holdout_is_drawn_from_every_class(tmp_path, cache, loader):
    """Files come class by class: a holdout taken in file order would remove whole classes from training."""
    root = _image_folder(tmp_path / 'data', splits=('train',), classes=tuple(f'c{i}' for i in range(6)),
                         per_class=10)
    loaders = build_loaders(DataSource(root=str(root)), data_config=dict(CIFAR_CFG, input_size=(3, 8, 8)),
                            train_split='train', val_split=None, test_split=None, batch_size=4, eval_batch_size=4,
                            aug=Augmentation(cifar_aug=True), loader=loader, val_holdout=12, workers=0, seed=1)
    held_out = torch.cat([y for _, y in loaders.val])
    trained = torch.cat([y for _, y in loaders.train])
    assert len(held_out) == 12 and len(set(held_out.tolist())) >= 4, held_out.tolist()
    assert set(trained.tolist()) == set(range(6))


def test_loader_choice():
    assert sd_data.choose_loader('auto', data_config=CIFAR_CFG, aug=Augmentation(cifar_aug=True)) == 'memory'
    assert sd_data.choose_loader('auto', data_config=CIFAR_CFG, aug=Augmentation()) == 'timm'
    assert sd_data.choose_loader('timm', data_config=CIFAR_CFG, aug=Augmentation(cifar_aug=True)) == 'timm'
    with pytest.raises(ValueError, match='RandomResizedCrop.*--loader timm'):
        sd_data.choose_loader('memory', data_config=CIFAR_CFG, aug=Augmentation())
    imagenet = dict(CIFAR_CFG, input_size=(3, 224, 224), crop_pct=0.875)
    with pytest.raises(ValueError, match='eval transform resizes'):
        sd_data.choose_loader('memory', data_config=imagenet, aug=Augmentation(no_aug=True))

    # a timm ViT at 32 px: its config's crop_pct 0.9 would resize the images; --crop-pct 1 evaluates them as they are
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=1)
    for crop_pct, loader in ((None, 'timm'), (1.0, 'memory')):
        cfg = sd_data.resolve_data_config(vit, dict(img_size=32, crop_pct=crop_pct))
        assert sd_data.choose_loader('auto', data_config=cfg, aug=Augmentation(cifar_aug=True)) == loader


@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--mixup', '0.5', '--model-kwargs', 'sd_granularity=sample']],
                         ids=['batch_gates', 'mixup_and_sample_gates'])
def test_resume_continues_the_exact_batch_sequence(tmp_path, cache, extra):
    """Two epochs in one go, or one epoch and a --resume for the second: the same weights, bit for bit (the
    in-memory loader's order and augmentation come from (seed, epoch); the gates from (seed, block, step); mixup
    and per-sample masks from torch's and numpy's generators, seeded from (seed, epoch) at each epoch)."""
    import timm
    from sd_zoo.cli import main
    root = _image_folder(tmp_path / 'data', classes=tuple(f'c{i}' for i in range(10)), per_class=5, size=32)
    common = ['--data-dir', str(root), '--model', 'sd_resnet20', '--cifar-aug', '--loader', 'memory',
              '--train-split', 'train', '--val-split', 'test', '-b', '8', '-j', '0', '--no-progress',
              '--sched', 'multistep', '--decay-milestones', '100', '--lr', '0.05', '--seed', '3',
              '--output', str(tmp_path / 'runs'), *extra]
    assert main(['train', *common, '--epochs', '2', '--experiment', 'straight']) == 0
    assert main(['train', *common, '--epochs', '1', '--experiment', 'split']) == 0
    split = tmp_path / 'runs' / 'split'
    assert main(['train', *[a for a in common if a not in ('--output', str(tmp_path / 'runs'))], '--epochs', '2',
                 '--resume', str(split / 'last.pth.tar')]) == 0
    a = timm.models.load_state_dict(str(tmp_path / 'runs' / 'straight' / 'last.pth.tar'))
    b = timm.models.load_state_dict(str(split / 'last.pth.tar'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_epoch = timm.models.load_state_dict(str(split / 'checkpoint-0.pth.tar'))
    assert not torch.equal(one_epoch['fc.weight'], b['fc.weight'])  # the second epoch did train
    # the gates drew from --seed, recorded, and the rebuilt model has that seed
    from sd_zoo.runs import RunFolder
    from sd_zoo.stochastic_depth import stochastic_blocks
    assert yaml.safe_load((split / 'args.yaml').read_text())['gate_seed'] == 3
    assert {b.gate_seed for b in stochastic_blocks(RunFolder.open(str(split), 'last').model())} == {3}


def test_cache_command_lists_prunes_stale_entries_and_keeps_other_files(tmp_path, cache, capsys):
    from sd_zoo.cli import main
    root = _image_folder(tmp_path / 'data')
    source = DataSource(root=str(root))
    decode_split(source, 'train')
    decode_split(source, 'test')
    assert main(['cache']) == 0
    listing = capsys.readouterr().out
    assert '2 entries' in listing and listing.count('(current)') == 2 and str(root / 'train') in listing

    changed = root / 'train' / 'cat' / '1.png'  # the train split changes: its old entry is stale
    os.utime(changed, ns=(1, 10 ** 18))
    old_train = {p.name for p in cache.glob('*.safetensors')}
    decode_split(source, 'train')
    new_train = {p.name for p in cache.glob('*.safetensors')} - old_train
    (root / 'test' / 'frog' / '0.png').unlink()  # the test split changes too, and is not decoded again
    user_file = cache / 'notes.txt'
    user_file.write_text('mine')
    dead_writer = cache / f'{"0" * 32}.safetensors.12345.tmp'
    dead_writer.write_bytes(b'partial')
    os.utime(dead_writer, (0, 0))  # untouched for decades: its writer is gone
    live_writer = cache / f'{"1" * 32}.safetensors.12346.tmp'
    live_writer.write_bytes(b'partial')
    from safetensors.torch import save_file
    foreign = cache / f'{"2" * 32}.safetensors'  # a safetensors file without the cache's metadata
    save_file({'w': torch.zeros(1)}, str(foreign))
    (cache / f'{"3" * 32}.safetensors').symlink_to(tmp_path / 'nowhere')  # dangling
    unreadable = cache / f'{"4" * 32}.safetensors'
    unreadable.write_bytes(b'not safetensors')  # nothing shows it is the cache's: kept
    assert main(['cache']) == 0
    listing = capsys.readouterr().out
    assert '3 entries' in listing and listing.count('(current)') == 1 and listing.count('stale: folder') == 2

    assert main(['cache', '--prune']) == 0
    assert 'removed 3 file(s)' in capsys.readouterr().out
    assert {p.name for p in cache.glob('*.safetensors')} == new_train | {foreign.name, f'{"3" * 32}.safetensors',
                                                                unreadable.name}
    assert user_file.read_text() == 'mine' and not dead_writer.exists() and live_writer.exists()
    assert foreign.exists() and unreadable.exists()

    assert main(['cache', '--clear']) == 0
    assert {p.name for p in cache.glob('*.safetensors')} == {foreign.name, f'{"3" * 32}.safetensors',
                                                            unreadable.name}
    assert user_file.exists()
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main(['cache', '--prune', '--clear'])


def test_timm_loader_order_comes_from_seed_and_epoch():
    """On one process too: a resumed run (a new loader, set to epoch k) sees epoch k's order."""
    ds = torch.utils.data.TensorDataset(torch.arange(40))

    def order(epoch, seed=3):
        torch.manual_seed(epoch * 7 + 1)  # the global generator must not matter
        loader = sd_data.timm_loader(ds, batch_size=8, training=True, workers=0, seed=seed)
        sd_data.set_loader_epoch(loader, epoch)
        return torch.cat([b[0] for b in loader]).tolist()
    assert order(2) == order(2) and order(2) != order(3) and order(2) != order(2, seed=4)
    assert sorted(order(2)) == list(range(40))
