"""Settings of ``ftserve router``; the CLI options are generated from this model."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RouterConfig(BaseModel):
    """Where the replicas are, how often to look at them, and how to spread requests over them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: list[str] = Field(
        default_factory=list, description="Base URLs of ftserve replicas (REST), e.g. http://10.0.0.7:3000."
    )
    dns_name: str | None = Field(
        None,
        min_length=1,
        description="A name whose A/AAAA records are the replicas (a Kubernetes headless Service); "
        "re-resolved at every refresh.",
    )
    replica_port: int = Field(3000, ge=1, le=65535, description="REST port of the replicas found through dns_name.")
    refresh_s: float = Field(2.0, gt=0, le=3600, description="Seconds between readiness and adapter polls.")
    probe_timeout_s: float = Field(2.0, gt=0, le=60, description="Timeout of one readiness or adapter poll.")
    admin_token_env: str = Field(
        "FTSERVE_ADMIN_TOKEN",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable with the replicas' admin bearer token, used to read which adapters "
        "each one holds; unset: routing by hash and load only.",
    )
    max_load_factor: float = Field(
        1.25,
        ge=1.0,
        le=100.0,
        description="Bounded load: a replica with more than this times the mean in-flight count (+1) is skipped.",
    )
    host: str = Field("127.0.0.1", min_length=1, description="Address the router listens on.")
    port: int = Field(3100, ge=1, le=65535, description="Port the router listens on.")
    connect_timeout_s: float = Field(5.0, gt=0, le=300, description="Timeout to connect to a replica.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a replica's next bytes (headers or the next streamed chunk)."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body accepted (match the replicas' limits.max_request_bytes)."
    )

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        out = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError(f"replica {url!r} is not a base URL like http://host:port")
            out.append(url.rstrip("/"))
        if len(set(out)) != len(out):
            raise ValueError(f"replicas {out} name one replica twice")
        return out

    @model_validator(mode="after")
    def _somewhere(self) -> RouterConfig:
        if not self.replicas and self.dns_name is None:
            raise ValueError("give replicas (base URLs) and/or dns_name (a headless Service name)")
        return self
