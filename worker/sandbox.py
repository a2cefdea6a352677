"""Run ``python -m worker.child JOB.json`` as an untrusted child process.

Loading a TorchScript archive runs code from the archive, so the process that does it
holds nothing worth stealing and can reach little:

* environment: only PATH, HOME (= scratch), LANG, PYTHONPATH (the code), thread counts
  and CUDA_VISIBLE_DEVICES on GPU jobs. No database, broker or ``TENSORTRIM_*`` values.
* cwd = its own scratch directory, holding copies of its inputs.
* its own session / process group, so a cancel or timeout kills everything it started,
  and ``PR_SET_PDEATHSIG`` so it dies with its supervisor.
* rlimits: CPU seconds, file size, open files, processes, no core dumps; address space
  on CPU jobs only (CUDA reserves huge virtual ranges: memory there is the cgroup's job).
* when the supervisor is root (or holds CAP_SYS_ADMIN): a new network namespace (no
  network at all), a new mount namespace in which the data directory, storage and the
  other jobs' scratch directories are hidden and every mount except its own scratch is
  read-only, an empty capability bounding set (so the child cannot undo any of it), and
  an unprivileged user of its own (a root child, even without capabilities, still owns
  every root-owned file: /etc/shadow, /root/.ssh, a 0600 settings file). Its own, not a
  shared ``nobody``: one user's model must not signal, ptrace or read the memory of
  another job's child, nor share its process limit (``child_id``); its /proc is a procfs
  of its own with ``hidepid=2``, listing only its own processes. Directories
  that other users cannot traverse on the way to what the child needs (the interpreter
  under /root/.pyenv, a 0700 temporary directory holding the code or the scratch) are
  covered by an empty tmpfs in which only those paths are bound back.
  Without privileges this part is skipped and recorded; ``require_isolation`` refuses.

The parent does not trust what the child reports about itself: it reads the child's
namespaces, mounts, capabilities and environment from ``/proc/<pid>`` after the start.
Progress arrives as JSON lines on the child's stdout, parsed defensively; stderr goes
to the job log, size-capped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Linux constants (not all exposed by Python 3.11's os module).
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

MAX_LINE = 64 * 1024  # longer protocol lines are dropped
MAX_EVENTS = 10_000
ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ")
CODE_ROOT = Path(__file__).resolve().parent.parent  # the directory holding worker/ and compression/
NOBODY = 65534  # nobody / nogroup: the fallback where the namespace maps no per-child ids
CHILD_ID_BASE = 1 << 28  # a child's uid and gid: this plus its pid (unique among live processes)

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Limits:
    wall_s: float
    cpu_s: int
    file_bytes: int
    open_files: int
    processes: int
    memory_bytes: int | None  # RLIMIT_AS; None on GPU jobs


@dataclass
class Isolation:
    """What the parent saw of the running child (from /proc, not from the child)."""

    attempted: bool
    network: bool = False
    mounts: bool = False
    readonly_root: bool = False
    no_capabilities: bool = False
    unprivileged_user: bool = False
    private_proc: bool = False  # its /proc lists only its own user's processes (hidepid)
    note: str = ""

    @property
    def complete(self) -> bool:
        # unprivileged_user is reported, not required: it needs the code and interpreter
        # readable by other users, which a 0700 checkout is not (see _make_reachable)
        return self.network and self.mounts and self.readonly_root and self.no_capabilities

    def to_dict(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "network": self.network, "mounts": self.mounts,
                "readonly_root": self.readonly_root, "no_capabilities": self.no_capabilities,
                "unprivileged_user": self.unprivileged_user, "private_proc": self.private_proc,
                "note": self.note}


@dataclass
class Progress:
    phase: str
    fraction: float
    message: str


def child_env(scratch: Path, *, threads: int, cuda_devices: str | None) -> dict[str, str]:
    """The complete environment of the child: nothing else is inherited."""
    env = {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update({
        "HOME": str(scratch),
        "TMPDIR": str(scratch / "tmp"),
        "PYTHONPATH": str(CODE_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
    })
    env["CUDA_VISIBLE_DEVICES"] = cuda_devices if cuda_devices is not None else ""
    return env


def can_isolate() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


def _mountinfo() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount this process sees."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces etc.
            flags = 0
            for opt in fields[5].split(","):
                flags |= _MOUNT_FLAGS.get(opt, 0)
            mounts.append((point, flags))
    return mounts


def _isolate(scratch: str, scratch_root: str, hide: list[str]) -> None:
    """In the forked child, before exec: new network + mount namespaces, hide what is
    not the child's, make everything but scratch read-only, drop every capability."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A handle on scratch that belongs to the new namespace (a bind source must).
    _mount(scratch, scratch, None, MS_BIND)
    keep = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    for path in hide:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,mode=0755")
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND)
    # The other jobs' scratch directories disappear; ours comes back at the same path.
    _mount("tmpfs", scratch_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16k,mode=0755")
    os.makedirs(scratch, exist_ok=True)
    _mount(f"/proc/self/fd/{keep}", scratch, None, MS_BIND)
    os.close(keep)
    os.chmod(scratch, 0o755)  # the child's own; the covers below need it open to pass through
    if _procfs_mounts_are_private():
        with contextlib.suppress(OSError):  # reported by the parent (private_proc)
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    drop_user = _make_reachable([scratch, *interpreter_paths()])
    for point, flags in _mountinfo():
        if point == scratch or point.startswith(scratch.rstrip("/") + "/"):
            continue
        with contextlib.suppress(OSError):  # verified from the parent afterwards
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    os.chdir(scratch)  # the inherited cwd still points into the old, now read-only, mount
    uid = child_id(os.getpid())
    if drop_user:
        for top, dirs, files in os.walk(scratch):  # the child's own files become its user's
            for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                os.lchown(name, uid, uid)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for cap in range(64):  # uid 0 gets the bounding set at exec: make it empty
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if drop_user:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # clears the permitted and effective capabilities too


def _procfs_mounts_are_private() -> bool:
    """Whether a new procfs mount has options of its own (Linux >= 5.8). Before that every
    procfs mount of a PID namespace shares one superblock, so hidepid would hide the host's
    processes from the host's own users too."""
    major, minor = (int(v) for v in re.findall(r"\d+", os.uname().release)[:2])
    return (major, minor) >= (5, 8)


def child_id(pid: int, id_maps: tuple[str, ...] = ("/proc/self/uid_map", "/proc/self/gid_map")) -> int:
    """The uid (and gid) the sandboxed child with host ``pid`` runs as: its own, since pids are
    unique among live processes, unless this user namespace does not map that id (rootless
    containers map 65,536 ids): then ``nobody``, shared with other jobs' children."""
    uid = CHILD_ID_BASE + pid
    return uid if all(_mapped(uid, id_map) for id_map in id_maps) else NOBODY


def _mapped(xid: int, id_map: str) -> bool:
    try:
        with open(id_map) as f:
            rows = [tuple(int(v) for v in line.split()) for line in f if line.strip()]
    except (OSError, ValueError):
        return False
    return any(inside <= xid < inside + count for inside, _, count in rows)


def interpreter_paths() -> list[str]:
    """What the child must reach besides its scratch: the code, the environment, the interpreter."""
    return [str(CODE_ROOT), sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)]


