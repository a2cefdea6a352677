"""Inspecting uploads without running user code in the API process.

``torch.jit.load`` executes code from the archive, so the layer inventory runs in a
child process. The worker's sandbox (``worker.sandbox.inspect_model``: the same
isolation as jobs) is used when the worker code is installed; as the fallback for an
API-only install, :func:`subprocess_inspect_model` runs ``python -m compression.cli
inspect ... --json`` with a scrubbed environment, its own scratch directory, resource
limits and a wall-clock timeout. Data sets get the same treatment through :mod:`app.services.dataset_probe`.

Both inspectors raise :class:`InspectionError` (``code`` + ``message`` the user can act
on); the API answers it with a 422.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ModelInspector = Callable[[Path, str, float], dict[str, Any]]
DatasetInspector = Callable[[Path, str | None, float], dict[str, Any]]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_ENGINE_ERROR = re.compile(r"error \((?P<code>[a-z_]+)\): (?P<message>.*)", re.S)
_MAX_OUTPUT = 8 << 20


class InspectionError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def default_model_inspector(hide: list[Path] | None = None) -> ModelInspector:
    """The worker's sandbox (same isolation as jobs), hiding ``hide`` (data, storage) from
    the child; the plain subprocess inspector where the worker code is not installed."""
    try:
        from worker.sandbox import inspect_model
    except ImportError:
        return subprocess_inspect_model
    return functools.partial(inspect_model, hide=hide)


def default_dataset_inspector(hide: list[Path] | None = None) -> DatasetInspector:
    try:
        from worker.sandbox import inspect_dataset
    except ImportError:
        return subprocess_inspect_dataset
    return functools.partial(inspect_dataset, hide=hide)


def subprocess_inspect_model(path: Path, input_spec: str, timeout: float) -> dict[str, Any]:
    """The layer table of a TorchScript file, computed in a child process."""
    cmd = [sys.executable, "-s", "-m", "compression.cli", "inspect", str(path), "--input-shape", input_spec, "--json"]
    return _run_json(cmd, timeout, what="model")


def subprocess_inspect_dataset(path: Path, fmt: str | None, timeout: float) -> dict[str, Any]:
    """Keys and shapes (npz) or classes and image count (zip), read in a child process."""
    cmd = [sys.executable, "-s", "-m", "app.services.dataset_probe", str(path)]
    if fmt:
        cmd += ["--format", fmt]
    return _run_json(cmd, timeout, what="data set")


def _limits(cpu_seconds: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec: keep it to syscalls
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    return apply


def _run_json(cmd: list[str], timeout: float, *, what: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tt-inspect-") as scratch:
        # Nothing from the API's environment (database URL, secret key) reaches the child.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": scratch,
            "TMPDIR": scratch,
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(_REPO_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "2",
        }
        proc = subprocess.Popen(  # noqa: S603
            cmd,
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits(int(timeout) + 1),  # noqa: PLW1509
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise InspectionError(
                "inspect_timeout", f"inspecting the {what} took longer than {timeout:g} s; check the input shape"
            ) from None
    if proc.returncode == 0:
        try:
            result = json.loads(out[:_MAX_OUTPUT])
        except ValueError:
            raise InspectionError("inspect_failed", f"the {what} inspector printed no valid JSON") from None
        if not isinstance(result, dict):
            raise InspectionError("inspect_failed", f"the {what} inspector printed no JSON object")
        return result
    text = err.decode("utf-8", "replace").strip()
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise InspectionError(
            "inspect_crashed", f"loading the {what} crashed the inspector ({name}); the file may be damaged or crafted"
        )
    if m := _ENGINE_ERROR.search(text):  # the engine's "error (code): message" line
        raise InspectionError(m.group("code"), m.group("message").strip().splitlines()[0])
    try:
        payload = json.loads(out[:_MAX_OUTPUT])
        raise InspectionError(payload["error"]["code"], payload["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    log.warning("inspector exited %s: %s", proc.returncode, text[-2000:])
    last = text.splitlines()[-1] if text else "no output"
    raise InspectionError("inspect_failed", f"the {what} could not be inspected: {last[:500]}")
