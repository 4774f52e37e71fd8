"""The path guard: a path that comes from a prompt is read only when it lies inside a folder this server
serves, and folders are listed with bounds.

- Dataset and regularization folders: ComfyUI's input folder, plus the absolute folders a server admin lists
  in ``<ComfyUI user directory>/aligned_trainer_allowed_folders.json`` (``{"dataset_folders": ["/data/sets"]}``).
  The file is read on every check, so an edit needs no restart; nothing in a prompt can change it (ComfyUI's
  ``/userdata`` API writes only inside per-user sub-folders).
- LoRA files: the folders ComfyUI registers for ``loras`` (``folder_paths``, so ``extra_model_paths.yaml``
  works), and the pack's own runs folder (``output/aligned_trainer/runs``) for training checkpoints.

A path is accepted when its spelled-out form (``..`` collapsed, nothing on disk touched) and its real path
(every symlink followed) both lie inside one allowed root. ``~`` is never expanded. Every refusal carries the
same message whatever is or is not on disk at that place, so a refusal tells a caller nothing about the
server's disk.

``walk`` lists a folder and its sub-folders down to a depth, stopping with a clear error past an entry count
or a time budget. Links that lead outside the allowed roots are skipped unread and noted; a folder reached a
second time (a symlink loop or a duplicate link) is noted and not read again.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS_FILE = "aligned_trainer_allowed_folders.json"
SETTINGS_KEY = "dataset_folders"
MAX_ENTRIES = 100_000       # entries listed per walk (files and folders together)
MAX_SECONDS = 10.0          # wall time per walk


class PathRefused(ValueError):
    """A path outside the allowed roots, or a folder too large to list; the message says what to do."""


@dataclass(frozen=True)
class Roots:
    """The folders a kind of input may read, and how a user or admin adds one (for the refusal message)."""
    what: str                      # e.g. "dataset folder"
    roots: tuple[Path, ...]
    base: Path                     # relative paths are relative to this folder
    fix: str                       # how to get a path accepted

    def refuse(self, text: str) -> PathRefused:
        return PathRefused(f"{self.what} {text!r} is not inside a folder this server reads. {self.fix}")


def _abs(p: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(p)))


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def settings_file() -> Path:
    import folder_paths

    return Path(folder_paths.get_user_directory()) / SETTINGS_FILE


def allowed_dataset_folders() -> list[Path]:
    """The admin's extra dataset roots from the settings file (none when the file does not exist)."""
    f = settings_file()
    if not f.is_file():
        return []
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PathRefused(f"the allowed-folders settings file {f} cannot be read ({e}); fix its JSON, e.g. "
                          f'{{"{SETTINGS_KEY}": ["/data/datasets"]}}') from None
    entries = data.get(SETTINGS_KEY, []) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, str) and os.path.isabs(e) for e in entries):
        raise PathRefused(f"the allowed-folders settings file {f} must hold {{\"{SETTINGS_KEY}\": [absolute folder "
                          "paths]}; fix the file.")
    return [Path(e) for e in entries]


def dataset_roots() -> Roots:
    import folder_paths

    inp = Path(folder_paths.get_input_directory())
    return Roots("dataset folder", (inp, *allowed_dataset_folders()), inp,
                 "Put the dataset in ComfyUI's input folder and give its name relative to it (e.g. 'my_dataset'), "
                 f"or ask the server admin to add its parent folder to {SETTINGS_FILE} in ComfyUI's user "
                 f'directory ({{"{SETTINGS_KEY}": ["/data/datasets"]}}).')


def config_roots() -> Roots:
    """Training config files to import (kohya TOML/JSON, ai-toolkit YAML): where datasets may be read."""
    import folder_paths

    inp = Path(folder_paths.get_input_directory())
    return Roots("config file", (inp, *allowed_dataset_folders()), inp,
                 "Put the config file in ComfyUI's input folder and give its name relative to it (e.g. "
                 f"'my_lora.toml'), or ask the server admin to add its folder to {SETTINGS_FILE} in ComfyUI's user "
                 f'directory ({{"{SETTINGS_KEY}": ["/data/configs"]}}).')


def lora_roots() -> Roots:
    import folder_paths

    loras = [Path(p) for p in folder_paths.get_folder_paths("loras")]
    runs = Path(folder_paths.get_output_directory()) / "aligned_trainer" / "runs"
    return Roots("LoRA path", (*loras, runs), loras[0] if loras else runs,
                 "Give a file or sub-folder of models/loras (or of a registered loras folder in "
                 "extra_model_paths.yaml), or a run's checkpoints folder under output/aligned_trainer/runs.")


NAME_MAX = 255    # bytes in one file or folder name (ext4, xfs, btrfs, APFS, NTFS in UTF-16 units)
PATH_MAX = 4096   # bytes in a whole path (Linux)