def open_to_others(path: str, bits: int) -> bool:
    """Whether a user other than the owner and group has ``bits`` (0o001 = x, 0o004 = r) on ``path``."""
    return os.stat(path).st_mode & bits == bits


def _make_reachable(paths: list[str]) -> bool:
    """Cover each top-most directory that other users cannot traverse on the way to one of
    ``paths`` with an empty tmpfs (so whatever else it held is gone), then bind the
    needed paths back at their own places (handles are opened before anything is
    covered). False, with nothing changed, when a needed path itself is closed to
    others (a 0700 checkout): the child then keeps uid 0 and the parent records it."""
    wanted = list(dict.fromkeys(os.path.realpath(p) for p in paths))
    if not all(open_to_others(p, 0o005) for p in wanted):
        return False
    # a path inside another needed one comes back with it
    wanted = [p for p in wanted if not any(p.startswith(q.rstrip("/") + "/") for q in wanted)]
    blocked: dict[str, list[str]] = {}  # top-most closed ancestor -> the needed paths below it
    for path in wanted:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not open_to_others(ancestor, 0o001):
                blocked.setdefault(ancestor, []).append(path)
                break
    mask = os.umask(0o022)  # the child's 077 would close the directories made below
    for cover, below in blocked.items():
        handles = [(path, os.open(path, os.O_PATH)) for path in below]
        _mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=16k,mode=0755")
        for path, fd in handles:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                open(path, "w").close()  # noqa: SIM115 - a mount point for the file
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
            os.close(fd)
    os.umask(mask)
    return True


