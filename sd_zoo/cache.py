"""The decoded-images cache: what is in it, and removing what no image folder uses any more.

The in-memory loader decodes an image folder's split once and keeps it as a safetensors file in
:func:`sd_zoo.data.cache_dir`, keyed by the folder's file list, sizes and modification times. A changed or
deleted folder leaves its old file behind (a CIFAR-10 training split is 154 MB), so:

    sd-zoo cache            list the entries: folder, images, size, and whether the folder still matches
    sd-zoo cache --prune    remove the entries whose folder is gone or has changed (stale)
    sd-zoo cache --clear    remove every entry

Only the cache's own files are ever removed: ``<32 hex digits>.safetensors`` files that carry the cache's
metadata, and the partial ``.tmp`` files of writers that stopped an hour or more ago. Unreadable files are
left alone.
"""
import argparse
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .data import cache_dir, folder_cache_key

__all__ = ['CacheEntry', 'cache_entries', 'remove_cache_entries']

_ENTRY = re.compile(r'^([0-9a-f]{32})\.safetensors$')
_PARTIAL = re.compile(r'^[0-9a-f]{32}\.safetensors\.\d+\.tmp$')
PARTIAL_AGE_S = 3600  # a writer rewrites its .tmp file in seconds; one this old belongs to a killed writer


@dataclass
class CacheEntry:
    path: str
    size_bytes: int
    root: str  # the split folder it was decoded from
    images: int
    stale: bool  # the folder is gone or no longer gives this entry's key
    reason: str = ''


def _describe(path: str, key: str) -> Optional[CacheEntry]:
    """The entry at ``path``; None when it is gone or is a safetensors file that is not the cache's."""
    from safetensors import safe_open
    try:
        size = os.stat(path).st_size
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
            images = f.get_slice('labels').get_shape()[0] if 'labels' in f.keys() else 0
    except Exception:  # gone meanwhile, or unreadable: nothing shows it is the cache's (the loader
        return None     # replaces a damaged entry of its own when it next decodes that folder)
    if 'root' not in meta or 'classes' not in meta:
        return None
    root = meta['root']
    if not os.path.isdir(root):
        return CacheEntry(path, size, root, images, True, 'folder gone')
    try:
        current = folder_cache_key(root, meta.get('mode', 'RGB'))
    except Exception as e:
        return CacheEntry(path, size, root, images, True, f'folder unreadable ({type(e).__name__})')
    stale = current != key
    return CacheEntry(path, size, root, images, stale, 'folder or cache format changed' if stale else '')


def _files(directory: str, pattern: 're.Pattern') -> List[Tuple[str, os.stat_result]]:
    """(path, stat) of the plain files in ``directory`` whose names match, oldest first."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if pattern.match(name):
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:  # removed meanwhile (another prune, a writer's rename)
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((os.path.join(directory, name), st))
    return sorted(found, key=lambda f: f[1].st_mtime)


def cache_entries(directory: Optional[str] = None) -> List[CacheEntry]:
    """The cache's entries, oldest first."""
    entries = (_describe(path, os.path.basename(path)[:32]) for path, _ in _files(directory or cache_dir(), _ENTRY))
    return [e for e in entries if e is not None]


def remove_cache_entries(*, stale_only: bool = True, directory: Optional[str] = None) -> List[str]:
    """Remove stale entries (or all with ``stale_only=False``) and the partial files of writers that stopped
    :data:`PARTIAL_AGE_S` or more ago. Returns the removed paths."""
    directory = directory or cache_dir()
    doomed = [e.path for e in cache_entries(directory) if e.stale or not stale_only]
    now = time.time()
    doomed += [path for path, st in _files(directory, _PARTIAL) if now - st.st_mtime >= PARTIAL_AGE_S]
    removed = []
    for path in doomed:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:  # removed meanwhile
            pass
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
