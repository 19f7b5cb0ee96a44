"""HTTP checks and reports of scripts/image-test.sh (standard library only: runs on the host's
python3, not the project venv).

    image_test_checks.py serve URL OUT.json            the API of a running image
    image_test_checks.py compose URL PROM_URL OUT.json budgeted traffic, then Prometheus
    image_test_checks.py wait URL SECONDS              until URL answers 200
    image_test_checks.py report OUT.json key=value...  a phase report (key=@file.json embeds)
    image_test_checks.py readme-run README NAME PORT IMAGE [ARG...]
                                                       README's `docker run` line of the CPU
                                                       image as the serve phase runs it (argv,
                                                       NUL-separated)

A failed check prints what was expected and what came back, and exits 1.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

MODEL = "smollm2"
BUDGET = 300
# ~1.2k tokens: well over BUDGET, so a budgeted request must evict.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 120


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def http(method: str, url: str, body: dict | None = None, timeout: float = 300.0):
    """(status, parsed JSON or text) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            status, _ = http("GET", url, timeout=5)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = repr(e)
        time.sleep(2)
    raise CheckFailed(f"{url} not answering 200 after {seconds:.0f} s (last: {last})")


def budgeted_completion(base: str) -> dict:
    body = {
        "model": MODEL,
        "prompt": LONG_PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "kv_budget": BUDGET,
    }
    status, data = http("POST", base + "/v1/completions", body)
    expect(status == 200, f"budgeted completion: HTTP {status}: {str(data)[:2000]}")
    expect(isinstance(data, dict) and "kv_eviction" in data, f"no kv_eviction in {data}")
    stats = data["kv_eviction"]
    expect(stats.get("budget") == BUDGET, f"kv_eviction.budget != {BUDGET}: {stats}")
    expect(stats.get("evicted_tokens", 0) > 0, f"nothing evicted: {stats}")
    expect(bool(data["choices"][0]["text"]), f"empty completion: {data}")
    return {"kv_eviction": stats, "text": data["choices"][0]["text"], "usage": data.get("usage")}


def bad_budget(base: str, value) -> dict:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "kv_budget": value}
    status, data = http("POST", base + "/v1/completions", body)
    expect(status == 400, f"kv_budget={value!r}: HTTP {status} (want 400): {data}")
    err = data.get("error", {}) if isinstance(data, dict) else {}
    expect(err.get("param") == "kv_budget", f"kv_budget={value!r}: error names {err}")
    return {"value": value, "status": status, "message": err.get("message")}


