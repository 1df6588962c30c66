"""Load test of ``dyvte serve`` on loopback: latency of short requests under long ones, throughput
of concurrent clients against serial, every answer checked.

    python scripts/load_test.py --engine-dir /tmp/demo-eng
    python scripts/load_test.py --random-llava /tmp/rand8-eng     # builds it first if missing

Starts ``dyvte serve`` on 127.0.0.1 (or uses ``--url``, which must be a loopback address) and
builds a workload of synthetic scenes and questions (the demo data; some requests streamed, some
with a system message; greedy, so answers are deterministic). Every distinct request is answered
once by a single ``Pipeline.run`` in this process, the reference every server answer is compared
with (a mismatch is a wrong answer). Four modes, alternated for ``--rounds`` rounds so that drift
of a shared machine hits them alike:

* ``serial``: one client, mixed lengths (max_tokens 2 ... --long-tokens), one request at a time;
* ``concurrent``: ``--clients`` clients x ``--requests`` requests of the same mix;
* ``short alone``: one client sending ``--short-requests`` short requests (--short-tokens);
* ``short + N long``: the same short client while ``--long-clients`` clients keep long requests
  (--long-tokens) running.

Prints the table (requests, wall time, throughput, p50/p99 latency, tokens per scheduler step from
/metrics, wrong answers, errors) and the ratios the README quotes: concurrent / serial throughput
and short p50 (and p99) under load / alone. Exit status 1 on any wrong answer or error. Bounded:
a fixed number of requests, and no new one after ``--time-limit`` seconds.

``--random-llava DIR`` serves a random-weight 8-layer LLaVA of the demo's shape (d = 128, GQA 4/2,
96 px images of 36 visual tokens, random gates, so rows exit at different layers), built offline
into DIR the first time (about a minute): its answers run to max_tokens, unlike the trained demo
model's, which stop after a few words.
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


def build_random_llava(out: Path, seed: int = 0) -> Path:
    """A random-weight 8-layer LLaVA of the demo's shape, with random gates, exported to ``out``."""
    import tempfile

    import torch

    from dyvte.exporter import ExportSettings, export
    from dyvte.gates import save_gates
    from dyvte.synth import CELL, IMAGE_SIZE, vocabulary
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    spec = TinyLlavaSpec(hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=352,
                         vision_hidden_size=96, vision_layers=3, vision_heads=4, vision_intermediate_size=192,
                         image_size=IMAGE_SIZE, patch_size=CELL, words=tuple(vocabulary()), max_position_embeddings=256)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llava(spec, Path(tmp) / "hf", seed=seed)
        g = torch.Generator().manual_seed(seed)
        gates = {k: (torch.randn(64, 2 * spec.hidden_size, generator=g) * 0.5, torch.randn(2, 64, generator=g) * 2.0)
                 for k in range(1, spec.num_layers)}
        save_gates(Path(tmp) / "gates.safetensors", gates)
        print(f"building a random 8-layer LLaVA into {out} ...", file=sys.stderr)
        export(ExportSettings(out=out, model=str(model), gates=Path(tmp) / "gates.safetensors", progress=False))
    return out


def workload(n: int, tokens: list[int], seed: int = 7, policies: list[str] | None = None) -> list[dict]:
    """``n`` chat requests (OpenAI bodies) over synthetic scenes, max_tokens cycling through
    ``tokens`` and, when given, exit policies through ``policies`` (``{"dyvte": {"policy": ...}}``)."""
    from dyvte.synth import make_dialogue

    items = []
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
        items.append({"messages": messages, "max_tokens": tokens[i % len(tokens)], "temperature": 0,
                      "stream": i % 4 == 1})
        if policies:
            items[-1]["dyvte"] = {"policy": policies[(i + seed) % len(policies)]}
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
        return [pipe.run([pipe.encode_chat(to_pipeline_messages(it["messages"]), it["max_tokens"])],
                         it.get("dyvte", {}).get("policy", policy))[0].text for it in items]


class Client:
    """One keep-alive HTTP/1.1 connection (the standard library's: a light load generator, so
    that the clients' own CPU use, on the same machine, disturbs the server little)."""

    def __init__(self, url: str, timeout: float = 300.0):
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


class Tally:
    """Latencies, wrong answers and errors of one mode (thread-safe)."""

    def __init__(self):
        self.lat, self.wrong, self.errors, self.lock = [], [], [], threading.Lock()

    def ask(self, client: Client, url: str, item: dict, ref: str) -> Client:
        """One request through ``client`` (replaced by a new connection after an error)."""
        try:
            text, dt = client.ask(item)
        except Exception as exc:  # counted, reported
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            client.close()
            return Client(url)
        with self.lock:
            self.lat.append(dt)
            if text != ref:
                self.wrong.append((item["max_tokens"], text, ref))
        return client


