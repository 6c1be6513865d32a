"""Image-file listing and atomic file writes (standard library only).

`scan_image_folder` is the ImageFolder listing the trainer, `supmae-eval` and `supmae-embed` share: one folder
always gives the same order and the same labels. Writes go through a temp file in the target's folder and a
rename, so a reader (or a job resumed after SIGKILL) never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# the file names of the formats `supmae_serve.preprocess` decodes (its FORMATS: JPEG, PNG, WebP, GIF, BMP, TIFF)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad training/evaluation/embedding data; the message names the path and what is wrong."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(root: str | Path) -> list[Path]:
    """Every image file under `root` (recursively, hidden folders and files skipped), sorted."""
    root = Path(root)
    return sorted(
        f
        for f in root.rglob("*")
        if is_image_file(f) and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """List `root/<class>/<file>` images -> ([(path, class_index)], class_names), sorted, so the same
    folder always gives the same order and labels."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data path does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder in ImageFolder layout (root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders found (expected root/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    empty = []
    for idx, name in enumerate(classes):
        files = sorted(
            f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        samples.extend((f, idx) for f in files)
    if empty:
        raise DataError(
            f"{root}: class folders with no images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}"
        )
    return samples, classes


def scan_images(root: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """An ImageFolder (`root/<class>/<image>`) -> (paths, labels, class names), or a flat folder of images
    -> (paths, None, None); sorted. For inputs that may or may not be labelled (calibration images)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder of images (flat, or root/<class>/<image>)")
    files = sorted(f for f in root.iterdir() if is_image_file(f) and not f.name.startswith("."))
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        try:
            samples, classes = scan_image_folder(root)
            return [p for p, _ in samples], [y for _, y in samples], classes
        except DataError:
            if not files:  # class folders, some without images, and nothing beside them: say which
                raise
    if not files:
        raise DataError(f"{root}: no images found ({', '.join(IMAGE_EXTENSIONS)}), flat or in class folders")
    return files, None, None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path beside `path`, fsync it, then rename it to `path`.

    The temp name starts with a dot and ends in `.tmp`, so listings of finished files never see it; a
    process killed before the rename leaves only such a temp file (see `remove_stale_temp_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be readable like any file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files `atomic_write` leaves when its process is killed mid-write; returns them."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
