"""All service configuration, read once from ``TENSORTRIM_*`` environment variables.

``embedded`` mode needs nothing but a writable directory: SQLite for the database,
kombu's SQLAlchemy transport (also SQLite) as the broker, local storage. ``full``
mode is the production shape: Postgres, Redis, Celery GPU workers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_KEY = "insecure-embedded-only-secret"
GiB = 1024**3


def _in_data_dir(data: dict[str, Any], name: str) -> Path:
    return Path(data["data_dir"]).resolve() / name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENSORTRIM_", extra="ignore")

    mode: Literal["embedded", "full"] = "embedded"
    data_dir: Path = Path("data")
    # Defaults depend on mode: full mode must name its database, and gets local Redis as broker.
    database_url: str = Field(
        default_factory=lambda d: f"sqlite:///{_in_data_dir(d, 'tensortrim.db')}" if d["mode"] == "embedded" else ""
    )
    broker_url: str = Field(
        default_factory=lambda d: (
            f"sqla+sqlite:///{_in_data_dir(d, 'broker.db')}" if d["mode"] == "embedded" else "redis://127.0.0.1:6379/0"
        )
    )
    storage_dir: Path = Field(default_factory=lambda d: Path(d["data_dir"]) / "storage")
    # Uploads and artifacts: the local storage_dir by default, or an S3-compatible bucket.
    storage_backend: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 (MinIO); None: AWS
    s3_bucket: str = ""
    s3_region: str | None = None
    s3_access_key_id: str | None = None  # None: boto3's usual credential chain
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = ""  # object names are <prefix>/<kind>/<2 hex>/<32 hex>

    # HMAC key for API-key hashes: changing it invalidates every issued key.
    secret_key: SecretStr = SecretStr(DEFAULT_SECRET_KEY)

    max_upload_bytes: int = Field(default=2 * GiB, gt=0)
    # Refuse writes that would leave less than this free on the storage volume.
    min_free_bytes: int = Field(default=1 * GiB, ge=0)
    job_time_limit_s: int = Field(default=4 * 3600, gt=0)
    # A running job whose heartbeat is older than this may be claimed again.
    heartbeat_stale_s: int = Field(default=120, gt=0)
    max_attempts: int = Field(default=3, gt=0)

    quota_storage_bytes: int = Field(default=20 * GiB, gt=0)
    quota_concurrent_jobs: int = Field(default=2, gt=0)
    # Per-API-key token bucket: this many requests per second on average, bursts up to
    # rate_limit_burst (Redis in full mode, in-process in embedded mode). 0 turns it off.
    rate_limit_per_s: float = Field(default=10.0, ge=0)
    rate_limit_burst: int = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _check_full_mode(self) -> Self:
        if self.mode == "full":
            secret = self.secret_key.get_secret_value()
            if secret == DEFAULT_SECRET_KEY or len(secret) < 32:
                raise ValueError("TENSORTRIM_SECRET_KEY must be a random string of 32+ characters in full mode")
            if not self.database_url:
                raise ValueError("TENSORTRIM_DATABASE_URL is required in full mode")
        return self

    @model_validator(mode="after")
    def _check_s3(self) -> Self:
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("TENSORTRIM_S3_BUCKET is required when TENSORTRIM_STORAGE_BACKEND=s3")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
