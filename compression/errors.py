"""Errors the engine raises on purpose. Each has a stable ``code`` (used by the
service as the problem type) and a message that tells the user what to fix."""

from __future__ import annotations


class TensorTrimError(Exception):
    """Base class: a failure we understand and can explain to the user."""

    code = "tensortrim_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ArchiveError(TensorTrimError):
    """The uploaded file is not a sane TorchScript zip archive."""

    code = "bad_archive"


class InputSpecError(TensorTrimError):
    """The input spec cannot be parsed or does not fit the model."""

    code = "input_spec_mismatch"


class UnsupportedModelError(TensorTrimError):
    """The model loads but cannot be turned into an editable graph.

    ``code`` names the cause: ``data_dependent_control_flow``,
    ``fused_fast_path``, ``no_decomposable_layer`` or ``conversion_failed``.
    """

    code = "unsupported_model"


class RankError(TensorTrimError):
    """Requested ranks are invalid for a layer."""

    code = "invalid_ranks"


class BudgetError(TensorTrimError):
    """The budget cannot be parsed or cannot be met."""

    code = "invalid_budget"


class ExportError(TensorTrimError):
    """An exported file did not load back or did not match the in-memory model."""

    code = "export_failed"