def _preexec(limits: Limits, isolate: tuple[str, str, list[str]] | None) -> Any:
    def run() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.umask(0o077)
        if isolate is not None:
            with contextlib.suppress(OSError):  # the parent checks what took effect
                _isolate(*isolate)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 10))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))

    return run


def _ns(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def inspect_isolation(pid: int, attempted: bool) -> Isolation:
    iso = Isolation(attempted=attempted)
    if not attempted:
        iso.note = "not attempted: the worker is not root (no namespaces, read-only mounts or capability drop)"
        return iso
    iso.network = _ns(pid, "net") not in (None, _ns("self", "net"))
    iso.mounts = _ns(pid, "mnt") not in (None, _ns("self", "mnt"))
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == "/":
                    iso.readonly_root = "ro" in fields[5].split(",")
                if fields[4] == "/proc":  # the last one listed is the one on top
                    fs_type, _, options = fields[fields.index("-") + 1:][:3]
                    iso.private_proc = fs_type == "proc" and bool(re.search(r"hidepid=(2|invisible)", options))
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        iso.no_capabilities = int(status["CapBnd"].strip(), 16) == 0 and int(status["CapEff"].strip(), 16) == 0
        own = str(child_id(pid))
        iso.unprivileged_user = all(v == own for key in ("Uid", "Gid") for v in status[key].split())
        if not iso.unprivileged_user:
            iso.note = (f"the child does not run as its own user {own} ({status['Uid'].split()}): {CODE_ROOT} or "
                        "the interpreter is not readable by other users (make them o+rx to run it unprivileged)")
    except (OSError, KeyError, ValueError) as e:
        iso.note = f"could not inspect the child: {e}"
    if not iso.complete and not iso.note:
        iso.note = "partial: the kernel or container refused part of it (seccomp/AppArmor?)"
    return iso


def environ_names(pid: int) -> list[str] | None:
    """Names (never values) of the child's environment, read from /proc by the parent."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return sorted({item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item})


class Sandbox:
    """A running child. ``events`` yields progress; ``log`` receives its stderr (capped)."""

    def __init__(
        self,
        scratch: Path,
        job_file: str,
        *,
        limits: Limits,
        log: IO[str],
        threads: int = 1,
        cuda_devices: str | None = None,
        isolate: bool = True,
        scratch_root: Path | None = None,
        hide: list[Path] | None = None,
        max_log_bytes: int = 4 * 1024 * 1024,
        kill_grace_s: float = 5.0,
        command: list[str] | None = None,
    ) -> None:
        self.scratch = scratch
        self.limits = limits
        self.log = log
        self.kill_grace_s = kill_grace_s
        self.max_log_bytes = max_log_bytes
        self.events: queue.Queue[Progress] = queue.Queue(MAX_EVENTS)
        self.killed_by_us: str | None = None
        self.started = time.monotonic()
        (scratch / "tmp").mkdir(exist_ok=True)
        attempted = isolate and can_isolate()
        iso_args = None
        if attempted:
            root = (scratch_root or scratch.parent).resolve()
            iso_args = (str(scratch.resolve()), str(root), [str(p.resolve()) for p in hide or []])
        self._log_lock = threading.Lock()
        self._log_bytes = 0
        # ``command``: what follows ``python -s -P`` (default: the job child on ``job_file``).
        argv = command if command is not None else ["-m", "worker.child", job_file]
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-s", "-P", *argv],
            cwd=scratch,
            env=child_env(scratch, threads=threads, cuda_devices=cuda_devices),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own session and process group
            preexec_fn=_preexec(limits, iso_args),  # noqa: PLW1509
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.isolation = inspect_isolation(self.pid, attempted)
        self.env_names = environ_names(self.pid)
        self._threads = [
            threading.Thread(target=self._read_protocol, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- output -----------------------------------------------------------------------
    def write_log(self, text: str) -> None:
        with self._log_lock:
            self.log.write(text if text.endswith("\n") else text + "\n")
            self.log.flush()

    def _read_log(self, stream: IO[bytes]) -> None:
        truncated = False
        for chunk in iter(lambda: stream.read(65536), b""):
            if self._log_bytes + len(chunk) > self.max_log_bytes:
                if not truncated:
                    self.write_log(f"[sandbox] log truncated at {self.max_log_bytes} bytes")
                    truncated = True
                continue
            self._log_bytes += len(chunk)
            with self._log_lock:
                self.log.write(chunk.decode(errors="replace"))
                self.log.flush()

    def _read_protocol(self, stream: IO[bytes]) -> None:
        while True:
            line = stream.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):  # over-long: skip to the end of this line
                while line and not line.endswith(b"\n"):
                    line = stream.readline(MAX_LINE)
                continue
            event = parse_event(line)
            if event is not None:
                with contextlib.suppress(queue.Full):
                    self.events.put_nowait(event)

    def drain(self) -> list[Progress]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    # -- lifetime -----------------------------------------------------------------------
    def poll(self) -> int | None:
        return self.proc.poll()

    def timed_out(self) -> bool:
        return time.monotonic() - self.started > self.limits.wall_s

    def kill(self, reason: str) -> None:
        """SIGTERM to the whole group, SIGKILL after the grace period."""
        if self.killed_by_us is None:
            self.killed_by_us = reason
        for sig, wait in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Anything else left in the group (a grandchild that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def finish(self) -> int:
        rc = self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        return rc


def parse_event(line: bytes) -> Progress | None:
    """One protocol line -> Progress, or None for anything malformed or unknown."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("type") != "progress":
        return None
    phase, fraction, message = obj.get("phase"), obj.get("fraction"), obj.get("message", "")
    if not isinstance(phase, str) or not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
        return None
    if fraction != fraction:  # NaN
        return None
    if not isinstance(message, str):
        message = ""
    return Progress(phase[:64], min(max(float(fraction), 0.0), 1.0), message[:500])


@dataclass
class Outcome:
    returncode: int
    killed_by_us: str | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared helpers
def protect_process() -> None:
    """Mark this (trusted) process non-dumpable: a same-uid child without capabilities can
    then read neither its ``/proc/<pid>/environ`` (database URL, secret key) nor its memory."""
    global _protected
    if not _protected:
        with contextlib.suppress(Exception):
            _libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
        _protected = True


_protected = False


def read_result_file(path: Path, max_bytes: int) -> dict[str, Any] | None:
    """The child's ``result.json``: None if absent; ValueError unless a small regular file
    holding a JSON object."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not path.is_file() or path.is_symlink() or st.st_size > max_bytes:
        raise ValueError("result.json is not a small regular file")
    try:
        result = json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError("result.json is not JSON") from e
    if not isinstance(result, dict):
        raise ValueError("result.json is not an object")
    return result


# --------------------------------------------------------------------------- upload inspection
INSPECT_MEMORY_BYTES = 8 * 1024**3
INSPECT_FILE_BYTES = 64 << 20
INSPECT_RESULT_BYTES = 16 << 20
INSPECT_THREADS = 2


def inspect_model(path: Path, input_spec: str, timeout: float, *, hide: list[Path] | None = None,
                  memory_bytes: int | None = INSPECT_MEMORY_BYTES) -> dict[str, Any]:
    """The layer table of an uploaded TorchScript file, computed by a child under the same
    isolation as a job (scrubbed environment, own scratch, rlimits, namespaces when root,
    wall-clock timeout). ``hide``: directories the child must not see (data, storage).
    Raises :class:`app.services.sandbox.InspectionError` (``code`` + ``message``)."""
    return _inspect(path, "model.pt", ["model", "model.pt", input_spec], timeout, hide, memory_bytes, "model")


def inspect_dataset(path: Path, fmt: str | None, timeout: float, *, hide: list[Path] | None = None,
                    memory_bytes: int | None = INSPECT_MEMORY_BYTES) -> dict[str, Any]:
    """Keys and shapes (npz) or classes (image zip) of an uploaded data set, as :func:`inspect_model`."""
    args = ["dataset", "dataset.bin", *([fmt] if fmt else [])]
    return _inspect(path, "dataset.bin", args, timeout, hide, memory_bytes, "data set")


def _inspect(source: Path, name: str, args: list[str], timeout: float, hide: list[Path] | None,
             memory_bytes: int | None, what: str) -> dict[str, Any]:
    import io
    import shutil
    import tempfile

    from app.services.sandbox import InspectionError

    protect_process()
    root = Path(tempfile.mkdtemp(prefix="tt-inspect-"))
    try:
        os.chmod(root, 0o700)
        scratch = root / "job"
        scratch.mkdir(mode=0o700)
        try:
            shutil.copyfile(source, scratch / name)
        except OSError as e:
            raise InspectionError("inspect_failed", f"the {what} could not be read from storage") from e
        limits = Limits(wall_s=timeout, cpu_s=int(timeout * INSPECT_THREADS) + 5, file_bytes=INSPECT_FILE_BYTES,
                        open_files=256, processes=4096, memory_bytes=memory_bytes)
        log = io.StringIO()
        box = Sandbox(scratch, "", limits=limits, log=log, threads=INSPECT_THREADS, scratch_root=root,
                      hide=_safe_to_hide(hide or [], root), max_log_bytes=1 << 20, kill_grace_s=1.0,
                      command=["-m", "worker.inspect_child", *args])
        while box.poll() is None:
            if box.timed_out():
                box.kill("timeout")
                box.finish()
                raise InspectionError(
                    "inspect_timeout", f"inspecting the {what} took longer than {timeout:g} s; check the input shape"
                )
            time.sleep(0.05)
        rc = box.finish()
        try:
            result = read_result_file(scratch / "result.json", INSPECT_RESULT_BYTES)
        except ValueError:
            result = None
        if result is None or not isinstance(result.get("ok"), bool):
            _log_tail(log, what, rc)
            if rc == -signal.SIGKILL:
                raise InspectionError("out_of_memory", f"inspecting the {what} was killed (most often: out of memory)")
            if rc < 0:
                raise InspectionError("inspect_crashed", f"loading the {what} crashed the inspector "
                                      f"({signal.Signals(-rc).name}); the file may be damaged or crafted")
            raise InspectionError("inspect_failed", f"the {what} inspector stopped without a result (exit {rc})")
        if result["ok"] and isinstance(result.get("result"), dict):
            return result["result"]  # type: ignore[no-any-return]
        code, message = result.get("code"), result.get("message")
        if not (isinstance(code, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", code)):
            code = "inspect_failed"
        if not (isinstance(message, str) and message):
            message = f"the {what} could not be inspected"
        if code == "inspect_failed":
            _log_tail(log, what, rc)
        raise InspectionError(code, message[:2000])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _safe_to_hide(paths: list[Path], scratch_root: Path) -> list[Path]:
    """Directories to hide, minus any that holds what the child needs (code, Python, scratch)."""
    needed = [CODE_ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), scratch_root.resolve()]
    out = []
    for p in paths:
        p = p.resolve()
        if p.exists() and not any(n == p or p in n.parents for n in needed):
            out.append(p)
    return out


def _log_tail(log: Any, what: str, rc: int) -> None:
    import logging

    logging.getLogger(__name__).warning("%s inspector exited %s: %s", what, rc, log.getvalue()[-2000:])