def run_clients(url: str, jobs: list[list[tuple[dict, str]]], deadline: float, tally: Tally) -> float:
    """One thread per list of (request, reference), each sent back to back; wall seconds."""
    def loop(mine):
        client = Client(url)
        try:
            for item, ref in mine:
                if time.monotonic() > deadline:
                    return
                client = tally.ask(client, url, item, ref)
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_under_load(url: str, shorts: list[tuple[dict, str]], longs: list[tuple[dict, str]], n_long: int,
                   deadline: float, tally: Tally, long_tally: Tally) -> float:
    """The short client's requests while ``n_long`` clients keep long requests running."""
    stop = threading.Event()

    def long_loop(c: int):
        client, k = Client(url), c
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                item, ref = longs[k % len(longs)]
                client = long_tally.ask(client, url, item, ref)
                k += n_long
        finally:
            client.close()

    threads = [threading.Thread(target=long_loop, args=(c,)) for c in range(n_long)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the long requests are running
    wall = run_clients(url, [shorts], deadline, tally)
    stop.set()
    for t in threads:
        t.join()
    return wall


def percentile(sorted_values: list, p: float) -> float:
    """The p-th percentile (nearest rank) of sorted latencies in s, as ms."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))] * 1000


def step_stats(url: str) -> tuple[float, float]:
    """(scheduler steps, tokens generated in them) from the server's /metrics."""
    vals = {}
    for line in get(url + "/metrics")[1].splitlines():
        if line.startswith(("dyvte_step_tokens_count", "dyvte_step_tokens_sum")):
            name, v = line.split()
            vals[name] = float(v)
    return vals.get("dyvte_step_tokens_count", 0.0), vals.get("dyvte_step_tokens_sum", 0.0)


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; connection errors raise OSError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dyvte.cli", "serve", "--engine-dir", args.engine_dir, "--port", str(port),
           "--host", "127.0.0.1", "--backend", args.backend, "--policy", args.policy, "--max-wait-ms",
           str(args.max_wait_ms), "--log-level", "warning", "--max-queue", str(max(64, args.clients * 2))]
    for flag in ("threads", "max_batch", "kv_budget", "prefill_tokens"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
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
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine-dir", help="engine folder (served, and used for the reference answers)")
    src.add_argument("--random-llava", metavar="DIR", help="serve a random 8-layer LLaVA, built into DIR if missing")
    ap.add_argument("--url", default=None, help="an already running server on loopback (default: start one)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--policy", default="auto", help="the started server's default exit policy")
    ap.add_argument("--policies", default=None,
                    help="exit policies the requests choose in turn (comma-separated, e.g. never,gate,layer:2,layer:5: "
                         "rows exiting at different layers share the batch); default: the server's")
    ap.add_argument("--clients", type=int, default=8, help="clients of the concurrent mode")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrent client")
    ap.add_argument("--serial", type=int, default=None, help="serial requests (default: clients x requests / 2)")
    ap.add_argument("--short-tokens", type=int, default=2, help="max_tokens of short requests")
    ap.add_argument("--long-tokens", type=int, default=64, help="max_tokens of long requests (and the mix's longest)")
    ap.add_argument("--long-clients", type=int, default=3, help="clients keeping long requests running")
    ap.add_argument("--short-requests", type=int, default=16, help="short requests per latency mode")
    ap.add_argument("--distinct", type=int, default=32, help="distinct requests in the workload")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="the started server's --max-wait-ms")
    ap.add_argument("--threads", type=int, default=None, help="the started server's ONNX Runtime threads")
    ap.add_argument("--max-batch", type=int, default=None, help="the started server's --max-batch")
    ap.add_argument("--kv-budget", default=None, help="the started server's --kv-budget")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="the started server's --prefill-tokens")
    ap.add_argument("--modes", default="serial,concurrent,short,loaded",
                    help="which modes to run (comma-separated: serial, concurrent, short, loaded)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every mode, alternated")
    ap.add_argument("--time-limit", type=float, default=900.0, help="no new request after this many seconds")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"serial", "concurrent", "short", "loaded"} or not modes:
        sys.exit("error: --modes takes serial, concurrent, short and loaded, comma-separated")
    if min(args.clients, args.requests, args.distinct, args.rounds, args.short_requests, args.long_clients,
           args.short_tokens, args.long_tokens) < 1:
        sys.exit("error: counts and token limits must be >= 1")
    if args.url:
        check_loopback(args.url)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.random_llava:
        out = Path(args.random_llava)
        if not (out / "manifest.json").is_file():
            build_random_llava(out)
        args.engine_dir = str(out)

    from dyvte.engines.manifest import Manifest

    manifest = Manifest.load(args.engine_dir, verify=False)
    limit = int(manifest.data["limits"]["max_new_tokens"])
    short_n, long_n = min(args.short_tokens, limit), min(args.long_tokens, limit)
    mix = sorted({min(t, long_n) for t in (2, 4, 8, 16, 32, 64, long_n)})
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    d = args.distinct
    pols = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else None
    items = workload(d, mix, 7, pols) + workload(d, [short_n], 8, pols) + workload(d, [long_n], 9, pols)
    print(f"computing {len(items)} reference answers ...", file=sys.stderr)
    refs = references(args.engine_dir, args.backend, args.policy, items)
    pairs = list(zip(items, refs))
    mixed, shorts, longs = pairs[:d], pairs[d: 2 * d], pairs[2 * d:]
    deadline = t_start + args.time_limit
    n_serial = args.serial or max(1, args.clients * args.requests // 2)
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    names = {"serial": "serial", "concurrent": "concurrent", "short": "short alone",
             "loaded": f"short + {args.long_clients} long"}
    tallies = {m: Tally() for m in modes}
    long_tally = Tally()
    walls = {m: 0.0 for m in modes}
    steps = {m: [0.0, 0.0] for m in modes}
    try:
        run_clients(url, [mixed[:4]], deadline, Tally())  # warm-up
        for r in range(args.rounds):
            for m in modes:
                s0, t0 = step_stats(url)
                if m == "serial":
                    jobs = [[mixed[(r * n_serial + k) % d] for k in range(n_serial)]]
                elif m == "concurrent":
                    jobs = [[mixed[(c * args.requests + k) % d] for k in range(args.requests)]
                            for c in range(args.clients)]
                elif m == "short":
                    jobs = [[shorts[(r * args.short_requests + k) % d] for k in range(args.short_requests)]]
                if m == "loaded":
                    walls[m] += run_under_load(url, [shorts[(r * args.short_requests + k) % d]
                                                     for k in range(args.short_requests)],
                                               longs, args.long_clients, deadline, tallies[m], long_tally)
                else:
                    walls[m] += run_clients(url, jobs, deadline, tallies[m])
                s1, t1 = step_stats(url)
                steps[m][0] += s1 - s0
                steps[m][1] += t1 - t0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    for m in modes:
        t = tallies[m]
        lat = sorted(t.lat)
        clients = {"serial": 1, "concurrent": args.clients, "short": 1, "loaded": 1 + args.long_clients}[m]
        rows.append({"name": names[m], "clients": clients, "requests": len(t.lat) + len(t.errors),
                     "wall_s": walls[m], "req_per_s": len(lat) / walls[m] if walls[m] else 0.0,
                     "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                     "tokens_per_step": steps[m][1] / steps[m][0] if steps[m][0] else float("nan"),
                     "wrong": len(t.wrong), "errors": len(t.errors),
                     "wrong_examples": t.wrong[:3], "error_examples": t.errors[:3]})
    by = {r["name"]: r for r in rows}
    ratios = {}
    if "serial" in by and "concurrent" in by and by["serial"]["req_per_s"]:
        ratios["throughput (concurrent / serial)"] = by["concurrent"]["req_per_s"] / by["serial"]["req_per_s"]
    if "short alone" in by and names["loaded"] in by:
        ratios["short p50 (under load / alone)"] = by[names["loaded"]]["p50_ms"] / by["short alone"]["p50_ms"]
        ratios["short p99 (under load / alone)"] = by[names["loaded"]]["p99_ms"] / by["short alone"]["p99_ms"]
    wrong_long, errors_long = len(long_tally.wrong), len(long_tally.errors)
    extras = [f"{k}: {v}" for k, v in (("threads", args.threads), ("max batch", args.max_batch),
                                        ("kv budget", args.kv_budget), ("prefill tokens", args.prefill_tokens))
              if v is not None]
    print(f"load test: {Path(args.engine_dir).name}, backend {args.backend}, policy "
          f"{args.policies if args.policies else args.policy}"
          f"{', ' + ', '.join(extras) if extras else ''}; max_tokens short {short_n}, long {long_n}, mix "
          f"{'/'.join(map(str, mix))}; {d} distinct requests per kind, {args.rounds} alternated rounds, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, 1-min load average before/after "
          f"{load0:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"{'mode':<16}{'clients':>8}{'requests':>9}{'wall s':>8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'tok/step':>9}{'wrong':>6}{'errors':>7}")
    for r in rows:
        print(f"{r['name']:<16}{r['clients']:>8}{r['requests']:>9}{r['wall_s']:>8.2f}{r['req_per_s']:>8.1f}"
              f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['tokens_per_step']:>9.2f}{r['wrong']:>6}{r['errors']:>7}")
    if "loaded" in modes:
        print(f"(the long clients' own requests: {len(long_tally.lat)} answered, {wrong_long} wrong, "
              f"{errors_long} errors)")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    for r in rows:
        for n, got, want in r["wrong_examples"]:
            print(f"  wrong answer ({r['name']}, max_tokens {n}): {got!r}, single run gave {want!r}")
        for e in r["error_examples"]:
            print(f"  error ({r['name']}): {e}")
    for n, got, want in long_tally.wrong[:3]:
        print(f"  wrong answer (long, max_tokens {n}): {got!r}, single run gave {want!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "long": {
            "answered": len(long_tally.lat), "wrong": wrong_long, "errors": errors_long}}, indent=2, default=str))
    bad = any(r["wrong"] or r["errors"] for r in rows) or wrong_long or errors_long
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
