"""train/files.py pinned (issue #26): how checkpoints and LoRA files are written. A file appears only under its
final name once written in full (a temporary ``.*.tmp`` in the same folder, flushed, then renamed or
hard-linked), with the mode a plain ``open()`` gives under the process umask, never over an existing file unless
asked (``name.ext``, ``name_2.ext``, ...), also on a filesystem without hard links, and nothing is left behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def files(comfy):
    return comfy.engine("train.files")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _writer(text: str, seen: list | None = None):
    def write(tmp: str) -> None:
        if seen is not None:
            seen.append(tmp)
        Path(tmp).write_text(text, encoding="utf-8")
    return write


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_output_mode_follows_the_umask_and_leaves_it_alone(files):
    old = os.umask(0o027)
    try:
        assert files.output_mode() == 0o640
        assert os.umask(0o000) == 0o027  # output_mode put the umask back
        assert files.output_mode() == 0o666
        assert os.umask(0o000) == 0o000
    finally:
        os.umask(old)


def test_suffixed_names(files):
    p = Path("/x/lora.safetensors")
    assert files.suffixed(p, 1) == p
    assert files.suffixed(p, 2) == Path("/x/lora_2.safetensors")
    assert files.suffixed(p, 11) == Path("/x/lora_11.safetensors")


def test_new_names_never_replace_and_overwrite_replaces(files, tmp_path, umask_022):
    folder = tmp_path / "out" / "deeper"  # created, parents and all
    seen: list[str] = []
    fds = _open_fds()
    first = files.write_atomic(str(folder / "lora.safetensors"), _writer("one", seen), overwrite=False)
    assert first == folder / "lora.safetensors" and first.read_text() == "one"
    # the temporary file was a hidden '*.tmp' next to the target (a rename within one folder is atomic)
    assert Path(seen[0]).parent == folder and Path(seen[0]).name.startswith(".") and seen[0].endswith(".tmp")
    assert (first.stat().st_mode & 0o777) == 0o644  # 0666 minus the umask, not mkstemp's 0600
    second = files.write_atomic(folder / "lora.safetensors", _writer("two"), overwrite=False)
    third = files.write_atomic(folder / "lora.safetensors", _writer("three"), overwrite=False)
    assert second == folder / "lora_2.safetensors" and third == folder / "lora_3.safetensors"
    assert [p.read_text() for p in (first, second, third)] == ["one", "two", "three"]
    replaced = files.write_atomic(folder / "lora_2.safetensors", _writer("new two"))  # overwrite is the default
    assert replaced == second and second.read_text() == "new two" and first.read_text() == "one"
    assert (second.stat().st_mode & 0o777) == 0o644
    # no temporary file is left and no descriptor is leaked
    assert sorted(p.name for p in folder.iterdir()) == ["lora.safetensors", "lora_2.safetensors",
                                                       "lora_3.safetensors"]
    assert _open_fds() == fds


def test_the_file_is_flushed_before_it_gets_its_name(files, tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(target), Path(target).read_text()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = files.write_atomic(tmp_path / "state.safetensors", _writer("payload"), overwrite=False)
    assert len(synced) == 1 and synced[0][0].endswith(".tmp") and synced[0][1] == "payload"
    assert path.read_text() == "payload"


def test_a_failed_write_leaves_nothing_under_any_name(files, tmp_path):
    (tmp_path / "lora.safetensors").write_text("kept")
    seen: list[str] = []

    def broken(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    for overwrite in (True, False):
        with pytest.raises(RuntimeError, match="disk full"):
            files.write_atomic(tmp_path / "lora.safetensors", broken, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
    assert (tmp_path / "lora.safetensors").read_text() == "kept" and not any(os.path.exists(t) for t in seen)


def test_without_hard_links_names_are_still_claimed_exclusively(files, tmp_path, monkeypatch, umask_022):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what a filesystem without hard links answers

    monkeypatch.setattr(os, "link", no_links)
    paths = [files.write_atomic(tmp_path / "lora.safetensors", _writer(t), overwrite=False) for t in ("a", "b")]
    assert paths == [tmp_path / "lora.safetensors", tmp_path / "lora_2.safetensors"]
    assert [p.read_text() for p in paths] == ["a", "b"]
    assert (paths[1].stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "lora_2.safetensors"]


def test_running_out_of_numbered_names_is_refused_by_name(files, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_SUFFIX", 4)  # tries lora, lora_2, lora_3
    for _ in range(3):
        files.write_atomic(tmp_path / "lora.safetensors", _writer("x"), overwrite=False)
    with pytest.raises(FileExistsError, match=r"lora\.safetensors and 2 numbered variants of it exist; choose"):
        files.write_atomic(tmp_path / "lora.safetensors", _writer("y"), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "lora_2.safetensors",
                                                          "lora_3.safetensors"]
