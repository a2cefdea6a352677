"""Hostile TorchScript models through the real API (sandboxed inspection) and a real Celery
worker (sandboxed job child), in full mode on Postgres and a private Redis.

What a TorchScript archive can do: its scripted ``__setstate__`` runs inside
``torch.jit.load`` and its ``forward`` runs during inspection and compression, and
both may call ``torch.from_file``, which reads (``shared=False``) and writes
(``shared=True``) host files. TorchScript has no socket API, and ``from_file`` cannot
read ``/proc`` files (they report size 0), so the network is checked with a plain
Python child under the same sandbox instead.

The models below steal a planted secret (placed in the data directory, where the
service keeps its database, storage and configuration) into a tensor that flows into
the model's output, or write into a file outside the job's scratch. The job may fail
or succeed; what must hold: no secret (the planted file's content, the database URL,
the broker URL, the secret key) appears in any response, event, log or artifact;
the file outside scratch is unchanged; the child had no network.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.test_faults_support import SECRET_KEY, FullStack, PrivateRedis, model_file_bytes
from tests.test_worker_support import TinyNet, wait_for

ROOT = os.geteuid() == 0
SECRET_LEN = 48


class Thief(torch.nn.Module):
    """``mode`` 0: ``__setstate__`` reads ``path`` into ``loot``, which ``forward`` adds to
    its output (so a compressed model would carry it). ``mode`` 1: writes 'XXXX' into ``path``."""

    def __init__(self, path: str, mode: int) -> None:
        super().__init__()
        self.path = path
        self.mode = mode
        self.loot = torch.zeros(SECRET_LEN, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.loot.float().sum() * 1e-30

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, bool]:
        return (self.path, self.mode, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, bool]) -> None:
        self.path = state[0]
        self.mode = state[1]
        self.training = state[2]
        if self.mode == 0:
            self.loot = torch.from_file(self.path, shared=False, size=48, dtype=torch.uint8).clone()
        else:
            written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
            written.fill_(88)
            self.loot = written.clone()


class ForwardThief(torch.nn.Module):
    """Reads ``path`` in ``forward`` itself: runs during inspection and compression."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loot = torch.from_file(self.path, shared=False, size=48, dtype=torch.uint8)
        return x + loot.float().sum() * 1e-30


