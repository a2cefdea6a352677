"""The web UI under ``/ui``: upload form and job dashboard (server-rendered Jinja2)."""

from __future__ import annotations

from app.ui.routes import router

__all__ = ["router"]
