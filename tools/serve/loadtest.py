"""Bounded load test of `florence serve`: closed-loop clients POST one image to /v1/caption,
scenario by scenario, and the figures come out as a Markdown table (and JSON with --json).

The tool starts the servers itself (one per --batch-sizes value, on 127.0.0.1 and a free port;
it stops each with SIGTERM and checks that it exits 0), so one command gives the whole table:

    python3 tools/serve/loadtest.py --binary target/release/florence --model DIR --threads 16 \\
        --batch-sizes 1,8 --max-queue 2 --clients 1,4,10,16 --requests 64 --time-limit 300 \\
        --image photo.jpg --new-tokens 64 --num-beams 3 --json /tmp/serve-load.json

Or against a server already running on this machine; --batch-sizes (one value) and --max-queue
then only describe that server for the table (left out, they are read from its first 503):

    target/release/florence serve --model DIR --port 8000 --max-batch-size 8 --max-queue 2 &
    python3 tools/serve/loadtest.py --url http://127.0.0.1:8000 --batch-sizes 8 --max-queue 2 \\
        --clients 1,8,10,16 --requests 48 --time-limit 300 --image photo.jpg

A quick check with the tiny test model (seconds, not a benchmark; long forced captions make the
requests last long enough to queue):

    mkdir -p /tmp/lt/model && cp crates/florence/tests/fixtures/models/native_bf16_sharded/* \\
        ../shared/testdata/tokenizer-florence/tokenizer.json /tmp/lt/model/
    python3 tools/serve/loadtest.py --binary target/release/florence --model /tmp/lt/model \\
        --threads 1 --batch-sizes 1,4 --max-queue 2 --clients 1,4,12 --requests 24 \\
        --time-limit 60 --new-tokens 500 --num-beams 1 \\
        --image crates/florence/tests/fixtures/images/noise_rgb.png

How a scenario runs. A scenario is one server configuration (--max-batch-size B, --max-queue Q)
and one client count C. C clients run in a closed loop: each sends its next request as soon as
its previous one is answered. A 503 is counted, and its client waits as long as the reply's
Retry-After says (1 s when missing, which is reported as a server problem) before its next
request. The scenario ends when --requests requests have been sent and answered (every request
counts, 503s included), or at --time-limit seconds: requests still unanswered then are counted as
unfinished, and requests never sent as not sent. Every request opens its own loopback connection.
Before its scenarios each server gets --warmup requests one by one (not counted); after each
scenario the tool waits until /metrics shows nothing waiting or running.

Capacity. The server runs at most B requests at once and lets Q more wait; it answers 503 at once
beyond B + Q. Closed-loop clients have one request each outstanding, so C <= B + Q clients never
see a 503 and C > B + Q clients do. To see 503s with a few clients, pick a small --max-queue
(0 or 2); the server's own default (64) needs more than 64 + B clients. --max-batch-size 1 serves
one request at a time (no batching across requests): the baseline the "vs B=1" column compares
with, at the same client count.

Figures per scenario: requests sent, 200s, 503s and their share of those sent, other errors
(other statuses, refused or broken connections, replies without ids), unfinished; p50 and p99
latency of the 200s (seconds, send to full reply; linear interpolation between ranks, so with
few requests p99 is near the maximum); images/s (200s / scenario wall time: from the start to
the last reply, or the time limit when it cut the scenario short); tokens/s (sum of len(ids) - 1
over the 200s / wall time); the mean batch the server stepped with (from /metrics). Give each
scenario several requests per client (--requests >= 4 x clients): the first and last requests
of a closed loop run with fewer neighbours, and above capacity 503s use up the budget too.

Captions must not depend on batching: every 200 must carry the same ids as the first one (one
image, one set of settings). A mismatch, another error, a 503 without Retry-After, or a server
that fails to start, dies, or does not exit 0 on SIGTERM is listed under "Problems" and the exit
status is 1 (unfinished requests are warnings).

Standard library only (Python 3.11).
"""

