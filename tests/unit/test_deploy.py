"""The deployment files agree with the code (no Docker engine needed)."""

from __future__ import annotations

import pathlib
import re
import tomllib

import yaml

from core.config import load

ROOT = pathlib.Path(__file__).resolve().parents[2]


def compose() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_redis_keeps_credits_safe() -> None:
    redis = compose()["services"]["redis"]  # type: ignore[index]
    args = redis["command"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["volumes"]


def test_services_share_one_image_and_valid_environment() -> None:
    services = compose()["services"]  # type: ignore[index]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("agent-credits")}
    assert {"migrate", "meter", "settler"} <= set(ours)
    assert len({s["image"] for s in ours.values()}) == 1
    env = {k: "x" * 40 if k == "JWT_SECRET" else v for k, v in ours["meter"]["environment"].items()}

    # ${VAR:-default} -> its default; a required ${VAR:?...} -> a long secret
    def expand(value: str) -> str:
        return re.sub(r"\$\{[^}:]*:-([^}]*)\}", r"\1", re.sub(r"\$\{[^}:]*:\?[^}]*\}", "s" * 40, value))

    env = {k: expand(str(v)) if k != "JWT_SECRET" else v for k, v in env.items()}
    env["DURABILITY"] = "async"
    config = load(env)  # every variable decodes
    assert config.redis_url == "redis://redis:6379/0" and not config.embedded


def test_every_secret_must_be_set() -> None:
    """No password or key of the deployment has a default that could stay in production."""
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "APP_DB_PASSWORD", "SETTLER_DB_PASSWORD", "JWT_SECRET", "STRIPE_SECRET_KEY",
                   "STRIPE_WEBHOOK_SECRET"):  # fmt: skip
        uses = re.findall(r"\$\{" + secret + r"(:[-?])", text)
        assert uses and set(uses) == {":?"}, secret
    assert "change-me" not in text


def test_image_contains_every_package() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "packages"
    ]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, package
