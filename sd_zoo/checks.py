"""Small rules every command applies the same way: counts with a least value, files a command writes, and
writing a file atomically."""
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Sequence

__all__ = ['check_at_least', 'check_output_file', 'atomic_path', 'write_atomic']


def check_at_least(values: Dict[str, Any], least: float) -> None:
    """Each ``{flag: value}`` (None: unset, fine) is at least ``least``; else a one-line error naming the flag."""
    for flag, value in values.items():
        if value is not None and value < least:
            raise ValueError(f'{flag} must be at least {least}, got {value}')


def check_output_file(flag: str, path: str, overwrite: bool = False,
                      suffixes: Optional[Sequence[str]] = None) -> None:
    """Before any work: a file a command will write has one of ``suffixes``, is not a folder, lies in a writable
    folder that exists, and is new unless ``overwrite``."""
    if not path:
        return
    if suffixes and not path.endswith(tuple(suffixes)):
        raise ValueError(f'{flag} {path!r} must end in {" or ".join(suffixes)}')
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path!r} is a folder: give a file name')
    if not os.path.isdir(folder):
        raise ValueError(f'{flag} {path!r}: the folder {folder!r} does not exist')
    if not os.access(folder, os.W_OK):
        raise ValueError(f'{flag} {path!r}: the folder {folder!r} is not writable')
    if os.path.exists(path) and not overwrite:
        raise ValueError(f'{flag} {path!r} exists: name another file, or add --overwrite to replace it')


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name to write ``path``'s new content to; on success it replaces ``path`` by one rename, so a
    reader (or a resume) sees the old file or the new one, never half of one. On failure it is removed."""
    tmp = f'{path}.{os.getpid()}.tmp'
    _create_new(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_atomic(path: str, text: str) -> None:
    """``path`` holds ``text``, written through :func:`atomic_path` (synced to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', newline='') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _create_new(tmp: str) -> None:
    """``tmp`` made anew by this process (O_EXCL): a link planted under its predictable name is removed, never
    followed into another file; a leftover of an earlier process with this pid is replaced."""
    for attempt in range(2):
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return
        except FileExistsError:
            if attempt or os.path.isdir(tmp) and not os.path.islink(tmp):
                raise
            os.unlink(tmp)