def too_long(text: str, what: str) -> PathRefused | None:
    """A refusal for a path the filesystem cannot hold (a name over 255 bytes, a path over 4096): checking whether
    such a path exists raises a bare OSError 'File name too long'."""
    raw = text.encode("utf-8", "surrogatepass")
    longest = max((len(part) for part in raw.replace(b"\\", b"/").split(b"/")), default=0)
    if longest <= NAME_MAX and len(raw) <= PATH_MAX:
        return None
    shown = repr(text if len(text) <= 60 else text[:57] + "...")
    return PathRefused(f"{what} {shown} is too long: a file or folder name holds at most {NAME_MAX} bytes and a path "
                       f"{PATH_MAX} (this one has a name of {longest} bytes, {len(raw)} in all); give the name of an "
                       "existing file or folder")


def confine(text: str, roots: Roots) -> Path:
    """The real path of ``text`` (absolute, or relative to ``roots.base``) when it lies inside one of
    ``roots.roots``; otherwise ``roots.refuse(text)``. Whether the path exists is left to the caller."""
    if "\x00" in text or text.strip().startswith("~"):
        raise roots.refuse(text)
    if (err := too_long(text.strip(), roots.what)) is not None:
        raise err
    p = Path(text.strip())
    spelled = _abs(p if p.is_absolute() else roots.base / p)
    spelled_roots = [_abs(r) for r in roots.roots]
    # decided on the spelling alone first: a path spelled outside every root is refused without a disk access
    if not any(_within(spelled, r) for r in spelled_roots):
        raise roots.refuse(text)
    real = Path(os.path.realpath(spelled))
    if not any(_within(real, Path(os.path.realpath(r))) for r in spelled_roots):
        raise roots.refuse(text)
    return real


def dataset_folders(folder: str, reg_folder: str = "") -> tuple[Roots, Path, Path | None]:
    """The guarded Dataset node folders: (roots, folder, reg folder or None when ``reg_folder`` is blank)."""
    roots = dataset_roots()
    return roots, confine(folder, roots), confine(reg_folder, roots) if reg_folder.strip() else None


def control_folder(text: str) -> Path | None:
    """The guarded Dataset node control-image folder (image-edit training), None when ``text`` is blank: the same
    roots as the dataset folder."""
    return confine(text, dataset_roots()) if text.strip() else None


def control_folders(text: str) -> tuple[Path, ...]:
    """The guarded Dataset node control-image folders (image-edit training), one a line in ``text`` (blank lines
    skipped; () when there is none), each confined like the dataset folder, in the order given."""
    return tuple(confine(line, dataset_roots()) for line in text.splitlines() if line.strip())


def is_inside(path: Path, roots: Roots) -> bool:
    """Whether ``path``'s real path lies inside one of the roots (for entries met while listing)."""
    real = Path(os.path.realpath(path))
    return any(_within(real, Path(os.path.realpath(r))) for r in roots.roots)


@dataclass
class Listing:
    files: list[tuple[Path, int]] = field(default_factory=list)   # (file, depth: 0 = in the folder itself)
    notes: list[str] = field(default_factory=list)


def walk(folder: Path, roots: Roots | None, max_depth: int = 1, max_entries: int = MAX_ENTRIES,
         max_seconds: float = MAX_SECONDS) -> Listing:
    """Files in ``folder`` and its sub-folders down to ``max_depth``, sorted by name per folder.

    Links whose target lies outside ``roots`` are skipped without being read; a folder met twice (a symlink
    loop or two links to one folder) is read once; both are noted. More than ``max_entries`` entries or
    more than ``max_seconds`` raise PathRefused naming the folder and the limit. ``roots=None`` skips the
    link check (engine callers that pass a trusted folder)."""
    out = Listing()
    seen: set[tuple[int, int]] = set()
    count = 0
    t0 = time.monotonic()

    def limit(reason: str) -> PathRefused:
        return PathRefused(f"folder {folder} {reason} while listing it and its sub-folders (down to depth "
                           f"{max_depth}); point the input at the dataset folder itself, not at a folder above it.")

    def visit(d: Path, depth: int) -> None:
        nonlocal count
        st = os.stat(d)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            out.notes.append(f"skipped: {d} is a folder already read (a symlink loop or a second link to it); "
                             "read once")
            return
        seen.add(key)
        with os.scandir(d) as it:
            entries = []
            for e in it:
                count += 1
                if count > max_entries:
                    raise limit(f"has more than {max_entries} entries")
                if time.monotonic() - t0 > max_seconds:
                    raise limit(f"took more than {max_seconds:g} s")
                entries.append(e)
        for e in sorted(entries, key=lambda e: e.name):
            p = Path(e.path)
            if e.is_symlink() and roots is not None and not is_inside(p, roots):
                out.notes.append(f"skipped: {p} is a link that leads outside the folders this server reads")
                continue
            try:
                if e.is_dir():
                    if depth < max_depth:
                        visit(p, depth + 1)
                elif e.is_file():
                    out.files.append((p, depth))
            except OSError as err:  # a dangling link, a folder without permission
                out.notes.append(f"skipped: {p} cannot be read ({err.strerror})")

    try:
        visit(Path(folder), 0)
    except PermissionError as e:
        raise PathRefused(f"folder {folder} cannot be listed ({e.strerror}); give the server read access.") from None
    return out


__all__ = ["PathRefused", "Roots", "confine", "dataset_roots", "lora_roots", "walk", "is_inside", "settings_file",
           "allowed_dataset_folders", "dataset_folders", "control_folder", "control_folders", "SETTINGS_FILE"]
