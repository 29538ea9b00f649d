"""Admin API (FastAPI) for SREs and security teams: health, readiness, policy simulation."""

from casb.admin.app import create_app

__all__ = ["create_app"]
