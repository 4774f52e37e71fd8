"""Writing training outputs (checkpoints, LoRA files): atomically, with the permissions ComfyUI's own
outputs get, and never over an existing file unless the caller asks for it.

A file is written to a temporary name in its folder, flushed to disk, given mode ``0666 & ~umask`` (0644
under the usual umask 022, like the images ComfyUI saves; ``tempfile`` would leave 0600), then either
renamed over the target (``overwrite``) or hard-linked to the first free name (``name.safetensors``,
``name_2.safetensors``, ...): ``os.link`` fails when the name exists, so two writers cannot both take
the same name and nothing is replaced without a word.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

IF_EXISTS = ("new_name", "overwrite")
MAX_SUFFIX = 10_000


NAME_MAX_BYTES = 200  # a user-given file or folder name in UTF-8: room for "_<n>" and a suffix under 255 bytes


def name_problem(name: str, max_chars: int) -> str | None:
    """Why ``name`` cannot be a plain file or folder name of ours (None when it can): empty, control characters,
    path separators or '..', a leading '.'/'~' or surrounding spaces, more than ``max_chars`` characters or
    :data:`NAME_MAX_BYTES` bytes in UTF-8 (the filesystem's limit is 255 bytes, and 'é' takes 2, an emoji 4)."""
    if not name or not name.strip():
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character (e.g. NUL or a line break)"
    if any(c in name for c in "/\\") or ".." in name:
        return "it contains a path separator or '..'"
    if name.startswith((".", "~")) or name != name.strip() or name.endswith("."):
        return "it starts with '.' or '~', or starts/ends with a space or ends with '.'"
    if len(name) > max_chars:
        return f"it is {len(name)} characters long (at most {max_chars})"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX_BYTES:
        return f"it takes {size} bytes in UTF-8 (at most {NAME_MAX_BYTES}: accented letters take 2, emoji 4)"
    return None


def output_mode() -> int:
    """The mode a plain ``open(path, 'w')`` gives a new file in this process (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def suffixed(path: Path, n: int) -> Path:
    """``name.ext`` for n = 1, ``name_<n>.ext`` after."""
    return path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")


def _claim(tmp: str, target: Path) -> None:
    """Give the finished ``tmp`` the name ``target`` unless that name exists (FileExistsError)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: reserve the name exclusively, then rename onto it
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.replace(tmp, target)


def write_atomic(path: Path, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Run ``write(tmp_path)``, then put the file at ``path`` (``overwrite``) or at the first free
    ``suffixed(path, n)``; return where it went. A crash at any point leaves no partial file under a
    final name (only a ``*.tmp`` in the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, output_mode())
        if overwrite:
            os.replace(tmp, path)
            return path
        for n in range(1, MAX_SUFFIX):
            target = suffixed(path, n)
            try:
                _claim(tmp, target)
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"{path} and {MAX_SUFFIX - 2} numbered variants of it exist; choose another name")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
