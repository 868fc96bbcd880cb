"""Data: dataset sources and splits (checked, never guessed), the paper's augmentation, and two loaders.

* timm's loader (``loader='timm'``): PIL images decoded and transformed in DataLoader workers; any timm
  transform, any image size, any data set size.
* the in-memory loader (``loader='memory'``, :class:`TensorLoader`): a small data set (CIFAR, SVHN, a folder
  of same-sized images) decoded once into a uint8 tensor, cached on disk under the user's cache folder,
  held on the training device, and augmented (the paper's pad + crop + flip) and normalized there a whole
  batch at a time. Loader workers decoding JPEGs on the cores that train is time that stochastic depth
  cannot save; this path removes it.

``loader='auto'`` takes the in-memory path where it gives the same images as timm's (the augmentation is
the paper's or none, the images are the model's input size) and the data fits in memory, else timm's.
"""
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import ImageDataset

from .checks import atomic_path
from .stochastic_depth import mix_seeds

_logger = logging.getLogger('sd_zoo.data')

TORCH_DATASETS = ('torch/cifar10', 'torch/cifar100', 'torch/svhn')
DATASET_CHOICES_HELP = "'' (image folder), torch/cifar10, torch/cifar100 or torch/svhn"
LOADERS = ('auto', 'memory', 'timm')
MAX_DECODED_BYTES = 8 << 30  # the in-memory loader takes data sets up to this size (decoded uint8)
_CACHE_FORMAT = 2  # 2: entries carry what they were made from (verified on use)


@dataclass(frozen=True)
class DataSource:
    """Where the images come from: an image folder (``dataset=''``, split folders under ``root``) or a
    torchvision data set (``torch/cifar10``, ``torch/cifar100``, ``torch/svhn``) stored under ``root``."""
    dataset: str = ''
    root: Optional[str] = None
    download: bool = False
    img_mode: str = 'RGB'  # PIL mode images are converted to: 'RGB', or 'L' for a 1-channel model

    def __post_init__(self):
        if self.img_mode not in ('RGB', 'L'):
            raise ValueError(f'unsupported image mode {self.img_mode!r}: use RGB or L')
        if self.dataset and self.img_mode != 'RGB':
            raise ValueError(f'{self.dataset} is RGB: image mode {self.img_mode} is for image folders')
        if self.dataset and self.dataset not in TORCH_DATASETS:
            raise ValueError(f'unsupported dataset {self.dataset!r}: use {DATASET_CHOICES_HELP}')
        if not self.dataset and not self.root:
            raise ValueError('no dataset: give --data-dir DIR (an image folder with one folder per split) or '
                             '--dataset torch/cifar10 --dataset-download')
        if not self.dataset and not os.path.isdir(self.root):
            raise ValueError(f'--data-dir {self.root!r} is not a folder')

    @property
    def data_root(self) -> str:
        return self.root or os.path.join(os.path.expanduser('~'), '.cache', 'sd_zoo', 'data')

    def describe(self, split: str) -> str:
        return f'{self.dataset or "image folder"} {self.data_root!r}, split {split!r}'


def resolve_data_config(model: torch.nn.Module, overrides: Optional[Dict[str, Any]] = None,
                        verbose: bool = False) -> Dict[str, Any]:
    """timm's data config for ``model``, with the model's own input channels: a 1-channel model reads images
    in mode L and, unless --mean/--std say otherwise, normalizes with the mean of the RGB statistics."""
    import timm.data
    cfg = timm.data.resolve_data_config(dict(overrides or {}), model=model, verbose=verbose)
    first_conv = model.pretrained_cfg.get('first_conv') or 'conv1'
    weight = getattr(model.get_submodule(first_conv), 'weight', None) if first_conv else None
    chans = int(weight.shape[1]) if weight is not None and weight.dim() == 4 else cfg['input_size'][0]
    if chans != cfg['input_size'][0]:
        cfg['input_size'] = (chans,) + tuple(cfg['input_size'][1:])
        for key in ('mean', 'std'):
            if len(cfg[key]) != chans:
                cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * chans
    return cfg


def image_mode(data_config: Dict[str, Any]) -> str:
    return 'L' if data_config['input_size'][0] == 1 else 'RGB'


# ---------------------------------------------------------------------------------------------- splits