import argparse
import base64
import email.utils
import hashlib
import http.client
import ipaddress
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter, deque
from datetime import datetime, timezone

CAPACITY_MESSAGE = re.compile(r"at capacity \((\d+) requests running and (\d+) waiting\)")
LISTENING = re.compile(r"listening on http://(\S+):(\d+)")


# ---------------------------------------------------------------------------------------------
# HTTP


def http_get(host, port, path, timeout=5.0):
    """(status, body bytes) of GET path; raises OSError/HTTPException when the server is gone."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_caption(host, port, body, timeout):
    """One POST /v1/caption on its own connection: (status, Retry-After header, body bytes).

    The server answers 503 before it reads the body; should the send then fail, the reply may
    still be there to read."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            conn.request(
                "POST",
                "/v1/caption",
                body=body,
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
        except TimeoutError:
            raise
        except (BrokenPipeError, ConnectionResetError):
            pass  # try to read the reply the server sent before closing
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Retry-After"), data
    finally:
        conn.close()


def retry_after_seconds(value):
    """Seconds to wait for a Retry-After value (delta seconds or an HTTP date); None if unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def scrape_metrics(host, port):
    """The /metrics samples as {"name{labels}": value}; {} when unavailable."""
    try:
        status, body = http_get(host, port, "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    samples = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            pass
    return samples


def wait_health(host, port, limit_s, proc=None):
    """Waits for GET /health 200; returns an error string, or None once healthy."""
    deadline = time.monotonic() + limit_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"the server exited with status {proc.returncode} before /health answered 200"
        try:
            status, _ = http_get(host, port, "/health", timeout=2.0)
            if status == 200:
                return None
            last = f"status {status}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    return f"/health did not answer 200 within {limit_s:g} s (last: {last})"


def wait_idle(host, port, limit_s):
    """Waits until /metrics shows no request waiting or running (bounded); True when idle.

    Requests a scenario left unfinished may still run on the server: the next scenario must not
    share the model with them."""
    deadline = time.monotonic() + limit_s
    while True:
        m = scrape_metrics(host, port)
        if not m:
            return True  # nothing to go by
        if m.get("florence_queue_depth", 0) == 0 and m.get("florence_batch_images", 0) == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# The server, when the tool starts it


class Server:
    """`florence serve` on 127.0.0.1 and a free port, its stderr kept (and copied to a log)."""

    def __init__(self, args, batch, queue):
        self.cmd = [
            args.binary, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
            "--max-batch-size", str(batch), "--max-queue", str(queue),
            "--timeout-s", f"{args.server_timeout_s:g}",
        ]
        if args.threads is not None:
            self.cmd += ["--threads", str(args.threads)]
        self.cmd += args.server_arg
        self.host, self.port = "127.0.0.1", None
        self.tail = deque(maxlen=60)
        self.listening = threading.Event()
        self.log = open(args.server_log, "a", encoding="utf-8") if args.server_log else None
        if self.log:
            self.log.write(f"### {shlex.join(self.cmd)}\n")
            self.log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace",
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.tail.append(line.rstrip("\n"))
            if self.log:
                self.log.write(line)
                self.log.flush()
            m = LISTENING.search(line)
            if m and not self.listening.is_set():
                self.host, self.port = m.group(1).strip("[]"), int(m.group(2))
                self.listening.set()
        self.listening.set()  # stderr closed: the process ended

    def start(self, limit_s):
        """Waits for the port and for /health 200; returns an error string or None."""
        if not self.listening.wait(limit_s) or self.port is None:
            return "the server printed no 'listening on' line" + self.stderr_tail()
        remaining = max(1.0, limit_s - (time.monotonic() - self.started))
        error = wait_health(self.host, self.port, remaining, self.proc)
        self.load_s = time.monotonic() - self.started
        return error + self.stderr_tail() if error else None

    def stop(self, limit_s):
        """SIGTERM, then waits; returns (exit status or None, seconds, error string or None)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._close()
            return None, time.monotonic() - t, f"did not exit within {limit_s:g} s of SIGTERM (killed)"
        self.reader.join(5)
        self._close()
        seconds = time.monotonic() - t
        if rc != 0:
            return rc, seconds, f"exited with status {rc} after SIGTERM" + self.stderr_tail()
        return rc, seconds, None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self):
        if self.log and not self.log.closed:
            self.log.close()

    def stderr_tail(self, n=8):
        lines = list(self.tail)[-n:]
        return ("; its stderr ended with:\n    " + "\n    ".join(lines)) if lines else ""


