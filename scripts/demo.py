"""The main job on the embedded default, end to end: start `tensortrim serve`
(SQLite, in-process worker, local storage), train a small CNN on sklearn's
digits, upload it and its data through the REST API, compress it 3x in MACs
with fine-tuning, follow the live progress, and download the verified results.

Run: python scripts/demo.py [--exit] [--port 8000] [--data-dir demo-data]
With --exit the server stops after the job; otherwise it keeps serving the web
page (http://127.0.0.1:PORT/ui) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.digits import digits, trained_cnn  # noqa: E402  (the same model the tests train)


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in time")


def check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise SystemExit(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                         f"{response.text}")
    return response.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", default=str(ROOT / "demo-data"))
    parser.add_argument("--budget", default="flops:3x")
    parser.add_argument("--exit", action="store_true", help="stop the server when the job is done")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    cli = [sys.executable, "-m", "app.cli"]

    server = subprocess.Popen([*cli, "serve", "--port", str(args.port), "--data-dir", str(data_dir)], cwd=ROOT)
    try:
        wait_ready(base, server)
        key = subprocess.run([*cli, "keys", "create", "--user", "demo", "--data-dir", str(data_dir)], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.strip()
        client = httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120)

        print("training a small CNN on sklearn's digits ...", flush=True)
        model_file = data_dir / "digits_cnn.pt"
        torch.jit.save(torch.jit.script(trained_cnn()), str(model_file))
        train, test = digits()
        buf = io.BytesIO()
        np.savez(buf, x=train.x[0].numpy(), y=train.y.numpy())

        model = check(client.post("/models", params={"input_spec": "1,8,8", "name": "digits-cnn"},
                                  content=model_file.read_bytes()))
        inv = model['inventory']
        print(f"uploaded model {model['id']}: {inv['total_macs']} MACs, {inv['total_params']} params, "
              f"{len(inv['layers'])} layers")
        dataset = check(client.post("/datasets", params={"name": "digits-train"}, content=buf.getvalue()))
        job = check(client.post("/jobs", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                               "budget": args.budget, "finetune": {"epochs": 4, "lr": 0.05}}))
        print(f"job {job['id']} queued ({args.budget}); following its progress ...", flush=True)
        while True:
            job = check(client.get(f"/jobs/{job['id']}"))
            eta = f", ETA {job['eta_seconds']:.0f}s" if job.get("eta_seconds") else ""
            print(f"  {job['status']:<10} {job.get('phase') or '':<10} {100 * job['progress']:5.1f}%{eta}", flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        if job["status"] != "succeeded":
            print(json.dumps(job.get("error"), indent=2))
            return 1
        out = data_dir / "out"
        out.mkdir(exist_ok=True)
        for artifact in job["artifacts"]:
            blob = client.get(f"/jobs/{job['id']}/artifacts/{artifact['name']}").content
            assert hashlib.sha256(blob).hexdigest() == artifact["sha256"], artifact["name"]
            (out / artifact["name"]).write_bytes(blob)
        compressed = torch.jit.load(str(out / "model.pt"))
        original = torch.jit.load(str(model_file))
        with torch.no_grad():
            acc = {n: (m(*test.x).argmax(1) == test.y).float().mean().item()
                   for n, m in (("original", original), ("compressed", compressed))}
        report = json.loads((out / "report.json").read_text())
        print(f"\nMACs {report['macs_before']} -> {report['macs_after']} ({report['macs_ratio']:.2f}x fewer), "
              f"params {report['params_ratio']:.2f}x fewer")
        print(f"top-1 on 497 unseen digits: original {acc['original']:.4f}, compressed {acc['compressed']:.4f}")
        print(f"files (checksums verified) in {out}: {', '.join(sorted(a['name'] for a in job['artifacts']))}")
        print(f"\nweb page: {base}/ui  (sign in with the key: {key})")
        if not args.exit:
            print("serving until Ctrl-C ...")
            server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