class HostileNet(TinyNet):
    def __init__(self, thief: torch.nn.Module) -> None:
        super().__init__()
        self.thief = thief

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.thief(x)
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def hostile(pg_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("hostile")
    redis = PrivateRedis(tmp / "redis")
    stack = FullStack(pg_database(), redis.url, tmp)
    try:
        planted = secrets.token_hex(SECRET_LEN // 2).encode()  # SECRET_LEN printable bytes
        secret_file = stack.data_dir / "secrets.env"
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_bytes(planted)
        stored_secret = stack.settings.storage_dir / "models" / "ff" / ("f" * 32)  # "another user's upload"
        stored_secret.parent.mkdir(parents=True, exist_ok=True)
        stored_secret.write_bytes(planted)
        outside = tmp / "outside"
        outside.mkdir(mode=0o777)
        outside.chmod(0o777)
        victim = outside / "victim.bin"
        victim.write_bytes(b"safe")
        victim.chmod(0o666)
        worker = stack.worker("hostile")
        yield {"stack": stack, "redis": redis, "worker": worker, "planted": planted, "secret_file": secret_file,
               "stored_secret": stored_secret, "victim": victim, "tmp": tmp}
    finally:
        stack.close()
        redis.stop()


def _secrets(h: dict) -> list[bytes]:
    st: FullStack = h["stack"]
    return [h["planted"], SECRET_KEY.encode(), st.db_url.encode(), st.redis_url.encode(),
            st.settings.database_url.split("@")[-1].encode()]


def _assert_clean(h: dict, blob: bytes, where: str) -> None:
    for s in _secrets(h):
        assert s not in blob, f"a secret ({s[:12]!r}...) leaked into {where}"


def test_the_attack_is_real_outside_the_sandbox(hostile: dict, tmp_path: Path) -> None:
    """Control: loaded in an unsandboxed process, the model does steal the file."""
    path = tmp_path / "thief.pt"
    path.write_bytes(model_file_bytes(HostileNet(Thief(str(hostile["secret_file"]), 0))))
    loaded = torch.jit.load(str(path))
    assert bytes(loaded.thief.loot.tolist()) == hostile["planted"]


def test_hostile_upload_inspection_sees_no_secret(hostile: dict) -> None:
    st: FullStack = hostile["stack"]
    before = sorted(p for p in st.settings.storage_dir.rglob("*") if p.is_file())
    for module in (Thief(str(hostile["stored_secret"]), 0), ForwardThief(str(hostile["secret_file"]))):
        r = st.upload(model_file_bytes(HostileNet(module)), input_spec="3,16,16")
        _assert_clean(hostile, r.content, f"the upload response ({r.status_code})")
        assert r.status_code in (201, 422), r.text
        if r.status_code == 422:
            body = r.json()
            assert body["code"] in ("bad_archive", "input_spec_mismatch", "unsupported_model", "conversion_failed",
                                    "inspect_failed", "inspect_crashed"), body
            assert "Traceback" not in body["detail"]
    after = sorted(p for p in st.settings.storage_dir.rglob("*") if p.is_file())
    assert len(after) - len(before) <= 2 and hostile["stored_secret"] in after  # nothing else written


def _events(st: FullStack, job_id: str) -> bytes:
    r = st.client.get(f"/api/v1/jobs/{job_id}/events", headers=st.headers, params={"after": 0})
    assert r.status_code == 200
    return r.content


def test_hostile_jobs_leak_nothing_and_write_nothing_outside_scratch(hostile: dict) -> None:
    st: FullStack = hostile["stack"]
    victim: Path = hostile["victim"]
    tree_before = {p for p in hostile["tmp"].rglob("*") if p.is_file() and "storage" not in p.parts
                   and "scratch" not in p.parts and p.suffix != ".log"}
    models = {
        "read-data-dir": HostileNet(Thief(str(hostile["secret_file"]), 0)),
        "read-storage": HostileNet(ForwardThief(str(hostile["stored_secret"]))),
        "write-outside": HostileNet(Thief(str(victim), 1)),
    }
    jobs = {}
    for name, module in models.items():
        r = st.upload(model_file_bytes(module))  # no input_spec: stored after the pre-check only
        assert r.status_code == 201, r.text
        jobs[name] = st.submit(r.json()["id"])["id"]

    def all_done() -> bool:
        st.reconcile()
        return all(st.job(j)["status"] in ("succeeded", "failed") for j in jobs.values())

    wait_for(all_done, 300, "every hostile job to finish", hostile["worker"].tail)
    assert victim.read_bytes() == b"safe"
    assert hostile["secret_file"].read_bytes() == hostile["planted"]
    for name, job_id in jobs.items():
        detail = st.client.get(f"/api/v1/jobs/{job_id}", headers=st.headers)
        _assert_clean(hostile, detail.content, f"job {name}")
        _assert_clean(hostile, _events(st, job_id), f"the events of job {name}")
        job = detail.json()
        if job["status"] == "failed":
            assert "Traceback" not in job["error"]["message"], job["error"]
        names = {a["name"] for a in job["artifacts"]}
        assert "job.log" in names, job
        log = b""
        for a in job["artifacts"]:
            r = st.client.get(a["url"], headers=st.headers)
            assert r.status_code == 200
            _assert_clean(hostile, r.content, f"artifact {a['name']} of job {name}")
            if a["name"] == "job.log":
                log = r.content
        if ROOT:
            m = re.search(rb"isolation (\{.*\})", log)
            assert m, log[-2000:]
            iso = json.loads(m.group(1))
            assert iso["network"] and iso["mounts"] and iso["readonly_root"] and iso["no_capabilities"], iso
            assert iso["unprivileged_user"] or not _code_open_to_others(), iso
    _assert_clean(hostile, Path(hostile["worker"].log_path).read_bytes(), "the worker's log")
    tree_after = {p for p in hostile["tmp"].rglob("*") if p.is_file() and "storage" not in p.parts
                  and "scratch" not in p.parts and p.suffix != ".log"}
    assert tree_after == tree_before, tree_after ^ tree_before
    if ROOT:  # the reads were hidden, not merely unlucky: the stealing jobs failed on the read
        for name in ("read-data-dir", "read-storage"):
            assert st.job(jobs[name])["status"] == "failed", name


@pytest.mark.skipif(not ROOT, reason="network namespaces need root (or CAP_SYS_ADMIN)")
def test_sandboxed_child_has_no_network(hostile: dict, tmp_path: Path) -> None:
    """Plain Python under the job sandbox: no route to Postgres, Redis or anywhere else."""
    import io

    from worker.sandbox import Limits, Sandbox

    redis_port = int(hostile["redis"].port)
    probe = (
        "import socket, pathlib\n"
        "out = []\n"
        f"for host, port in (('127.0.0.1', 5432), ('127.0.0.1', {redis_port}), ('1.1.1.1', 53)):\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    out.append(f'{host}:{port}=' + str(s.connect_ex((host, port))))\n"
        "out.append('ifaces=' + ','.join(sorted(l.split(':')[0].strip() for l in "
        "pathlib.Path('/proc/net/dev').read_text().splitlines()[2:])))\n"
        "pathlib.Path('result.json').write_text(repr(out))\n"
    )
    scratch = tmp_path / "scratch" / "job"
    scratch.mkdir(parents=True)
    box = Sandbox(scratch, "", limits=Limits(30, 30, 1 << 20, 64, 4096, None), log=io.StringIO(),
                  scratch_root=scratch.parent, command=["-c", probe])
    assert box.finish() == 0
    assert box.isolation.network, box.isolation
    out = (scratch / "result.json").read_text()
    assert "ifaces=lo'" in out, out
    for target in ("127.0.0.1:5432", f"127.0.0.1:{redis_port}", "1.1.1.1:53"):
        code = int(re.search(re.escape(target) + r"=(\d+)", out).group(1))  # type: ignore[union-attr]
        assert code != 0, f"the sandbox reached {target}: {out}"
    # Control: the same probe outside the sandbox does reach the private Redis.
    plain = subprocess.run([sys.executable, "-c", probe.replace("result.json", str(tmp_path / "plain.txt"))],
                           cwd=tmp_path, timeout=30)
    assert plain.returncode == 0
    assert f"127.0.0.1:{redis_port}=0" in (tmp_path / "plain.txt").read_text()


def _code_open_to_others() -> bool:
    from worker.sandbox import interpreter_paths, open_to_others

    return all(open_to_others(p, 0o005) for p in interpreter_paths())


@pytest.mark.skipif(not ROOT, reason="changing user needs root")
@pytest.mark.skipif(not _code_open_to_others(), reason="the checkout or interpreter is closed to other users "
                                                      "(0700): the child keeps uid 0 and says so")
def test_sandboxed_child_cannot_read_root_only_files(tmp_path: Path) -> None:
    """A root child without capabilities still owns root's files; the child runs as nobody."""
    import io

    from worker.sandbox import Limits, Sandbox, child_id

    planted = secrets.token_hex(16)
    loose = Path("/tmp") / f"tensortrim-root-only-{planted[:8]}"  # in a directory nobody can pass
    loose.write_text(planted)
    loose.chmod(0o600)
    probe = (
        "import os, pathlib\n"
        "out = [f'uid={os.getuid()}']\n"
        f"for p in ({str(loose)!r}, '/etc/shadow', {str(tmp_path / 'closed' / 'key')!r}):\n"
        "    try:\n"
        "        out.append(p + '=' + pathlib.Path(p).read_text())\n"
        "    except OSError as e:\n"
        "        out.append(p + '=' + type(e).__name__)\n"
        "pathlib.Path('result.json').write_text(repr(out))\n"
    )
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "key").write_text(planted)
    scratch = tmp_path / "scratch" / "job"
    scratch.mkdir(parents=True)
    try:
        box = Sandbox(scratch, "", limits=Limits(30, 30, 1 << 20, 64, 4096, None), log=io.StringIO(),
                      scratch_root=scratch.parent, command=["-c", probe])
        assert box.finish() == 0
        assert box.isolation.unprivileged_user and box.isolation.complete, box.isolation
        out = (scratch / "result.json").read_text()
        assert f"uid={child_id(box.pid)}" in out and planted not in out, out
        assert f"{loose}=PermissionError" in out, out
        # Control: the same probe outside the sandbox (as root) reads them all.
        plain = subprocess.run([sys.executable, "-c", probe.replace("result.json", str(tmp_path / "plain.txt"))],
                               cwd=tmp_path, timeout=30)
        assert plain.returncode == 0
        assert (tmp_path / "plain.txt").read_text().count(planted) == 2
    finally:
        loose.unlink()


@pytest.mark.skipif(not ROOT, reason="changing user needs root")
@pytest.mark.skipif(not _code_open_to_others(), reason="the checkout or interpreter is closed to other users "
                                                      "(0700): the child keeps uid 0 and says so")
def test_one_jobs_child_cannot_signal_or_read_another_jobs_child(tmp_path: Path) -> None:
    """Two jobs' children at once: each runs as its own user, so the second cannot kill the
    first (with one shared user it could), and its /proc (hidepid) does not even list the
    first: no environment or memory to read (with one shared user the environment was readable)."""
    import io

    from worker.sandbox import CHILD_ID_BASE, Limits, Sandbox, child_id

    def box(name: str, code: str) -> Sandbox:
        scratch = tmp_path / "scratch" / name
        scratch.mkdir(parents=True)
        return Sandbox(scratch, "", limits=Limits(60, 60, 1 << 20, 64, 4096, None), log=io.StringIO(),
                       scratch_root=scratch.parent, command=["-c", code])

    victim = box("victim", "import time; time.sleep(60)")
    try:
        probe = (
            "import os, pathlib, signal\n"
            f"pid, out = {victim.pid}, [f'uid={{os.getuid()}}']\n"
            "for what, act in (('kill', lambda: os.kill(pid, signal.SIGKILL)),\n"
            "                  ('environ', lambda: open(f'/proc/{pid}/environ', 'rb').read()),\n"
            "                  ('mem', lambda: open(f'/proc/{pid}/mem', 'rb').read(1))):\n"
            "    try:\n"
            "        act()\n"
            "        out.append(what + '=done')\n"
            "    except OSError as e:\n"
            "        out.append(what + '=' + type(e).__name__)\n"
            "pids = {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
            "out.append(f'sees_victim={pid in pids} sees_self={os.getpid() in pids}')\n"
            "pathlib.Path('result.txt').write_text(' '.join(out))\n"
        )
        attacker = box("attacker", probe)
        assert attacker.finish() == 0
        out = (tmp_path / "scratch" / "attacker" / "result.txt").read_text()
        assert out == (f"uid={child_id(attacker.pid)} kill=PermissionError environ=FileNotFoundError "
                       "mem=FileNotFoundError sees_victim=False sees_self=True")
        assert victim.poll() is None  # still running: the kill did not land
        assert victim.isolation.unprivileged_user and attacker.isolation.unprivileged_user
        assert attacker.isolation.private_proc and attacker.isolation.to_dict()["private_proc"]
        assert child_id(victim.pid) == CHILD_ID_BASE + victim.pid != child_id(attacker.pid)
    finally:
        victim.kill("test over")
        victim.finish()
