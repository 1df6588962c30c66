"""Load test of ``dyvte serve`` on loopback: serial vs N concurrent clients, answers checked.

    python scripts/load_test.py --engine-dir /tmp/demo-eng --clients 8 --requests 8

Starts ``dyvte serve`` on 127.0.0.1 (or uses ``--url``, which must be a loopback address),
builds a mixed workload (synthetic scenes and questions of the demo data, different
max_tokens, some streamed, some with a system message; greedy, so answers are deterministic),
computes every answer with a single ``Pipeline.run`` in this process as the reference, then
times the same requests sent one at a time (serial) and by ``--clients`` concurrent clients
(``--requests`` each). Prints a table: requests, wall time, throughput, p50/p99 latency, wrong
answers (against the single runs), errors; the concurrent/serial throughput ratio and the mean
batch size the server formed (from /metrics). Bounded: a fixed number of requests, and no new
request after ``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"error: --url must point at a loopback address (127.0.0.0/8, ::1, localhost), got {host!r}")


def workload(n: int, max_new_limit: int, seed: int = 7) -> list[dict]:
    """``n`` mixed chat requests (OpenAI bodies) over synthetic scenes."""
    from dyvte.synth import make_dialogue

    items = []
    token_choices = [t for t in (2, 4, 8, 16) if t <= max_new_limit] or [max_new_limit]
    for i in range(n):
        samples = make_dialogue(seed, i, 2)
        buf = io.BytesIO()
        samples[0].image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = samples[i % len(samples)].question
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}]
        if i % 5 == 3:
            messages.insert(0, {"role": "system", "content": "answer with one word ."})
        items.append({"messages": messages, "max_tokens": token_choices[i % len(token_choices)],
                      "temperature": 0, "stream": i % 4 == 1})
    return items


def to_pipeline_messages(messages: list) -> list:
    """The same messages in ``Pipeline.encode_chat``'s format (images decoded as the server does)."""
    from PIL import Image

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "text":
                    parts.append(p)
                else:
                    data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def references(engine_dir: str, backend: str, policy: str, items: list[dict]) -> list[str]:
    """Each request's answer from a single Pipeline.run (stop strings: none in this workload)."""
    from dyvte.runtime import Pipeline

    with Pipeline.load(engine_dir, backend=backend) as pipe:
        return [pipe.run([pipe.encode_chat(to_pipeline_messages(it["messages"]), it["max_tokens"])], policy)[0].text
                for it in items]


class Client:
    """One keep-alive HTTP/1.1 connection (the standard library's: a light load generator, so
    that the clients' own CPU use, on the same machine, disturbs the server little)."""

    def __init__(self, url: str, timeout: float = 120.0):
        import http.client

        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)

    def ask(self, body: dict) -> tuple[str, float]:
        """Send one request; (answer text, latency s). Raises on HTTP or stream errors."""
        t0 = time.perf_counter()
        payload = json.dumps(body).encode()
        self.conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        if not body.get("stream"):
            return json.loads(r.read())["choices"][0]["message"]["content"], time.perf_counter() - t0
        text = []
        for line in r.read().decode().splitlines():  # the whole event stream, then its events
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", []):
                text.append(choice["delta"].get("content") or "")
        return "".join(text), time.perf_counter() - t0

    def close(self):
        self.conn.close()


def run_phase(url: str, items: list[dict], refs: list[str], clients: int, per_client: int, deadline: float) -> dict:
    """``clients`` threads each sending ``per_client`` requests back to back."""
    lat, wrong, errors, lock = [], [], [], threading.Lock()

    def client_loop(c: int):
        client = Client(url)
        try:
            for j in range(per_client):
                if time.monotonic() > deadline:
                    return
                k = (c * per_client + j) % len(items)
                try:
                    text, dt = client.ask(items[k])
                except Exception as exc:  # counted, reported; a new connection for the next one
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    client.close()
                    client = Client(url)
                    continue
                with lock:
                    lat.append(dt)
                    if text != refs[k]:
                        wrong.append((k, text, refs[k]))
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat) + len(errors), "wall_s": wall, "latencies": lat,
            "wrong": len(wrong), "errors": len(errors), "wrong_examples": wrong[:3], "error_examples": errors[:3]}