def check_split_name(split: str) -> None:
    """A split is one folder directly in the data folder, named: never the data folder itself ('.', ''), a
    parent ('..') or a path (which could reach the training images from a validation split)."""
    if not isinstance(split, str) or split in ('', '.', '..') or os.path.isabs(split) or \
            any(sep in split for sep in (os.sep, os.altsep) if sep):
        raise ValueError(f'split {split!r} is not a split name: a split is one folder directly in the data folder '
                         f'(train, test, validation, ...), never the data folder itself, a parent or a path')


def split_folder(source: DataSource, split: str) -> str:
    """The folder of ``split`` in an image-folder data set; a missing split is an error, never the root."""
    check_split_name(split)
    folder = os.path.join(source.root, split)
    if not os.path.isdir(folder):
        present = sorted(d for d in os.listdir(source.root)
                         if os.path.isdir(os.path.join(source.root, d)) and not d.startswith('.'))
        raise ValueError(f'split {split!r} not found: {source.root!r} has no folder {split!r} '
                         f'(its folders: {", ".join(present) or "none"})')
    real, root = os.path.realpath(folder), os.path.realpath(source.root)
    if real == root or root.startswith(real.rstrip(os.sep) + os.sep):
        raise ValueError(f'split {split!r} in {source.root!r} links to the data folder or a folder above it: it '
                         f'would hold every split')
    return folder


def check_distinct_splits(source: DataSource, train_split: str, **others: Optional[str]) -> None:
    """Validation and test images are never the training images: a split that is the training split (by name,
    or an image folder linked to it) is an error."""
    def identity(split: str) -> Optional[str]:  # None: a missing folder, which reading the split reports
        if source.dataset:
            return split
        check_split_name(split)
        folder = os.path.join(source.root, split)
        return os.path.realpath(folder) if os.path.isdir(folder) else None
    train = identity(train_split)
    for flag, split in others.items():
        if split and train is not None and identity(split) == train:
            raise ValueError(f'--{flag.replace("_", "-")} {split!r} is the training split {train_split!r}: '
                             f'validate on another split, or hold training images out with --val-holdout N')


def _torch_split_is_train(source: DataSource, split: str) -> bool:
    """torchvision's data sets have train and test only; 'validation' is not read as test (timm's does), so
    a run never picks its best epoch on test images without saying --val-split test."""
    if split in ('train', 'test'):
        return split == 'train'
    raise ValueError(f'{source.dataset} has the splits train and test, not {split!r}: name one (test is never '
                     f'read in place of a validation split; to validate on held-out training images, train with '
                     f'--val-holdout N)')


def read_split(source: DataSource, split: str) -> torch.utils.data.Dataset:
    """A data set of (PIL image, label) pairs, with a ``classes`` list. timm's ImageDataset reads folders
    (so labels are timm's: class folders in natural sort order); torchvision reads CIFAR and SVHN."""
    try:
        if not source.dataset:
            ds = StrictImageDataset(split_folder(source, split), input_img_mode=source.img_mode)
            ds.classes = list(ds.reader.class_to_idx)
            _check_class_folders(ds, source.describe(split))
            return ds
        train = _torch_split_is_train(source, split)
        from torchvision import datasets
        os.makedirs(source.data_root, exist_ok=True) if source.download else None
        if source.dataset == 'torch/svhn':
            ds = datasets.SVHN(source.data_root, split='train' if train else 'test', download=source.download)
            ds.classes = [str(i) for i in range(10)]
            return ds
        cls = datasets.CIFAR10 if source.dataset == 'torch/cifar10' else datasets.CIFAR100
        return cls(source.data_root, train=train, download=source.download)
    except (RuntimeError, OSError) as e:  # not downloaded, or a download that failed (URLError is an OSError)
        hint = ' (add --dataset-download)' if source.dataset and not source.download else ''
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'cannot read {source.describe(split)}: {detail}{hint}') from e


def _check_class_folders(ds, what: str) -> None:
    """Images directly in a split folder would be a class named '' (label 0, every other label shifted)."""
    if '' in ds.reader.class_to_idx:
        loose = next(os.path.relpath(p, ds.reader.root) for p, t in ds.reader.samples
                     if t == ds.reader.class_to_idx[''])
        raise ValueError(f'{what}: images lie directly in the split folder (e.g. {loose!r}); a split folder holds '
                         f'one folder per class (SPLIT/CLASS/IMAGE)')


def _image_error(path: str, error: Exception) -> ValueError:
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return ValueError(f'cannot read the image {path!r} ({detail}): fix or remove the file')


