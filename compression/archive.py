"""Cheap sanity checks on an uploaded TorchScript archive, before any load.

Not a security boundary (loading a TorchScript file runs its code; the worker
sandbox is the boundary). These checks turn the common mistakes (a state dict, a
pickle, a truncated upload, a zip bomb) into a message that says what to fix,
instead of a crash deep inside ``torch.jit.load``.

``torch.jit.save`` in torch 2.13 writes one top-level folder holding
``data.pkl`` (the module object), ``constants.pkl`` (tensor constants),
``version``, ``code/`` (the TorchScript source ``torch.jit.load`` compiles), the
tensor records under ``data/`` and optional ``*.debug_pkl`` files. A
``torch.save`` checkpoint has ``data.pkl`` but no ``code/`` and no
``constants.pkl``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from compression.errors import ArchiveError

GiB = 1024**3

_EXPORT_HINT = "export the model with torch.jit.script(model) or torch.jit.trace(model, example) and torch.jit.save"


def precheck_archive(
    path: str | Path,
    *,
    max_entries: int = 10_000,
    max_uncompressed: int = 4 * GiB,
    max_ratio: float = 200.0,
) -> None:
    """Raise :class:`ArchiveError` unless ``path`` looks like a sane TorchScript zip."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ArchiveError(f"{name}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise ArchiveError(f"{name} is empty: upload the file written by torch.jit.save")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{name} is not a TorchScript archive (not a zip file); {_sniff(path)}{_EXPORT_HINT}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_entries(name, infos, size, max_entries, max_uncompressed, max_ratio)
            top = _check_names(name, infos)
            _check_records(name, top, {i.filename for i in infos})
            bad = zf.testzip()  # reads every entry and checks its CRC
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ArchiveError(
            f"{name} is a damaged zip archive ({exc}); the upload may be truncated: save and upload it again"
        ) from None
    if bad is not None:
        raise ArchiveError(f"{name} is damaged: entry {bad!r} fails its CRC check; save and upload the file again")


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "it is a plain pickle (torch.save with _use_new_zipfile_serialization=False, or pickle.dump): "
    return ""


def _check_entries(
    name: str, infos: list[zipfile.ZipInfo], size: int, max_entries: int, max_uncompressed: int, max_ratio: float
) -> None:
    if not infos:
        raise ArchiveError(f"{name} is an empty zip archive: {_EXPORT_HINT}")
    if len(infos) > max_entries:
        raise ArchiveError(f"{name} has {len(infos)} entries (limit {max_entries}); this is not a TorchScript model")
    total = sum(i.file_size for i in infos)
    if total > max_uncompressed:
        raise ArchiveError(
            f"{name} declares {total / GiB:.2f} GiB uncompressed (limit {max_uncompressed / GiB:.2f} GiB); "
            "the model is too large for this service"
        )
    # TorchScript stores tensors uncompressed, so a high ratio means a crafted file.
    if total > max_ratio * max(size, 1):
        raise ArchiveError(
            f"{name} expands {total / max(size, 1):.0f}x when unpacked (limit {max_ratio:.0f}x); "
            "upload the file exactly as torch.jit.save wrote it"
        )


def _check_names(name: str, infos: list[zipfile.ZipInfo]) -> str:
    tops = set()
    for info in infos:
        fn = info.filename
        if "\\" in fn or fn.startswith("/") or (len(fn) > 1 and fn[1] == ":"):
            raise ArchiveError(
                f"{name} holds an entry with an absolute or Windows path ({fn!r}); not a TorchScript file"
            )
        parts = PurePosixPath(fn).parts
        if ".." in parts:
            raise ArchiveError(
                f"{name} holds an entry that points outside the archive ({fn!r}); not a TorchScript file"
            )
        if len(parts) < 2:
            raise ArchiveError(
                f"{name} has a file {fn!r} outside a top-level folder; a TorchScript archive keeps every record "
                f"in one folder: {_EXPORT_HINT}"
            )
        tops.add(parts[0])
    if len(tops) != 1:
        raise ArchiveError(
            f"{name} has several top-level folders ({', '.join(sorted(tops)[:5])}); "
            f"a TorchScript archive has exactly one. Do not repack it: {_EXPORT_HINT}"
        )
    return tops.pop()


def _check_records(name: str, top: str, names: set[str]) -> None:
    has_code = any(n.startswith(f"{top}/code/") for n in names)
    if f"{top}/data.pkl" not in names:
        raise ArchiveError(f"{name} has no {top}/data.pkl record, so it is not a TorchScript model: {_EXPORT_HINT}")
    if not has_code:
        raise ArchiveError(
            f"{name} is a torch.save checkpoint, not TorchScript (it has no code/ folder): "
            "export with torch.jit.script or torch.jit.trace and save with torch.jit.save"
        )
    missing = [r for r in ("constants.pkl", "version") if f"{top}/{r}" not in names and f"{top}/.data/{r}" not in names]
    if missing:
        raise ArchiveError(
            f"{name} lacks the record(s) {', '.join(missing)} that torch.jit.load needs; "
            f"the archive is incomplete: {_EXPORT_HINT}"
        )
