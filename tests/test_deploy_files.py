"""compose.yaml and the Dockerfile stay in step with the code (no Docker engine runs here, so
the files are checked structurally: every reference must resolve)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _members() -> list[Path]:
    return sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml")) + sorted(
        p.parent for p in ROOT.glob("services/*/pyproject.toml")
    )


def _scripts(member: Path) -> set[str]:
    project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
    return set(project.get("scripts", {}))


def _env_names_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("packages/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        source = path.read_text()
        names.update(re.findall(r"""(?:env|environ)\.get\(\s*["']([A-Z0-9_]+)["']""", source))
        names.update(re.findall(r"""_(?:int|float)\(env,\s*["']([A-Z0-9_]+)["']""", source))
    return names


def test_every_compose_service_resolves() -> None:
    compose = _compose()
    services: dict[str, Any] = compose["services"]
    names = set(services)
    known_env = _env_names_read_by_code()
    assert {"redis", "postgres", "migrate", "gateway", "ai-worker"} <= names
    for name, spec in services.items():
        assert "image" in spec or "build" in spec, name
        for dep in spec.get("depends_on", {}):
            assert dep in names, f"{name} depends on unknown {dep}"
        if "build" not in spec:
            continue
        service = spec["build"]["args"]["SERVICE"]
        member = ROOT / "services" / service
        assert member.is_dir(), f"{name} builds unknown service {service}"
        command = spec.get("command", [service])[0]
        scripts = _scripts(member) | {"alembic"}  # alembic comes with chat-domain
        assert command in scripts, f"{name}: {command} is not an entry point of {service}"
        unknown = set(spec.get("environment", {})) - known_env
        assert not unknown, f"{name} sets variables no code reads: {unknown}"
    assert services["gateway"]["environment"]["GATEWAY_ROLE"] == "http"
    # the workers bind no port: their own entry point, liveness through its health command
    assert services["gateway-worker"]["command"] == ["gateway-workers"]
    assert services["gateway-worker"]["healthcheck"]["test"][-2:] == ["gateway-workers", "health"]
    assert services["ai-worker"]["healthcheck"]["test"][-2:] == ["ai-worker", "health"]


def test_dockerfile_copies_every_workspace_member() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+)/pyproject\.toml", dockerfile, flags=re.MULTILINE))
    expected = {str(m.relative_to(ROOT)) for m in _members()}
    assert copied == expected, f"missing {expected - copied}, stale {copied - expected}"
    for path in re.findall(r"^COPY (?!--)(\S+) ", dockerfile, flags=re.MULTILINE):
        if path != "pyproject.toml" and "/pyproject.toml" not in path:
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_service_entry_points_exist() -> None:
    for member in _members():
        for script, target in (
            tomllib.loads((member / "pyproject.toml").read_text())["project"]
            .get("scripts", {})
            .items()
        ):
            module, _, func = target.partition(":")
            path = member / "src" / Path(*module.split("."))
            source = (
                path.with_suffix(".py")
                if path.with_suffix(".py").exists()
                else path / "__init__.py"
            ).read_text()
            assert re.search(rf"^def {func}\(", source, flags=re.MULTILINE), f"{script} -> {target}"