def percentile(sorted_values: list, p: float) -> float:
    """The p-th percentile (nearest rank) of sorted latencies in s, as ms."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))] * 1000


def batch_stats(url: str) -> tuple[float, float]:
    """(batches run, requests in them) from the server's /metrics."""
    vals = {}
    for line in get(url + "/metrics")[1].splitlines():
        if line.startswith(("dyvte_batch_size_count", "dyvte_batch_size_sum")):
            name, v = line.split()
            vals[name] = float(v)
    return vals.get("dyvte_batch_size_count", 0.0), vals.get("dyvte_batch_size_sum", 0.0)


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; connection errors raise OSError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_server(args, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dyvte.cli", "serve", "--engine-dir", args.engine_dir, "--port", str(port),
           "--host", "127.0.0.1", "--backend", args.backend, "--policy", args.policy, "--max-wait-ms",
           str(max_wait_ms), "--log-level", "warning", "--max-queue", str(max(64, args.clients * 2))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t_end = time.monotonic() + 180
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if get(url + "/health")[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("error: the server did not become healthy within 180 s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-dir", required=True, help="engine folder (served, and used for the reference answers)")
    ap.add_argument("--url", default=None, help="an already running server on loopback (default: start one)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrent client")
    ap.add_argument("--serial", type=int, default=None, help="serial requests (default: clients x requests / 2)")
    ap.add_argument("--distinct", type=int, default=32, help="distinct requests in the workload")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="the batching window of the concurrent phase")
    ap.add_argument("--threads", type=int, default=None, help="the started servers' ONNX Runtime threads")
    ap.add_argument("--max-batch", type=int, default=None, help="the started servers' --max-batch")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every mode, alternated")
    ap.add_argument("--time-limit", type=float, default=600.0, help="no new request after this many seconds")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if min(args.clients, args.requests, args.distinct, args.rounds) < 1:
        sys.exit("error: --clients, --requests, --distinct and --rounds must be >= 1")
    if args.url:
        check_loopback(args.url)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from dyvte.engines.manifest import Manifest

    manifest = Manifest.load(args.engine_dir, verify=False)
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    items = workload(args.distinct, int(manifest.data["limits"]["max_new_tokens"]))
    refs = references(args.engine_dir, args.backend, args.policy, items)
    deadline = t_start + args.time_limit
    n_serial = args.serial or max(1, args.clients * args.requests // 2)
    # modes: (name, batching window, clients, requests per client). Serial runs without a window
    # too (its best case); the ratio is taken against the better serial mode. Rounds alternate
    # the modes so that drift of a shared machine hits them alike.
    modes = [("serial", 0.0, 1, n_serial), ("serial", args.max_wait_ms, 1, n_serial),
             ("concurrent", args.max_wait_ms, args.clients, args.requests)]
    if args.url or args.max_wait_ms == 0:  # one server: its own window
        modes = modes[1:]
    servers, procs = {}, []
    try:
        for window in dict.fromkeys(m[1] for m in modes):
            if args.url:
                servers[window] = args.url.rstrip("/")
            else:
                proc, servers[window] = start_server(args, window)
                procs.append(proc)
            run_phase(servers[window], items, refs, 1, min(4, len(items)), deadline)  # warm-up
        parts = {i: [] for i in range(len(modes))}
        for _ in range(args.rounds):
            for i, (name, window, clients, per_client) in enumerate(modes):
                b0, r0 = batch_stats(servers[window])
                r = run_phase(servers[window], items, refs, clients, per_client, deadline)
                b1, r1 = batch_stats(servers[window])
                parts[i].append((r, b1 - b0, r1 - r0))
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    for i, (name, window, clients, _) in enumerate(modes):
        rs = [p[0] for p in parts[i]]
        lat = sorted(x for r in rs for x in r["latencies"])
        wall = sum(r["wall_s"] for r in rs)
        batches, in_batches = sum(p[1] for p in parts[i]), sum(p[2] for p in parts[i])
        rows.append({"name": name, "max_wait_ms": None if args.url else window, "clients": clients,
                     "requests": sum(r["requests"] for r in rs), "wall_s": wall,
                     "req_per_s": len(lat) / wall if wall else 0.0, "p50_ms": percentile(lat, 50),
                     "p99_ms": percentile(lat, 99), "mean_batch": in_batches / batches if batches else float("nan"),
                     "wrong": sum(r["wrong"] for r in rs), "errors": sum(r["errors"] for r in rs),
                     "wrong_examples": [w for r in rs for w in r["wrong_examples"]][:3],
                     "error_examples": [e for r in rs for e in r["error_examples"]][:3]})
    best_serial = max((r["req_per_s"] for r in rows if r["name"] == "serial"), default=0.0)
    conc = rows[-1]
    ratio = conc["req_per_s"] / best_serial if best_serial else float("nan")
    threads = f", {args.threads} ONNX Runtime threads" if args.threads else ""
    print(f"load test: {Path(args.engine_dir).name}, backend {args.backend}{threads}, policy {args.policy}, "
          f"{args.distinct} distinct requests, {args.rounds} alternated rounds, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}, 1-min load average before/after {load0:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"{'mode':<11}{'wait ms':>8}{'clients':>8}{'requests':>9}{'wall s':>8}{'req/s':>8}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'batch':>7}{'wrong':>6}{'errors':>7}")
    for r in rows:
        wait = "-" if r["max_wait_ms"] is None else f"{r['max_wait_ms']:g}"
        print(f"{r['name']:<11}{wait:>8}{r['clients']:>8}{r['requests']:>9}{r['wall_s']:>8.2f}{r['req_per_s']:>8.1f}"
              f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['mean_batch']:>7.2f}{r['wrong']:>6}{r['errors']:>7}")
    print(f"throughput ratio (concurrent / best serial): {ratio:.2f}")
    for r in rows:
        for k, got, want in r["wrong_examples"]:
            print(f"  wrong answer to request {k}: {got!r}, single run gave {want!r}")
        for e in r["error_examples"]:
            print(f"  error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2, default=str))
    return 1 if any(r["wrong"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