def _open_image(path: str, mode: str):
    """The image at ``path`` decoded in ``mode``; an unreadable file is an error that names it."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.convert(mode)  # decodes the pixels: a truncated file fails here, not later
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a corrupt, truncated or foreign file
        raise _image_error(path, e) from e


class StrictImageDataset(ImageDataset):
    """timm's ImageDataset, except that an unreadable image is an error naming the file: timm's logs a
    warning and returns the next image in its place, which trains on silently wrong data."""

    def __getitem__(self, index: int):
        path, target = self.reader.samples[index]
        img = _open_image(path, self.input_img_mode or 'RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def check_same_classes(reference: Sequence[str], other: Sequence[str], what: str) -> None:
    """Labels are class indices: two splits must have the same classes in the same order."""
    if list(reference) != list(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        detail = '; '.join(s for s in (f'missing {missing}' if missing else '', f'extra {extra}' if extra else '')
                           if s) or 'same names in another order'
        raise ValueError(f'the classes of {what} differ from the training split\'s ({detail}): labels would not '
                         f'match')


def label_map_by_name(label_names: Sequence[str], classes: Sequence[str], what: str) -> Optional[List[int]]:
    """The model's label of each class of a split, matched by name (weights that carry their label names): None
    where they are the same list; a split with fewer classes or another order maps; a class the weights do
    not know is an error that lists the difference."""
    if list(classes) == list(label_names):
        return None
    unknown = [c for c in classes if c not in label_names]
    if unknown:
        raise ValueError(f'{what} has classes the weights do not know: {", ".join(unknown[:8])}'
                         f'{" ..." if len(unknown) > 8 else ""} (the weights\' classes: {", ".join(label_names[:12])}'
                         f'{" ..." if len(label_names) > 12 else ""}): evaluate on a split of the same classes')
    return [list(label_names).index(c) for c in classes]


def check_class_count(classes: Sequence[str], num_classes: Optional[int], what: str) -> None:
    """A label must index one of the model's outputs: data with more classes than the model has outputs is an
    error (cross-entropy would fail mid-run, or accuracy be wrong), fewer is fine."""
    if num_classes is not None and len(classes) > num_classes:
        raise ValueError(f'{what} has {len(classes)} classes but the model has {num_classes} outputs: labels '
                         f'{num_classes}..{len(classes) - 1} have no output (give --num-classes {len(classes)} or '
                         f'data with the model\'s classes)')


def random_indices(n: int, k: int, seed: int) -> List[int]:
    """``k`` distinct indices of ``n`` (all of them, in order, when ``k`` is 0 or at least ``n``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].tolist() if k and k < n else list(range(n))


class Subset(torch.utils.data.Dataset):
    """A subset of a data set with its own transform (a held-out split needs the eval transform) and, where
    given, its labels mapped to the model's (``label_map[folder label]``)."""

    def __init__(self, dataset, indices: Sequence[int], transform=None, label_map: Optional[List[int]] = None):
        self.dataset, self.indices, self.transform, self.label_map = dataset, list(indices), transform, label_map

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, target = self.dataset[self.indices[i]]
        target = self.label_map[target] if self.label_map is not None else target
        return (self.transform(img) if self.transform is not None else img), target


# ---------------------------------------------------------------------------------------------- timm's loader


def build_transforms(data_config: Dict[str, Any], *, cifar_aug: bool = False, no_aug: bool = False,
                     hflip: float = 0.5, scale: Sequence[float] = (0.08, 1.0),
                     ratio: Sequence[float] = (3. / 4., 4. / 3.)):
    """Train and eval transforms: timm's, or the paper's pad + crop + flip with ``cifar_aug``."""
    from timm.data import create_transform
    from torchvision import transforms as T
    eval_tf = create_transform(**data_config, is_training=False)
    if cifar_aug and not no_aug:
        train_tf = T.Compose([
            T.RandomCrop(data_config['input_size'][-1], padding=4),
            T.RandomHorizontalFlip(hflip),
            T.ToTensor(),
            T.Normalize(data_config['mean'], data_config['std']),
        ])
    else:
        train_tf = create_transform(**data_config, is_training=True, no_aug=no_aug, hflip=hflip,
                                    scale=tuple(scale), ratio=tuple(ratio))
    return train_tf, eval_tf


