"""The untrusted side of a job: ``python -m worker.child JOB.json``, run by
``worker.sandbox`` in the job's scratch directory.

It loads the user's model, compresses (and fine-tunes) it with the engine, writes the
outputs into ``out/`` and a ``result.json`` next to JOB.json. Progress goes to the
parent as JSON lines on the original stdout; fd 1 is then pointed at stderr, so
whatever the model or a library prints lands in the log instead of the protocol.
Nothing this process says is trusted: the parent re-checks every file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

OUTPUT_NAMES = ("model.pt", "model.pt2", "report.json", "report.html", "sweep.json", "sweep.html")
# Keys of the job file that are ours, never engine options a user could override.
_RESERVED = frozenset({"model", "model_path", "input_spec", "out_dir", "progress", "data", "labels", "sweep"})


class Protocol:
    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._last = 0.0

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self._out.write(json.dumps(obj) + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # the parent went away; it will kill us

    def progress(self, phase: str, fraction: float, message: str = "") -> None:
        self.send({"type": "progress", "phase": phase, "fraction": float(fraction), "message": str(message)[:500]})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_kwargs(compress: Any, job: dict[str, Any], log: Any) -> dict[str, Any]:
    """The job's settings that ``compress`` accepts. The engine is being extended (budget,
    method, data, fine-tuning); what this engine version does not know is logged, not fatal."""
    wanted: dict[str, Any] = {}
    for key in ("form", "ranks", "budget", "method"):
        if job.get(key) is not None:
            wanted[key] = job[key]
    if job.get("device"):
        wanted["device"] = job["device"]
    for key, value in (job.get("options") or {}).items():
        if key not in _RESERVED and key not in wanted:
            wanted[key] = value
    params = inspect.signature(compress).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if accepts_any or (k in params and k not in _RESERVED)}
    ignored = sorted(set(wanted) - set(kwargs) - {"device"})
    if ignored:
        log(f"options this engine version does not use: {', '.join(ignored)}")
    return kwargs


def run_sweep(job: dict[str, Any], kwargs: dict[str, Any], extra: list[str], out: Path, progress: Any) -> None:
    """Compress at the job's budget and at each of ``extra``. The job's own budget comes
    first, so its files become the job's model files; the curve goes to sweep.json and
    the sweep's page to sweep.html. The other budgets' models stay in scratch (a sweep
    is for choosing a budget; the chosen one is then a job of its own)."""
    from compression.pipeline import sweep

    budgets = list(dict.fromkeys([kwargs.pop("budget"), *extra]))
    report = sweep(job["model"], job["input_spec"], budgets, out_dir=out / "sweep", progress=progress, **kwargs)
    first = out / "sweep" / report["sweep"][0]["dir"]
    for name in ("model.pt", "model.pt2", "report.json", "report.html"):
        os.replace(first / name, out / name)
    os.replace(out / "sweep" / "sweep.json", out / "sweep.json")
    os.replace(out / "sweep" / "report.html", out / "sweep.html")


_OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "failed to map segment")


def out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` or anything in its cause/context chain is a failed allocation: a
    MemoryError (Python, numpy), torch's "DefaultCPUAllocator: can't allocate memory" or
    CUDA OOM, ENOMEM. The engine wraps load and forward errors in its own types (``from
    None`` keeps ``__context__``), so the chain is walked."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            return True
        if isinstance(e, (RuntimeError, OSError, ImportError)) and any(w in str(e).lower() for w in _OOM_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def oom_message() -> str:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    cap = f" (limit {limit / 1024**3:.1f} GiB)" if limit != resource.RLIM_INFINITY else ""
    return (f"the job ran out of memory{cap}; try a smaller input shape or fine-tuning batch, "
            "or ask an operator for a larger memory limit")


def run(job_path: Path, proto: Protocol) -> dict[str, Any]:
    job = json.loads(job_path.read_text())
    out = Path(job.get("out_dir", "out"))
    out.mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(f"[child] {msg}", file=sys.stderr, flush=True)

    from compression.errors import TensorTrimError

    try:
        proto.progress("load", 0.0, "checking the archive")
        from compression.archive import precheck_archive

        precheck_archive(job["model"])
        import torch

        torch.set_num_threads(max(1, int(job.get("threads", 1))))
        from compression.pipeline import compress

        kwargs = engine_kwargs(compress, job, log)
        if job.get("dataset"):  # parsed here, in the sandbox: a data set is untrusted input too
            if "data" not in inspect.signature(compress).parameters:
                log("this engine version takes no data set; it is ignored")
            else:
                from compression.data import load_dataset

                proto.progress("load", 0.5, "reading the data set")
                labels = (job.get("options") or {}).get("labels", True)
                kwargs["data"] = load_dataset(job["dataset"], input_spec=job["input_spec"], labels=bool(labels))
        t = time.perf_counter()
        sweep = (job.get("options") or {}).get("sweep")
        if sweep:
            run_sweep(job, kwargs, sweep, out, proto.progress)
        else:
            compress(job["model"], job["input_spec"], out_dir=out, progress=proto.progress, **kwargs)
        log(f"compress finished in {time.perf_counter() - t:.1f}s")
    except Exception as e:  # noqa: BLE001  (details go to the log, the user gets a summary)
        if out_of_memory(e):
            traceback.print_exc(file=sys.stderr)
            return {"ok": False, "code": "out_of_memory", "message": oom_message()}
        if isinstance(e, TensorTrimError):
            return {"ok": False, "code": e.code, "message": e.message}
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "code": "compression_failed",
                "message": f"compression failed unexpectedly ({type(e).__name__}); see the job log for details"}
    files = {}
    for name in OUTPUT_NAMES:
        path = out / name
        if path.is_file() and not path.is_symlink():
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"ok": True, "files": files}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m worker.child JOB.json", file=sys.stderr)
        return 2
    proto = Protocol()
    job_path = Path(argv[0])
    result = run(job_path, proto)
    tmp = job_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_path.with_name("result.json"))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
