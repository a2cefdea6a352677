"""Compression jobs."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.common import ORM

Form = Literal["tucker2", "cp", "cp4"]
RankEntry = list[int] | int | float | dict[str, Any]
MAX_SWEEP = 6  # budgets in one sweep, the job's own included: each one is a full compression run


class FinetuneOptions(BaseModel):
    """Fine-tuning after decomposition, on the job's data set. A field left out takes the engine's
    default (``compression.finetune.finetune``: the recipe the quality benchmark measures), so the API,
    the page and the CLI fine-tune alike."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1, le=100, description="default 5")
    lr: float | None = Field(default=None, gt=0, le=1, description="learning rate; default 0.01 (SGD), 0.001 (AdamW)")
    batch_size: int | None = Field(default=None, ge=1, le=4096, description="default 64")
    optimizer: Literal["sgd", "adamw"] | None = Field(default=None, description="default SGD with Nesterov momentum")

    def engine_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "3f2c1a9e-0000-4000-8000-000000000000",
                    "input_spec": "3,224,224",
                    "budget": "flops:3x",
                    "form": "tucker2",
                },
                {
                    "model_id": "3f2c1a9e-0000-4000-8000-000000000000",
                    "dataset_id": "8b1d5c2e-0000-4000-8000-000000000000",
                    "budget": "params:40%",
                    "method": "batude",
                    "finetune": {"epochs": 2, "lr": 0.0001},
                },
            ]
        },
    )

    model_id: uuid.UUID = Field(description="an uploaded model (POST /api/v1/models)")
    dataset_id: uuid.UUID | None = Field(default=None, description="calibration / fine-tuning data (optional)")
    input_spec: str | None = Field(
        default=None,
        description="one sample's input shape without batch, e.g. `3,224,224`; defaults to the model's",
        examples=["3,224,224"],
    )
    budget: str = Field(
        description="`flops:3x` (3x fewer MACs), `params:0.4` (keep 40 %), `latency:8ms@1`", examples=["flops:3x"]
    )
    method: str | None = Field(default=None, description="rank-selection method; default: the best for your inputs")
    form: Form = Field(default="tucker2", description="decomposition of k x k convolutions")
    finetune: FinetuneOptions | None = Field(
        default=None,
        description="fine-tune after decomposing: on the dataset, or data-free (inputs synthesised from "
        "batch-norm statistics) without one",
    )
    ranks: dict[str, RankEntry] | None = Field(
        default=None,
        max_length=10_000,
        description="method `manual`: ranks per layer, named as the model's layer table lists them: "
        "`[R_in, R_out]` (Tucker-2), `[R]` (CP, SVD), a ratio in (0, 1] of the layer's maximum ranks, or "
        "`{form, ranks | ratio}`; layers not named stay dense. Giving ranks implies method `manual`",
        examples=[{"layer1.0.conv1": [16, 24], "layer1.0.conv2": 0.5}],
    )
    sweep: list[str] | None = Field(
        default=None,
        max_length=MAX_SWEEP - 1,
        description="also compress at these budgets and chart accuracy against MACs (`metrics.sweep`, "
        "`sweep.json`); the job's model files are those of `budget`",
        examples=[["flops:2x", "flops:4x"]],
    )

    @field_validator("input_spec")
    @classmethod
    def _spec(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from compression.errors import InputSpecError
        from compression.input_spec import InputSpec

        try:
            return InputSpec.parse(value).to_string()
        except InputSpecError as exc:
            raise ValueError(exc.message) from None

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        return _parse_budget(value)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        budgets = list(dict.fromkeys(_parse_budget(v) for v in value))
        if not budgets:
            raise ValueError("give at least one more budget to sweep over, e.g. ['flops:2x', 'flops:4x'], "
                             "or leave it out")
        return budgets

    def budgets(self) -> list[str]:
        """Every budget this job compresses at: its own first, then the sweep's."""
        return list(dict.fromkeys([self.budget, *(self.sweep or [])]))

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from compression.ranks import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}: choose one of {', '.join(sorted(METHODS))}, or leave it out")
        return value

    def chosen_method(self) -> str | None:
        """The method to record: ``manual`` when ranks are given without one."""
        return "manual" if self.ranks is not None and self.method is None else self.method

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"finetune": self.finetune.engine_options()} if self.finetune else {}
        if self.ranks is not None:
            options["method_options"] = {"ranks": self.ranks}
        if self.sweep:
            options["sweep"] = self.budgets()[1:]
        return options


def _parse_budget(value: str) -> str:
    from compression.budget import Budget
    from compression.errors import BudgetError

    try:
        Budget.parse(value)
    except BudgetError as exc:
        raise ValueError(exc.message) from None
    return value.strip()


class ErrorOut(BaseModel):
    code: str = Field(examples=["unsupported_model"])
    message: str


class ArtifactOut(ORM):
    name: str = Field(examples=["model.pt"])
    sha256: str
    size_bytes: int
    created_at: dt.datetime
    url: str = Field(examples=["/api/v1/jobs/0b6f.../artifacts/model.pt"])


class LayerRankOut(ORM):
    layer: str = Field(examples=["layer1.0.conv1"])
    form: str = Field(examples=["tucker2"])
    ranks: list[int] = Field(examples=[[16, 24]])
    macs_before: int
    macs_after: int


class JobOut(ORM):
    id: uuid.UUID
    status: str = Field(examples=["running"], description="queued, running, cancelling, succeeded, failed, cancelled")
    phase: str | None = Field(examples=["select"])
    progress: float = Field(examples=[0.42], description="0..1")
    eta_seconds: float | None = Field(default=None, description="rough estimate from progress so far")
    model_id: uuid.UUID
    dataset_id: uuid.UUID | None
    input_spec: str
    budget: str | None
    method: str | None
    form: str
    options: dict[str, Any]
    error: ErrorOut | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobDetail(JobOut):
    attempt: int
    message: str | None
    metrics: dict[str, Any] | None
    layers: list[LayerRankOut] = Field(default_factory=list, description="per-layer ranks of a finished job")
    artifacts: list[ArtifactOut] = Field(default_factory=list)


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` to get the next page")


class ArtifactList(BaseModel):
    items: list[ArtifactOut]