def timm_loader(ds, *, batch_size: int, training: bool, workers: int = 4, pin_memory: bool = False,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader; in training each rank takes its shard of an order drawn from (seed, epoch), on one
    process too (DistributedSampler), so that a resumed run sees the epochs' orders it would have seen."""
    sampler = torch.utils.data.distributed.DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True) if training else None
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, sampler=sampler, drop_last=training, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0)


def set_loader_epoch(loader, epoch: int) -> None:
    """Each epoch's order (and, in memory, its augmentation) comes from (seed, epoch): a resume continues it.
    timm's loader draws its augmentation in the workers, from torch's generator: that does not continue."""
    if isinstance(loader, TensorLoader):
        loader.set_epoch(epoch)
    elif getattr(loader, 'sampler', None) is not None and hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------- in memory


@dataclass
class DecodedImages:
    """A whole split as tensors: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int]) -> 'DecodedImages':
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return DecodedImages(self.images[idx], self.labels[idx], self.classes)

    def to(self, device) -> 'DecodedImages':
        return DecodedImages(self.images.to(device), self.labels.to(device), self.classes)


def cache_dir() -> str:
    """Where decoded splits are cached: $SD_ZOO_CACHE, else $XDG_CACHE_HOME/sd_zoo, else ~/.cache/sd_zoo."""
    root = os.environ.get('SD_ZOO_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'sd_zoo')
    return os.path.join(root, 'decoded')


def _folder_key(samples: Sequence[Tuple[str, int]], root: str, classes: Sequence[str], mode: str) -> str:
    """A key that changes when any file is added, removed, renamed, relabelled or modified, or when Pillow
    (whose JPEG decoder's output can change between versions) is another version."""
    import PIL
    h = hashlib.sha256(json.dumps([_CACHE_FORMAT, list(classes), mode, PIL.__version__]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f'{os.path.relpath(path, root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:32]


def folder_cache_key(root: str, mode: str = 'RGB') -> str:
    """The cache key the in-memory loader gives the split folder ``root`` as it is now."""
    ds = StrictImageDataset(root, input_img_mode=mode)
    return _folder_key(ds.reader.samples, ds.reader.root, list(ds.reader.class_to_idx), mode)


def _decode_file(path: str, mode: str = 'RGB'):
    """(H, W, C) uint8, converted like timm's ImageDataset does (``img.convert(mode)``); an unreadable
    file is an error naming it."""
    import numpy as np
    arr = np.asarray(_open_image(path, mode))
    return arr[:, :, None] if arr.ndim == 2 else arr


class InMemoryUnfit(ValueError):
    """The split cannot be held in memory as the model takes it (sizes, memory): --loader auto then uses
    timm's loader; an explicit --loader memory is an error that says to use timm's."""

    def __init__(self, reason: str):
        super().__init__(f'{reason}; use --loader timm')
        self.reason = reason


def _decode_folder(ds, max_bytes: int, workers: int, mode: str) -> DecodedImages:
    import numpy as np
    from functools import partial
    samples = ds.reader.samples
    first = _decode_file(samples[0][0], mode)
    need = len(samples) * first.size
    if need > max_bytes:
        raise InMemoryUnfit(f'{len(samples)} images of {first.shape[1]}x{first.shape[0]} take {need / 2**30:.1f} '
                            f'GiB decoded, over the in-memory limit of {max_bytes / 2**30:.1f} GiB')
    with ThreadPoolExecutor(max(1, workers)) as pool:
        arrays = list(pool.map(partial(_decode_file, mode=mode), (p for p, _ in samples), chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = ', '.join(f'{s[1]}x{s[0]}' for s in sorted(shapes)[:3])
        raise InMemoryUnfit(f'the images have different sizes ({sizes}, ...): the in-memory loader needs one size')
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([t for _, t in samples], dtype=torch.long)
    return DecodedImages(images, labels, list(ds.classes))


def decode_split(source: DataSource, split: str, *, max_bytes: int = MAX_DECODED_BYTES,
                 workers: int = 2, use_cache: bool = True, size: Optional[Tuple[int, int]] = None) -> DecodedImages:
    """A split decoded to uint8 tensors. Folders are decoded once and cached (safetensors, keyed by the file
    list with sizes and modification times, so a changed folder is decoded again); torchvision's CIFAR and
    SVHN are arrays already."""
    ds = read_split(source, split)
    if source.dataset:
        data = torch.as_tensor(ds.data)
        images = data if source.dataset == 'torch/svhn' else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.labels if source.dataset == 'torch/svhn' else ds.targets, dtype=torch.long)
        return DecodedImages(images.contiguous(), labels, list(ds.classes))
    if size is not None and len(ds):  # the first image's header: no decoding (nor caching) of a folder to refuse
        _check_size(_header_size(ds.reader.samples[0][0]), size)
    from safetensors import safe_open
    key = _folder_key(ds.reader.samples, ds.reader.root, ds.classes, source.img_mode)
    path = os.path.join(cache_dir(), f'{key}.safetensors')
    if use_cache and os.path.isfile(path):
        try:
            with safe_open(path, 'pt') as f:
                decoded = DecodedImages(f.get_tensor('images'), f.get_tensor('labels'), list(ds.classes))
                meta = f.metadata() or {}
            doubt = _cache_doubt(meta, decoded, ds, source.img_mode)
            if doubt is None:
                _logger.info(f'{source.describe(split)}: decoded images from the cache {path} (verified)')
                return decoded
            _logger.warning(f'the cache entry {path} {doubt}: decoding again')
        except Exception as e:  # a damaged cache file is decoded again, never trusted
            _logger.warning(f'ignoring the damaged cache file {path} ({type(e).__name__}); decoding again')
    _logger.info(f'{source.describe(split)}: decoding {len(ds)} images once into memory')
    decoded = _decode_folder(ds, max_bytes, workers, source.img_mode)
    if use_cache:
        _write_cache(path, decoded, root=ds.reader.root, mode=source.img_mode,
                     files_digest=_files_digest(ds.reader.samples, ds.reader.root))
    return decoded


def _files_digest(samples: Sequence[Tuple[str, int]], root: str) -> str:
    """A digest of every file's path, label and bytes: what a cache entry was decoded from (size and mtime can
    be restored after a file is swapped; its bytes cannot)."""
    h = hashlib.blake2b(digest_size=16)
    for path, label in samples:
        h.update(f'{os.path.relpath(path, root)}\0{label}\0'.encode())
        with open(path, 'rb') as f:
            h.update(hashlib.blake2b(f.read(), digest_size=16).digest())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _cache_doubt(meta: Dict[str, str], decoded: DecodedImages, ds, mode: str) -> Optional[str]:
    """Why a cache entry is not the decoding of this split as it is now, or None: it must carry this format,
    this split's file digest (files swapped, or an entry copied from another split), exactly the labels the
    folder gives (shifted labels), one image per file, and the digest of its own images (edited in place)."""
    samples = ds.reader.samples
    labels = torch.tensor([t for _, t in samples], dtype=torch.long)
    if meta.get('format') != str(_CACHE_FORMAT):
        return 'is of another format'
    if decoded.images.dim() != 4 or decoded.images.dtype != torch.uint8 or len(decoded) != len(samples) or \
            decoded.images.shape[1] != (1 if mode == 'L' else 3):
        return f'holds {tuple(decoded.images.shape)} images for {len(samples)} files'
    if not torch.equal(decoded.labels, labels):
        return 'has labels that are not the folder\'s'
    if meta.get('images_digest') != _tensor_digest(decoded.images):
        return 'has images that are not the ones it was written with'
    if meta.get('files_digest') != _files_digest(samples, ds.reader.root):
        return 'was made from other files than this split\'s'
    return None


def _write_cache(path: str, decoded: DecodedImages, *, root: str, mode: str, files_digest: str) -> None:
    """The decoded split into the cache; a cache that cannot be written (read-only home, full disk, a
    partial file removed by sd-zoo cache --clear) costs the next run a decode, never this run."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        counts = torch.bincount(decoded.labels, minlength=len(decoded.classes)).tolist()
        with atomic_path(path) as tmp:  # a reader never sees half a file; a failed write leaves no partial one
            save_file({'images': decoded.images, 'labels': decoded.labels}, tmp,
                      metadata={'format': str(_CACHE_FORMAT), 'root': os.path.abspath(root),
                                'classes': json.dumps(decoded.classes), 'mode': mode,
                                'label_counts': json.dumps(counts), 'files_digest': files_digest,
                                'images_digest': _tensor_digest(decoded.images)})
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        _logger.warning(f'could not cache the decoded images at {path} ({type(e).__name__}: {e}); going on '
                        f'without the cache (set SD_ZOO_CACHE to a writable folder)')


def in_memory_reason(*, data_config: Dict[str, Any], training_aug: str) -> Optional[str]:
    """Why the in-memory loader cannot give what timm's transforms give (None when it can).
    ``training_aug``: 'cifar' (pad + crop + flip), 'none', or 'timm' (RandomResizedCrop and friends)."""
    if training_aug == 'timm':
        return ('timm\'s RandomResizedCrop augmentation runs on timm\'s loader only (the in-memory loader does the '
                'paper\'s --cifar-aug, or --no-aug)')
    size = data_config['input_size'][-1]
    if data_config['input_size'][-2] != size or math.floor(size / data_config.get('crop_pct', 1.0)) != size:
        return f'the eval transform resizes (input {data_config["input_size"]}, crop_pct {data_config["crop_pct"]})'
    return None


def _header_size(path: str) -> Tuple[int, int]:
    """(height, width) from an image file's header."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError) as e:
        raise _image_error(path, e) from e


def _check_size(have: Tuple[int, int], want: Tuple[int, int]) -> None:
    if tuple(have) != tuple(want):
        raise InMemoryUnfit(f'the images are {have[1]}x{have[0]} but the model takes {want[1]}x{want[0]}: the '
                            f'in-memory loader does not resize')


def check_image_size(data: DecodedImages, data_config: Dict[str, Any]) -> None:
    _check_size(tuple(data.images.shape[-2:]), tuple(data_config['input_size'][-2:]))
    if data.images.shape[1] != data_config['input_size'][0]:
        raise ValueError(f'the images have {data.images.shape[1]} channels but the model takes '
                         f'{data_config["input_size"][0]}')


def _mix(*values: int) -> int:
    """A 63-bit generator seed from several integers, so (seed, epoch, rank) streams differ."""
    return mix_seeds(*values) & 0x7FFFFFFFFFFFFFFF


class TensorLoader:
    """Batches of a decoded split, on ``device``, normalized like timm's ToTensor + Normalize.

    Training: each epoch a permutation from (seed, epoch), sharded over ranks like DistributedSampler
    (drop_last), full batches only; per sample a random crop of the image padded by ``pad`` zero pixels and a
    horizontal flip with probability ``hflip``, drawn from (seed, epoch, rank). So a resumed run sees exactly
    the batches the uninterrupted run would. Evaluation: every image in order, no augmentation.
    """

    def __init__(self, data: DecodedImages, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, training: bool, pad: int = 4, hflip: float = 0.5, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.data = data.to(device)
        self.batch_size, self.training, self.pad, self.hflip = batch_size, training, pad, hflip
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        channels = data.images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.table = normalization_table(mean, std, channels).to(device)
        self.dataset = data  # DataLoader-like: len(loader.dataset) is the number of images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if not self.training:
            return torch.arange(n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        per_rank = n // self.world_size
        return perm[:per_rank * self.world_size][self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self.data) // self.world_size if self.training else len(self.data)
        return n // self.batch_size if self.training else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        device = self.data.images.device
        indices = self._indices()
        n = len(self) * self.batch_size if self.training else len(indices)
        indices = indices[:n]
        if self.training:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.rank, 1))
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < self.hflip
        for start in range(0, n, self.batch_size):
            idx = indices[start:start + self.batch_size].to(device)
            images = self.data.images[idx]
            if self.training:
                sl = slice(start, start + self.batch_size)
                images = crop_and_flip(images, offsets[sl].to(device), flips[sl].to(device), self.pad)
            yield self.normalize(images), self.data.labels[idx]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) to timm's normalized floats, exactly: on the CPU with torchvision's own operations
        (ToTensor + Normalize, 4x faster than a lookup there); elsewhere looked up in a table those operations
        computed on the CPU (CUDA divides by 255 as a multiply by its rounded reciprocal, one ulp off for some
        values)."""
        if images.device.type == 'cpu':
            return images.float().div_(255).sub_(self.mean).div_(self.std)
        return lookup_normalized(self.table, images)


def normalization_table(mean: Sequence[float], std: Sequence[float], channels: int) -> torch.Tensor:
    """(channels, 256): every pixel value normalized with torchvision's ToTensor + Normalize operations, on the
    CPU."""
    levels = torch.arange(256, dtype=torch.float32).div_(255).view(1, 256)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1).expand(channels, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1).expand(channels, 1)
    return (levels - mean_t).div_(std_t)


def lookup_normalized(table: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``table`` (C, 256) at uint8 ``images`` (B, C, H, W): each value in its channel's row."""
    offsets = (torch.arange(table.shape[0], device=images.device) * 256).view(1, -1, 1, 1)
    return torch.take(table, images.long() + offsets)


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: zero-pad by ``pad``, crop the original size at ``offsets`` (dy, dx), flip where ``flips``.
    One gather for the whole batch, on the batch's device."""
    b, c, h, w = images.shape
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)
    cols_fwd = torch.arange(w, device=dev)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], w - 1 - cols_fwd, cols_fwd)
    return images[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------- both paths


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: the paper's pad + crop + flip (``cifar_aug``), none, or timm's transform."""
    cifar_aug: bool = False
    no_aug: bool = False
    hflip: float = 0.5
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3. / 4., 4. / 3.)

    @property
    def kind(self) -> str:
        return 'none' if self.no_aug else 'cifar' if self.cifar_aug else 'timm'


@dataclass
class Loaders:
    """The loaders of one run; ``kind`` is 'memory' or 'timm'; the counts are images per split."""
    train: Any
    val: Any
    test: Any
    kind: str
    counts: Dict[str, int]
    classes: List[str]


def choose_loader(loader: str, *, data_config: Dict[str, Any], aug: Augmentation) -> str:
    """'memory' or 'timm' for ``loader`` ('auto', 'memory', 'timm'); an explicit 'memory' that cannot give
    timm's images is an error that says why."""
    if loader not in LOADERS:
        raise ValueError(f'unknown loader {loader!r}: use {", ".join(LOADERS)}')
    if loader == 'timm':
        return 'timm'
    reason = in_memory_reason(data_config=data_config, training_aug=aug.kind)
    if reason is None:
        return 'memory'
    if loader == 'memory':
        raise ValueError(f'--loader memory: {reason}; use --loader timm')
    _logger.info(f'timm\'s loader: {reason}')
    return 'timm'


def _split_parts(n: int, *, val_holdout: int, train_subset: int, val_subset: int, seed: int):
    """Training and held-out indices. The holdout is a random draw: splits list their images class by class,
    so the first ``val_holdout`` in file order would be whole classes missing from training."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if val_holdout and not 0 < val_holdout < n:
        raise ValueError(f'--val-holdout {val_holdout} must be between 1 and {n - 1} (training set size)')
    val_idx, train_idx = (order[:val_holdout][:val_subset or None], order[val_holdout:]) if val_holdout \
        else (None, list(range(n)))
    if train_subset:
        train_idx = [train_idx[i] for i in random_indices(len(train_idx), train_subset, seed)]
    return train_idx, val_idx


def build_loaders(source: DataSource, *, data_config: Dict[str, Any], train_split: str, val_split: Optional[str],
                  test_split: Optional[str], batch_size: int, eval_batch_size: int, aug: Augmentation,
                  loader: str = 'auto', val_holdout: int = 0, train_subset: int = 0, val_subset: int = 0,
                  workers: int = 4, pin_memory: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device('cpu')) -> Loaders:
    """Train, validation (``val_holdout`` training images, else ``val_split``) and test loaders. Every split
    must exist and have the training split's classes."""
    check_distinct_splits(source, train_split, val_split=None if val_holdout else val_split, test_split=test_split)
    kind = choose_loader(loader, data_config=data_config, aug=aug)
    if kind == 'memory':
        # every split at the model's input size, or none in memory: timm's loader would resize a validation
        # split of another size, the in-memory one would not
        decoded = {}
        for split in dict.fromkeys([train_split, None if val_holdout else val_split, test_split]):
            if split is not None:
                decoded[split] = _decode_or_fallback(source, split, loader=loader, data_config=data_config,
                                                     workers=workers)
                if decoded[split] is None:
                    kind = 'timm'
                    break
    if kind == 'memory':
        train_all = decoded[train_split]
        read = lambda split: _checked(decoded[split], train_all.classes, split)  # noqa: E731
        subset = lambda data, idx: data.subset(idx)  # noqa: E731
        n = len(train_all)
    else:
        train_tf, eval_tf = build_transforms(data_config, cifar_aug=aug.cifar_aug, no_aug=aug.no_aug,
                                             hflip=aug.hflip, scale=aug.scale, ratio=aug.ratio)
        train_all = read_split(source, train_split)
        read = lambda split: _checked(read_split(source, split), train_all.classes, split)  # noqa: E731
        subset = lambda data, idx: Subset(data, idx, eval_tf)  # noqa: E731
        n = len(train_all)
    if n == 0:
        raise ValueError(f'the {train_split!r} split is empty')
    train_idx, val_idx = _split_parts(n, val_holdout=val_holdout, train_subset=train_subset,
                                      val_subset=val_subset, seed=seed)
    parts = dict(train=None, val=None, test=None)
    if val_idx is not None:
        parts['val'] = subset(train_all, val_idx)
    elif val_split:
        val_all = read(val_split)
        parts['val'] = subset(val_all, random_indices(len(val_all), val_subset, seed))
    if test_split:
        test_all = read(test_split)
        parts['test'] = subset(test_all, random_indices(len(test_all), val_subset, seed))
    counts = {name: len(ds) for name, ds in parts.items() if ds is not None}
    counts['train'] = len(train_idx)
    if kind == 'memory':
        make = lambda data, training: TensorLoader(  # noqa: E731
            data, batch_size=batch_size if training else eval_batch_size, mean=data_config['mean'],
            std=data_config['std'], device=device, training=training, pad=4 if aug.kind == 'cifar' else 0,
            hflip=aug.hflip if aug.kind == 'cifar' else 0.0, seed=seed, rank=rank, world_size=world_size)
        train = make(train_all.subset(train_idx), True)
    else:
        make = lambda ds, training: timm_loader(  # noqa: E731
            ds, batch_size=batch_size if training else eval_batch_size, training=training, workers=workers,
            pin_memory=pin_memory, seed=seed, rank=rank, world_size=world_size)
        train = make(Subset(train_all, train_idx, train_tf), True)
    val = make(parts['val'], False) if parts['val'] is not None else None
    test = make(parts['test'], False) if parts['test'] is not None else None
    if len(train) == 0:
        raise ValueError(f'{counts["train"]} training images make no full batch of {batch_size} per rank')
    return Loaders(train=train, val=val, test=test, kind=kind, counts=counts, classes=list(train_all.classes))


def _decode_or_fallback(source: DataSource, split: str, *, loader: str, data_config: Dict[str, Any],
                        workers: int) -> Optional[DecodedImages]:
    """The split decoded for the in-memory loader; None (timm's loader) where --loader auto meets images the
    in-memory loader cannot take as they are (several sizes, another size than the model's, too many)."""
    try:
        data = decode_split(source, split, workers=workers, size=tuple(data_config['input_size'][-2:]))
        check_image_size(data, data_config)
        return data
    except InMemoryUnfit as e:
        if loader != 'auto':
            raise
        _logger.info(f'timm\'s loader: {e.reason}')
        return None


def _checked(data, train_classes: Sequence[str], split: str):
    check_same_classes(train_classes, data.classes, f'split {split!r}')
    return data


def build_eval_loader(source: DataSource, split: str, *, data_config: Dict[str, Any], batch_size: int,
                      loader: str = 'auto', subset: int = 0, seed: int = 0, workers: int = 4,
                      device: torch.device = torch.device('cpu'), num_classes: Optional[int] = None,
                      label_names: Optional[Sequence[str]] = None):
    """One split for evaluation (``sd-zoo validate``), either path; returns (loader, number of images).
    ``num_classes``: the model's outputs, which the split's classes must not outnumber. ``label_names``: the
    weights' classes, where they carry them: the split's labels are then matched to them by name."""
    kind = choose_loader(loader, data_config=data_config, aug=Augmentation(no_aug=True))
    data = _decode_or_fallback(source, split, loader=loader, data_config=data_config, workers=workers) \
        if kind == 'memory' else None
    classes = data.classes if data is not None else None
    raw = read_split(source, split) if data is None else None
    classes = classes if raw is None else raw.classes
    label_map = label_map_by_name(label_names, classes, source.describe(split)) if label_names else None
    if label_map is None:
        check_class_count(classes, num_classes, source.describe(split))
    if data is not None:
        data = data.subset(random_indices(len(data), subset, seed))
        if label_map is not None:
            data = DecodedImages(data.images, torch.as_tensor(label_map, dtype=torch.long)[data.labels], classes)
        return TensorLoader(data, batch_size=batch_size, mean=data_config['mean'], std=data_config['std'],
                            device=device, training=False), len(data)
    _, eval_tf = build_transforms(data_config)
    ds = Subset(raw, random_indices(len(raw), subset, seed), eval_tf, label_map)
    return timm_loader(ds, batch_size=batch_size, training=False, workers=workers), len(ds)
