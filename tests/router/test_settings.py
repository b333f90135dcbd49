"""Router settings and the ``ftserve router`` options generated from them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ftserve.cli import build_parser, validated
from ftserve.config import ConfigError
from ftserve.router.settings import RouterConfig


def test_replica_urls_are_normalised() -> None:
    config = RouterConfig(replicas=["http://10.0.0.1:3000/", "https://b.example:8443"])
    assert config.replicas == ["http://10.0.0.1:3000", "https://b.example:8443"]


@pytest.mark.parametrize("url", ["10.0.0.1:3000", "ftp://h:1", "http://h:1/v1", "http://:3000"])
def test_a_replica_that_is_not_a_base_url_is_refused_by_name(url: str) -> None:
    with pytest.raises(ValidationError, match="not a base URL"):
        RouterConfig(replicas=[url])


def test_the_same_replica_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="twice"):
        RouterConfig(replicas=["http://a:1", "http://a:1/"])


def test_replicas_or_a_dns_name_is_required() -> None:
    with pytest.raises(ValidationError, match="dns_name"):
        RouterConfig()
    assert RouterConfig(dns_name="ftserve-headless").replicas == []


@pytest.mark.parametrize("field", [{"max_load_factor": 0.9}, {"refresh_s": 0}, {"port": 0}, {"unknown": 1}])
def test_out_of_bounds_and_unknown_settings_are_refused(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RouterConfig(replicas=["http://a:1"], **field)


def test_cli_options_come_from_the_settings() -> None:
    ns = build_parser().parse_args(
        ["router", "--replicas", "http://a:3000,http://b:3000", "--max-load-factor", "1.5", "--port", "3200"]
    )
    config = validated(RouterConfig, ns, "router")
    assert config.replicas == ["http://a:3000", "http://b:3000"]
    assert (config.max_load_factor, config.port, config.host) == (1.5, 3200, "127.0.0.1")
    with pytest.raises(ConfigError, match="router"):
        validated(RouterConfig, build_parser().parse_args(["router"]), "router")