# ---------------------------------------------------------------------------------------------
# Requests and scenarios


class IdsCheck:
    """Every 200 must carry the reference ids (the first 200's)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reference = None
        self.reference_text = None
        self.reference_where = None
        self.checked = 0
        self.mismatches = []  # (where, first differing index, len)

    def check(self, ids, text, where):
        with self.lock:
            self.checked += 1
            if self.reference is None:
                self.reference, self.reference_text, self.reference_where = ids, text, where
                return True
            if ids == self.reference:
                return True
            first = next((i for i, (a, b) in enumerate(zip(ids, self.reference)) if a != b),
                         min(len(ids), len(self.reference)))
            self.mismatches.append({"where": where, "first_difference": first, "len": len(ids),
                                    "reference_len": len(self.reference), "text": text})
            return False


def one_request(host, port, body, timeout, ids_check, where):
    """Sends one caption request; returns its record (outcome: ok, 503, error or unfinished)."""
    rec = {"status": None, "outcome": None}
    t0 = time.monotonic()
    try:
        status, retry_after, data = post_caption(host, port, body, max(0.001, timeout))
    except TimeoutError:
        rec.update(outcome="unfinished", latency_s=time.monotonic() - t0)
        return rec, t0
    except (OSError, http.client.HTTPException) as e:
        rec.update(outcome="error", error=f"{type(e).__name__}: {e}", latency_s=time.monotonic() - t0)
        return rec, t0
    rec["latency_s"] = time.monotonic() - t0
    rec["status"] = status
    if status == 200:
        try:
            reply = json.loads(data)
            ids = reply["ids"]
            if not isinstance(ids, list):
                raise TypeError("ids is not a list")
        except (ValueError, KeyError, TypeError) as e:
            rec.update(outcome="error", error=f"a 200 without a readable ids list: {e}")
            return rec, t0
        text = reply.get("text", reply.get("result"))
        rec.update(outcome="ok", tokens=max(0, len(ids) - 1), ids_match=ids_check.check(ids, text, where))
    elif status == 503:
        rec.update(outcome="503", retry_after=retry_after)
        message = data.decode("utf-8", "replace")
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        rec["message"] = message[:300]
    else:
        rec.update(outcome="error", error=f"HTTP {status}: {data.decode('utf-8', 'replace')[:300]}")
    return rec, t0


def run_scenario(host, port, body, clients, n_requests, time_limit, ids_check, label):
    """C closed-loop clients until n_requests are sent and answered or time_limit passes."""
    lock = threading.Lock()
    records = []
    counter = {"sent": 0}
    barrier = threading.Barrier(clients + 1)
    start_box = {}

    def client(index):
        barrier.wait()
        start, deadline = start_box["start"], start_box["deadline"]
        while True:
            if time.monotonic() >= deadline:
                return
            with lock:
                if counter["sent"] >= n_requests:
                    return
                counter["sent"] += 1
            rec, t0 = one_request(host, port, body, deadline - time.monotonic(), ids_check, label)
            rec["client"] = index
            rec["start_s"] = t0 - start
            rec["end_s"] = time.monotonic() - start
            with lock:
                records.append(rec)
                if counter["sent"] >= n_requests:
                    return  # no Retry-After wait when no request is left to send
            if rec["outcome"] == "503":
                wait = retry_after_seconds(rec.get("retry_after"))
                wait = 1.0 if wait is None else wait
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_box["start"] = time.monotonic()
    start_box["deadline"] = start_box["start"] + time_limit
    barrier.wait()
    for t in threads:
        # The clients end by the deadline (socket timeouts); the margin covers a reply in transfer.
        t.join(max(0.0, start_box["deadline"] + 30 - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    # Wall time: to the last reply, or the whole limit when the limit cut the scenario short.
    with lock:
        cut = hung or counter["sent"] < n_requests or any(r["outcome"] == "unfinished" for r in records)
        wall = time_limit if cut else max((r["end_s"] for r in records), default=0.0)
    with lock:
        records.sort(key=lambda r: r["start_s"])
        return list(records), counter["sent"], wall, hung


def percentile(sorted_values, q):
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(records, sent, n_requests, wall, batch, queue, clients, before, after):
    ok = [r for r in records if r["outcome"] == "ok"]
    n503 = [r for r in records if r["outcome"] == "503"]
    errors = [r for r in records if r["outcome"] == "error"]
    unfinished = [r for r in records if r["outcome"] == "unfinished"]
    lat = sorted(r["latency_s"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    capacity = batch + queue if batch is not None and queue is not None else None
    load = None
    if capacity is not None:
        load = "below" if clients < capacity else "at" if clients == capacity else "above"
    mean_batch = None
    steps = after.get("florence_batch_size_count", 0) - before.get("florence_batch_size_count", 0)
    if steps > 0:
        mean_batch = (after.get("florence_batch_size_sum", 0) - before.get("florence_batch_size_sum", 0)) / steps
    return {
        "max_batch_size": batch,
        "max_queue": queue,
        "capacity": capacity,
        "clients": clients,
        "load": load,
        "requests_budget": n_requests,
        "sent": sent,
        "not_sent": n_requests - sent,
        "ok": len(ok),
        "status_503": len(n503),
        "share_503": len(n503) / sent if sent else None,
        "status_503_without_retry_after": sum(1 for r in n503 if r.get("retry_after") is None),
        "other_errors": len(errors),
        "unfinished": len(unfinished),
        "latency_p50_s": percentile(lat, 0.50),
        "latency_p99_s": percentile(lat, 0.99),
        "latency_mean_s": statistics.fmean(lat) if lat else None,
        "latency_min_s": lat[0] if lat else None,
        "latency_max_s": lat[-1] if lat else None,
        "tokens": tokens,
        "wall_s": wall,
        "images_per_s": len(ok) / wall if wall > 0 else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "mean_batch": mean_batch,
        "ids_mismatches": sum(1 for r in ok if not r["ids_match"]),
        "error_messages": dict(Counter(r["error"] for r in errors)),
        "requests": records,
    }


# ---------------------------------------------------------------------------------------------
# Report


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(x, digits=3):
    """Three significant digits, never in exponent form; '-' for None."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    magnitude = len(str(int(abs(x)))) if abs(x) >= 1 else 0
    if abs(x) < 1:
        decimals = digits
        y = abs(x)
        while y < 0.1 and decimals < 8:
            y *= 10
            decimals += 1
    else:
        decimals = max(0, digits - magnitude)
    return f"{x:.{decimals}f}"