def metric_samples(text: str, prefix: str = "vllm_caote:") -> dict[str, float]:
    """{series line (name + labels): value} of the exposition lines starting with prefix."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


def serve(base: str, out: str) -> None:
    wait(base + "/health", 30)
    status, models = http("GET", base + "/v1/models")
    expect(status == 200, f"/v1/models: HTTP {status}")
    ids = [m["id"] for m in models["data"]]
    expect(MODEL in ids, f"{MODEL} not served: {ids}")
    completion = budgeted_completion(base)
    bad = [bad_budget(base, -5), bad_budget(base, "abc")]
    status, text = http("GET", base + "/metrics")
    expect(status == 200, f"/metrics: HTTP {status}")
    samples = metric_samples(text)
    names = sorted({s.split("{", 1)[0] for s in samples})
    expect(bool(names), "no vllm_caote:* series on /metrics")
    evicted = sum(v for s, v in samples.items() if s.startswith("vllm_caote:evicted_tokens_total"))
    expect(evicted > 0, f"vllm_caote:evicted_tokens_total is {evicted} after a budgeted request")
    result = {
        "models": ids,
        "completion": completion,
        "bad_budget": bad,
        "metrics": names,
        "evicted_tokens_total": evicted,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def prom_query(prom: str, query: str) -> list[dict]:
    status, data = http("GET", prom + "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    expect(status == 200 and data.get("status") == "success", f"{query}: {status} {data}")
    return data["data"]["result"]


def compose(base: str, prom: str, out: str) -> None:
    wait(prom + "/-/ready", 120)
    completions = [budgeted_completion(base) for _ in range(3)]
    query = "vllm_caote:evicted_tokens_total"
    deadline = time.monotonic() + 120  # the stack's scrape interval is 5 s
    series: list[dict] = []
    while time.monotonic() < deadline:
        series = [s for s in prom_query(prom, query) if float(s["value"][1]) > 0]
        if series:
            break
        time.sleep(3)
    expect(bool(series), f"Prometheus has no {query} > 0 after budgeted traffic")
    up = prom_query(prom, 'up{job="vllm"}')
    expect(bool(up) and float(up[0]["value"][1]) == 1, f"up{{job='vllm'}}: {up}")
    names = prom_query(prom, 'count by (__name__) ({__name__=~"vllm_caote:.+"})')
    result = {
        "completions": [c["kv_eviction"] for c in completions],
        "series": series,
        "up": up,
        "prometheus_names": sorted(s["metric"]["__name__"] for s in names),
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def report(out: str, pairs: list[str]) -> None:
    data: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.startswith("@"):
            with open(value[1:]) as f:
                data[key] = json.load(f)
            continue
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    with open(out, "w") as f:
        json.dump(data, f, indent=1)


#: README.md's `docker run` line of the CPU image sits between these two comments: the serve
#: phase runs that line as written (with podman), so the README's command is the tested one.
README_RUN_BEGIN = "<!-- image-test: docker run (cpu) -->"
README_RUN_END = "<!-- /image-test -->"
README_IMAGE = "vllm-caote:cpu"


def readme_docker_run(text: str) -> list[str]:
    """argv of the one ``docker run`` line between the README's image-test markers."""
    begin = text.find(README_RUN_BEGIN)
    end = text.find(README_RUN_END, begin + 1)
    expect(begin >= 0 and end > begin, f"no {README_RUN_BEGIN} ... {README_RUN_END} in README")
    block = text[begin + len(README_RUN_BEGIN) : end].replace("\\\n", " ")
    lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("docker run ")]
    expect(len(lines) == 1, f"want one `docker run` line between the markers, got {lines}")
    argv = shlex.split(lines[0], comments=True)
    expect(argv[-1] == README_IMAGE, f"the README's line must end with {README_IMAGE}: {argv}")
    return argv


def podman_run_argv(readme: list[str], name: str, port: int, image: str, extra=()) -> list[str]:
    """The README's ``docker run`` line as the serve phase runs it: ``podman`` for ``docker``,
    detached and named, the published port 8000 on ``127.0.0.1:port``, ``--rm`` left out (a
    container that dies during start-up keeps its log), ``extra`` (the test's ``-e`` settings)
    before the image, the image by its local name. Every other flag stays as written."""
    expect(readme[:2] == ["docker", "run"], f"not a docker run line: {readme}")
    flags, published = [], 0
    args = iter(readme[2:-1])
    for arg in args:
        if arg == "--rm":
            continue
        if arg in ("-p", "--publish"):
            value = next(args, "")
            expect(value.endswith(":8000"), f"the README publishes {value!r}, not port 8000")
            flags += [arg, f"127.0.0.1:{port}:8000"]
            published += 1
            continue
        flags.append(arg)
    expect(published == 1, f"the README's line must publish port 8000 once: {readme}")
    return ["podman", "run", "-d", "--name", name, *flags, *extra, image]


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "serve":
            serve(args[0], args[1])
        elif cmd == "compose":
            compose(args[0], args[1], args[2])
        elif cmd == "wait":
            wait(args[0], float(args[1]))
        elif cmd == "report":
            report(args[0], args[1:])
        elif cmd == "readme-run":
            with open(args[0]) as f:
                readme = readme_docker_run(f.read())
            run = podman_run_argv(readme, args[1], int(args[2]), args[3], args[4:])
            sys.stdout.write("\0".join(run) + "\0")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except CheckFailed as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
