"""The untrusted side of an upload inspection: ``python -m worker.inspect_child KIND ...``,
run by :func:`worker.sandbox.inspect_model` / :func:`worker.sandbox.inspect_dataset` in
a scratch directory holding a copy of the upload, under the same isolation as a job.

``model FILE SPEC``: the layer table (``torch.jit.load`` runs code from the archive).
``dataset FILE [FORMAT]``: keys and shapes or classes, from headers only.

Writes ``result.json``: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "code":
..., "message": ...}``. Nothing it says is trusted: the parent re-checks the shape.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def _inspect_model(path: str, spec_text: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from compression.archive import precheck_archive
    from compression.input_spec import InputSpec
    from compression.inventory import build_inventory
    from compression.pipeline import load_editable

    precheck_archive(path)
    spec = InputSpec.parse(spec_text)
    _, editable = load_editable(path, spec)
    return {"route": editable.route, **build_inventory(editable.gm, spec).to_dict()}


def _inspect_dataset(path: str, fmt: str | None) -> dict[str, Any]:
    import zipfile

    from app.services.dataset_probe import BadDataset, probe

    try:
        return probe(path, fmt)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BadDataset(f"damaged archive: {e}") from None


def run(argv: list[str]) -> dict[str, Any]:
    from compression.errors import TensorTrimError

    try:
        if argv[:1] == ["model"] and len(argv) == 3:
            return {"ok": True, "result": _inspect_model(argv[1], argv[2])}
        if argv[:1] == ["dataset"] and len(argv) in (2, 3):
            return {"ok": True, "result": _inspect_dataset(argv[1], argv[2] if len(argv) == 3 else None)}
        return {"ok": False, "code": "inspect_failed", "message": f"bad inspector arguments: {argv!r}"}
    except TensorTrimError as e:
        return {"ok": False, "code": e.code, "message": e.message}
    except MemoryError:
        return {"ok": False, "code": "out_of_memory", "message": "inspecting the upload ran out of memory"}
    except Exception as e:  # noqa: BLE001  (dataset_probe.BadDataset and the unexpected)
        code, message = getattr(e, "code", None), getattr(e, "message", None)
        if isinstance(code, str) and isinstance(message, str):
            return {"ok": False, "code": code, "message": message}
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "code": "inspect_failed",
                "message": f"the upload could not be inspected ({type(e).__name__}); it may be damaged"}


def main() -> int:
    os.dup2(2, 1)  # whatever the model prints goes to the log, never anywhere else
    result = run(sys.argv[1:])
    Path("result.json.tmp").write_text(json.dumps(result))
    os.replace("result.json.tmp", "result.json")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
