"""The decoded-images cache: what is in it, and removing what no image folder uses any more.

The in-memory loader decodes an image folder's split once and keeps it as a safetensors file in
:func:`sd_zoo.data.cache_dir`, keyed by the folder's file list, sizes and modification times. A changed or
deleted folder leaves its old file behind (a CIFAR-10 training split is 154 MB), so:

    sd-zoo cache            list the entries: folder, images, size, and whether the folder still matches
    sd-zoo cache --prune    remove the entries whose folder is gone or has changed (stale)
    sd-zoo cache --clear    remove every entry

Only files named like the cache's own (``<32 hex digits>.safetensors``, and the ``.tmp`` files of writers
that are no longer running) are ever removed.
"""
import argparse
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .data import cache_dir, folder_cache_key

__all__ = ['CacheEntry', 'cache_entries', 'remove_cache_entries']

_ENTRY = re.compile(r'^([0-9a-f]{32})\.safetensors$')
_PARTIAL = re.compile(r'^[0-9a-f]{32}\.safetensors\.(\d+)\.tmp$')


@dataclass
class CacheEntry:
    path: str
    size_bytes: int
    root: str  # the split folder it was decoded from ('' when unreadable)
    images: int
    stale: bool  # the folder is gone or no longer gives this entry's key
    reason: str = ''


def _describe(path: str, key: str) -> CacheEntry:
    from safetensors import safe_open
    size = os.path.getsize(path)
    try:
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
            images = f.get_slice('labels').get_shape()[0]
    except Exception as e:  # a damaged file is never read again by the loader either
        return CacheEntry(path, size, '', 0, True, f'unreadable ({type(e).__name__})')
    root = meta.get('root', '')
    if not root or not os.path.isdir(root):
        return CacheEntry(path, size, root, images, True, 'folder gone')
    try:
        current = folder_cache_key(root, meta.get('mode', 'RGB'))
    except Exception as e:
        return CacheEntry(path, size, root, images, True, f'folder unreadable ({type(e).__name__})')
    return CacheEntry(path, size, root, images, current != key, 'folder or cache format changed' if current != key else '')


def cache_entries(directory: Optional[str] = None) -> List[CacheEntry]:
    """The cache's entries, oldest first."""
    directory = directory or cache_dir()
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory), key=lambda n: os.path.getmtime(os.path.join(directory, n)))
    return [_describe(os.path.join(directory, n), m.group(1)) for n in names
            if (m := _ENTRY.match(n)) and os.path.isfile(os.path.join(directory, n))]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_cache_entries(*, stale_only: bool = True, directory: Optional[str] = None) -> List[str]:
    """Remove stale entries (or all with ``stale_only=False``) and the partial files of writers that are
    no longer running. Returns the removed paths."""
    directory = directory or cache_dir()
    removed = [e.path for e in cache_entries(directory) if e.stale or not stale_only]
    if os.path.isdir(directory):
        removed += [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                    if (m := _PARTIAL.match(n)) and not _pid_running(int(m.group(1)))
                    and os.path.isfile(os.path.join(directory, n))]
    for path in removed:
        os.remove(path)
    return removed


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(prog='sd-zoo cache', description='The decoded-images cache of the in-memory '
                                'loader ($SD_ZOO_CACHE, else ~/.cache/sd_zoo).')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--prune', action='store_true', help='remove entries whose image folder is gone or changed')
    g.add_argument('--clear', action='store_true', help='remove every entry')
    args = p.parse_args(argv)
    if args.prune or args.clear:
        removed = remove_cache_entries(stale_only=not args.clear)
        print(f'removed {len(removed)} file(s) from {cache_dir()}')
        for path in removed:
            print(f'  {os.path.basename(path)}')
        return removed
    entries = cache_entries()
    print(f'{cache_dir()}: {len(entries)} entries, {sum(e.size_bytes for e in entries) / 2**20:.0f} MiB')
    for e in entries:
        state = f'stale: {e.reason}' if e.stale else 'current'
        print(f'  {os.path.basename(e.path)}  {e.size_bytes / 2**20:7.1f} MiB  {e.images:>7} images  '
              f'{e.root or "?"}  ({state})')
    return [e.path for e in entries]