def markdown(report):
    s = report["settings"]
    out = ["# florence serve load test", ""]
    out.append(f"- command: `{report['command']}`")
    out.append(f"- CPU: {report['cpu']} ({report['logical_cpus']} logical CPUs); {report['started']}")
    if s["mode"] == "binary":
        threads = f" --threads {s['threads']}" if s["threads"] is not None else " (all cores)"
        out.append(f"- servers: `{s['binary']} serve --model {s['model']}{threads}`, one per batch size, "
                   f"--max-queue {s['max_queue']}, --timeout-s {s['server_timeout_s']:g}")
    else:
        known = lambda v: "?" if v is None else v  # noqa: E731
        learned = f", read from {s['limits_from']}" if s.get("limits_from") else ""
        out.append(f"- server: {s['url']} (max-batch-size {known(s['max_batch_size'])}, "
                   f"max-queue {known(s['max_queue'])}{learned})")
    out.append(f"- request: POST /v1/caption, image {s['image']} ({s['image_bytes']} bytes), task {s['task']}, "
               f"num_beams {s['num_beams']}, {s['new_tokens']} forced new tokens (min = max)")
    out.append(f"- scenario: closed-loop clients, {s['requests']} requests (503s count), at most "
               f"{s['time_limit']:g} s; a 503 waits its Retry-After; capacity = max-batch-size + max-queue")
    out.append("")
    out.append("| batch | queue | cap | clients | load | sent | 200 | 503 | 503 % | errors | unfinished "
               "| p50 s | p99 s | images/s | tokens/s | vs B=1 | mean batch | wall s |")
    out.append("|" + "---:|" * 18)
    base = {(r["clients"]): r["images_per_s"] for r in report["scenarios"] if r["max_batch_size"] == 1}
    for r in report["scenarios"]:
        ref = base.get(r["clients"])
        vs = f"{r['images_per_s'] / ref:.2f}x" if ref and r["images_per_s"] is not None else "-"
        share = f"{100 * r['share_503']:.0f}" if r["share_503"] is not None else "-"
        out.append("| " + " | ".join([
            str(r["max_batch_size"] if r["max_batch_size"] is not None else "?"),
            str(r["max_queue"] if r["max_queue"] is not None else "?"),
            str(r["capacity"] if r["capacity"] is not None else "?"),
            str(r["clients"]), r["load"] or "?", str(r["sent"]), str(r["ok"]), str(r["status_503"]), share,
            str(r["other_errors"]), f"{r['unfinished']} (+{r['not_sent']} unsent)" if r["not_sent"] else str(r["unfinished"]),
            fmt(r["latency_p50_s"]), fmt(r["latency_p99_s"]), fmt(r["images_per_s"]), fmt(r["tokens_per_s"]),
            vs, fmt(r["mean_batch"]), fmt(r["wall_s"]),
        ]) + " |")
    out.append("")
    out.append("unfinished: unanswered at the time limit (unsent: never sent before it). "
               "Latencies are of the 200s. vs B=1: images/s over the --max-batch-size 1 row with as many clients.")
    if report["servers"]:
        out.append("")
        for srv in report["servers"]:
            load = f"loaded in {srv['load_s']:.1f} s" if srv.get("load_s") is not None else "did not start"
            if srv.get("died"):
                stop = f"DIED during the run (exit status {srv['exit_status']})"
            elif srv.get("stop_s") is not None:
                stop = f"SIGTERM: exit {srv['exit_status']} in {srv['stop_s']:.2f} s"
            else:
                stop = ""
            out.append(f"- server batch {srv['max_batch_size']}: {load}; {stop}")
    ref = report["reference"]
    out.append("")
    if ref["ids_len"] is not None:
        out.append(f"Captions: {report['ids_checked']} replies with ids checked against the first "
                   f"({ref['ids_len']} ids, {ref['where']}): {report['ids_mismatches']} differ.")
    out.append("")
    if report["problems"] or report["warnings"]:
        out.append("## Problems")
        out.append("")
        for p in report["problems"]:
            out.append(f"- FAIL: {p}")
        for w in report["warnings"]:
            out.append(f"- warning: {w}")
    else:
        out.append("No problems: every reply was a 200 or a 503 with Retry-After, and the captions agree.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def loopback_url(url):
    """(host, port) of an http:// URL on this machine; exits with a message otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        sys.exit(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        sys.exit(f"--url is the server's root (http://127.0.0.1:PORT), without a path: {url!r}")
    host = parts.hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host == "localhost" else {host}
        if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
            raise ValueError
    except (ValueError, OSError):
        sys.exit(f"--url must name this machine (127.0.0.1, ::1 or localhost): this tool loads only "
                 f"loopback servers, got host {host!r}")
    return host, parts.port or 80


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="loadtest.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_argument_group("the server (one of --binary or --url)")
    target.add_argument("--binary", metavar="PATH",
                        help="florence executable: the tool starts `PATH serve` on 127.0.0.1, a free port, "
                             "once per --batch-sizes value")
    target.add_argument("--url", metavar="URL",
                        help="a running server on this machine, e.g. http://127.0.0.1:8000 (loopback only)")
    target.add_argument("--model", metavar="DIR", help="model folder for --binary (its serve --model)")
    target.add_argument("--threads", type=int, metavar="N", help="serve --threads for --binary (default: all cores)")
    target.add_argument("--batch-sizes", type=int_list, metavar="B,B,...",
                        help="--binary: start a server with each --max-batch-size (1 = one request at a time, "
                             "the baseline) (default: 1,8). --url: the server's --max-batch-size, for the table")
    target.add_argument("--max-queue", type=int, metavar="Q",
                        help="--binary: serve --max-queue of every server (default: 2; small, so that more than "
                             "batch + Q clients see 503s). --url: the server's --max-queue, for the table")
    target.add_argument("--server-timeout-s", type=float, metavar="S",
                        help="serve --timeout-s for --binary (default: --time-limit + 30, so the server gives up "
                             "on unfinished requests soon after the tool)")
    target.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `florence serve`, repeatable; write flags as "
                             "--server-arg=--quantize --server-arg=q8")
    target.add_argument("--server-log", metavar="FILE", help="append the servers' stderr to FILE")
    target.add_argument("--load-timeout", type=float, default=600, metavar="S",
                        help="longest wait for a server's /health to answer 200 (default: 600)")
    target.add_argument("--stop-timeout", type=float, default=120, metavar="S",
                        help="longest wait for a server to exit after SIGTERM (default: 120)")

    load = ap.add_argument_group("the load")
    load.add_argument("--clients", type=int_list, default=[1, 4, 8, 16], metavar="C,C,...",
                      help="closed-loop client counts, one scenario each; choose some below, at and above "
                           "capacity = batch + queue (default: 1,4,8,16)")
    load.add_argument("--requests", type=int, default=32, metavar="N",
                      help="requests sent per scenario, 503s included (default: 32)")
    load.add_argument("--time-limit", type=float, default=300, metavar="S",
                      help="wall-clock limit per scenario; requests unanswered then count as unfinished "
                           "(default: 300)")
    load.add_argument("--warmup", type=int, default=1, metavar="N",
                      help="requests sent one by one to each server before its scenarios, not counted "
                           "(their captions are checked) (default: 1)")

    req = ap.add_argument_group("every request")
    req.add_argument("--image", required=True, metavar="FILE", help="the image every request sends (base64)")
    req.add_argument("--task", default="<CAPTION>", help="the task (default: <CAPTION>)")
    req.add_argument("--num-beams", type=int, default=3, metavar="N", help="beam count (default: 3)")
    req.add_argument("--new-tokens", type=int, default=64, metavar="N",
                     help="tokens each caption is forced to: sent as max_new_tokens and min_new_tokens (default: 64)")

    ap.add_argument("--json", metavar="FILE", help="write every figure (and each request's record) to FILE")
    args = ap.parse_args(argv)

    if bool(args.binary) == bool(args.url):
        ap.error("give either --binary (with --model) or --url")
    if args.binary and not args.model:
        ap.error("--binary needs --model DIR")
    if args.url and (args.model or args.threads is not None or args.server_arg or args.server_timeout_s):
        ap.error("--model, --threads, --server-arg and --server-timeout-s are for --binary; "
                 "with --url the server is already running")
    if args.url and args.batch_sizes and len(args.batch_sizes) > 1:
        ap.error("with --url give at most one --batch-sizes value: the running server's --max-batch-size")
    if args.binary:
        args.batch_sizes = args.batch_sizes or [1, 8]
        args.max_queue = 2 if args.max_queue is None else args.max_queue
        if args.server_timeout_s is None:
            args.server_timeout_s = args.time_limit + 30
    if args.max_queue is not None and args.max_queue < 0:
        ap.error("--max-queue must be 0 or more")
    for name in ("requests", "num_beams", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.time_limit <= 0:
        ap.error("--warmup must be 0 or more and --time-limit positive")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        with open(args.image, "rb") as f:
            image = f.read()
    except OSError as e:
        sys.exit(f"cannot read --image: {e}")
    body = json.dumps({
        "image": base64.b64encode(image).decode("ascii"),
        "task": args.task,
        "num_beams": args.num_beams,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
    }).encode()

    report = {
        "command": shlex.join(["python3", sys.argv[0], *argv]),
        "argv": argv,
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {
            "mode": "binary" if args.binary else "url",
            "binary": args.binary, "model": args.model, "threads": args.threads, "url": args.url,
            "max_batch_size": args.batch_sizes[0] if args.url and args.batch_sizes else None,
            "batch_sizes": args.batch_sizes, "max_queue": args.max_queue,
            "server_timeout_s": args.server_timeout_s, "server_args": args.server_arg,
            "clients": args.clients, "requests": args.requests, "time_limit": args.time_limit,
            "warmup": args.warmup, "image": args.image, "image_bytes": len(image),
            "image_sha256": hashlib.sha256(image).hexdigest(), "task": args.task,
            "num_beams": args.num_beams, "new_tokens": args.new_tokens,
        },
        "servers": [],
        "scenarios": [],
        "problems": [],
        "warnings": [],
    }
    ids_check = IdsCheck()
    problems, warnings = report["problems"], report["warnings"]

    def run_server_scenarios(host, port, batch, queue, tag, server=None):
        """Warm-up, then every client count; False when the warm-up failed or the server died."""

        def died(when):
            if server is None or server.proc.poll() is None:
                return False
            server.reader.join(5)
            problems.append(f"{tag}: THE SERVER DIED {when} (exit status {server.proc.returncode}); "
                            f"its remaining scenarios were skipped{server.stderr_tail(20)}")
            return True

        for i in range(args.warmup):
            rec, _ = one_request(host, port, body, args.time_limit, ids_check, f"{tag} warm-up {i + 1}")
            if died("during the warm-up"):
                return False
            if rec["outcome"] != "ok":
                what = rec.get("error") or rec.get("message") or rec["outcome"]
                problems.append(f"{tag}: warm-up request failed ({what}); its scenarios were skipped")
                return False
        for clients in args.clients:
            label = f"{tag}, {clients} clients"
            print(f"[loadtest] {label} ...", file=sys.stderr, flush=True)
            before = scrape_metrics(host, port)
            records, sent, wall, hung = run_scenario(
                host, port, body, clients, args.requests, args.time_limit, ids_check, label)
            after = scrape_metrics(host, port)
            b, q = batch, queue
            if b is None or q is None:  # --url without a description: learn it from a 503
                for r in records:
                    m = CAPACITY_MESSAGE.search(r.get("message", ""))
                    if m:
                        b, q = int(m.group(1)), int(m.group(2))
                        batch, queue = b, q
                        report["settings"].update(max_batch_size=b, max_queue=q, limits_from="a 503's message")
                        break
            row = summarize(records, sent, args.requests, wall, b, q, clients, before, after)
            row["server"] = tag
            report["scenarios"].append(row)
            print(f"[loadtest]   sent {row['sent']}, 200 {row['ok']}, 503 {row['status_503']}, "
                  f"errors {row['other_errors']}, unfinished {row['unfinished']}, "
                  f"{fmt(row['images_per_s'])} images/s in {wall:.1f} s", file=sys.stderr, flush=True)
            if died(f"during the {clients}-client scenario"):
                return False
            if hung:
                problems.append(f"{label}: {hung} client(s) still waiting 30 s after the time limit (a hang)")
            if row["status_503_without_retry_after"]:
                problems.append(f"{label}: {row['status_503_without_retry_after']} 503 replies without Retry-After")
            for message, n in row["error_messages"].items():
                problems.append(f"{label}: {n} x {message}")
            if row["unfinished"] or row["not_sent"]:
                warnings.append(f"{label}: {row['unfinished']} unfinished and {row['not_sent']} not sent at the "
                                f"{args.time_limit:g} s limit")
            if row["capacity"] is not None and clients <= row["capacity"] and row["status_503"]:
                warnings.append(f"{label}: {row['status_503']} 503s with no more clients than the capacity "
                                f"({row['capacity']}) (other clients of the server, or the queue not freed in time)")
            if not wait_idle(host, port, args.server_timeout_s or args.time_limit):
                warnings.append(f"{label}: the server was still busy afterwards (its /metrics gauges)")
        return True

    exit_status = 0
    try:
        if args.url:
            host, port = loopback_url(args.url)
            error = wait_health(host, port, args.load_timeout)
            if error:
                sys.exit(f"{args.url}: {error}")
            batch = args.batch_sizes[0] if args.batch_sizes else None
            run_server_scenarios(host, port, batch, args.max_queue, f"{args.url}")
        else:
            for batch in args.batch_sizes:
                tag = f"batch {batch}, queue {args.max_queue}"
                print(f"[loadtest] starting the server for {tag}", file=sys.stderr, flush=True)
                srv_report = {"max_batch_size": batch, "max_queue": args.max_queue, "load_s": None}
                report["servers"].append(srv_report)
                try:
                    server = Server(args, batch, args.max_queue)
                except OSError as e:
                    problems.append(f"{tag}: cannot start {args.binary}: {e}")
                    continue
                srv_report["command"] = shlex.join(server.cmd)
                try:
                    error = server.start(args.load_timeout)
                    if error:
                        problems.append(f"{tag}: {error}")
                        server.kill()
                        continue
                    srv_report["load_s"] = server.load_s
                    srv_report["port"] = server.port
                    if not run_server_scenarios(server.host, server.port, batch, args.max_queue, tag, server):
                        if server.proc.poll() is not None:
                            srv_report.update(exit_status=server.proc.returncode, died=True)
                            continue
                    rc, seconds, error = server.stop(args.stop_timeout)
                    srv_report.update(exit_status=rc, stop_s=seconds)
                    if error:
                        problems.append(f"{tag}: the server {error}")
                finally:
                    server.kill()
    except KeyboardInterrupt:
        problems.append("interrupted (Ctrl-C): the figures are incomplete")
        exit_status = 130

    report["ids_checked"] = ids_check.checked
    report["ids_mismatches"] = len(ids_check.mismatches)
    report["ids_mismatch_details"] = ids_check.mismatches
    report["reference"] = {
        "ids": ids_check.reference,
        "ids_len": len(ids_check.reference) if ids_check.reference is not None else None,
        "text": ids_check.reference_text,
        "where": ids_check.reference_where,
    }
    if ids_check.mismatches:
        where = Counter(m["where"] for m in ids_check.mismatches)
        first = ids_check.mismatches[0]
        problems.insert(0, f"CAPTIONS DIFFER: {len(ids_check.mismatches)} of {ids_check.checked} replies have "
                           f"other ids than the first ({ids_check.reference_where}); by scenario: "
                           f"{dict(where)}; first at token {first['first_difference']} in {first['where']}")
    if ids_check.reference is None:
        problems.append("no request succeeded")

    sys.stdout.write(markdown(report))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"[loadtest] wrote {args.json}", file=sys.stderr)
    if ids_check.mismatches:
        print(f"loadtest: CAPTIONS DEPEND ON BATCHING: {len(ids_check.mismatches)} replies differ "
              f"(see Problems)", file=sys.stderr)
    if problems and exit_status == 0:
        exit_status = 1
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
