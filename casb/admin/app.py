"""The admin API. Health endpoints are open (probes); everything else needs a bearer
token whose principal holds one of `admin.roles`.

    GET  /healthz             liveness: the process serves HTTP
    GET  /readyz              readiness: signing keys loaded, policy compiled, audit writable;
                              the active policy version and the state store's health
    POST /v1/policy/simulate  what the proxy would decide (same JSON as `casb policy explain`)
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime,
# including ones that name closures (the admin dependency).
import asyncio
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from casb import __version__
from casb.context import Principal
from casb.explain import explain
from casb.identity import AuthenticationError, IdentityUnavailable, extract_token
from casb.identity.revocation import REVOKED_CHALLENGE
from casb.runtime import Runtime
from casb.state.store import StateUnavailable


class SimulateRequest(BaseModel):
    method: str = "GET"
    url: str = Field(
        description="Proxy URL path as a client would send it, e.g. "
        "/pacs/studies?ModalitiesInStudy=CT"
    )
    principal: dict[str, Any] | None = Field(
        None, description="{sub, roles, mfa, claims}; omit to use the caller's own token"
    )
    time: str | None = Field(None, description="ISO 8601 time to evaluate at; default now")


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="casb admin", version=__version__)
    pipeline = runtime.pipeline
    admin_roles = frozenset(runtime.settings.admin.roles)
    assert runtime.settings.identity is not None  # Runtime.build fills in dev identity
    max_token = runtime.settings.identity.max_token_bytes

    async def admin_principal(
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        headers = [("Authorization", authorization)] if authorization is not None else []
        try:
            token, _ = extract_token(headers, (), allow_query=False, max_bytes=max_token)
            principal = await pipeline.verifier.verify(token)
        except AuthenticationError as exc:
            raise HTTPException(
                401,
                exc.description or "a bearer token is required",
                headers={"WWW-Authenticate": exc.www_authenticate()},
            ) from None
        except IdentityUnavailable:
            raise HTTPException(503, "signing keys are unavailable") from None
        if pipeline.revocation is not None:  # a revoked token opens no admin API either
            try:
                check = await pipeline.revocation.check(principal)
            except StateUnavailable:
                raise HTTPException(
                    503, "the shared state store cannot be reached to check token revocations"
                ) from None
            if check.revoked:
                raise HTTPException(
                    401,
                    "the token was revoked",
                    headers={"WWW-Authenticate": REVOKED_CHALLENGE},
                )
        if principal.roles.isdisjoint(admin_roles):
            raise HTTPException(403, f"the admin API needs one of the roles {sorted(admin_roles)}")
        return principal

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def state_health() -> dict[str, Any]:
        """The state store answers? Not a readiness condition: without it the last good
        policy keeps serving (and revocation / rate limits do what degraded_mode says),
        so the replica reports itself degraded instead of leaving the Service."""
        store, distributor = runtime.state, runtime.policy_distributor
        try:
            async with asyncio.timeout(state_timeout):
                health = await store.ping()
            ok = health.ok
        except (StateUnavailable, TimeoutError):
            ok = False
        degraded = not ok or (distributor is not None and distributor.degraded)
        return {"backend": store.backend, "ok": ok, "degraded": degraded}

    state_timeout = max(runtime.settings.state.timeout_seconds, 0.1)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        audit = pipeline.audit
        checks = {
            "signing_keys": pipeline.verifier.ready,
            "policy": True,
            # the last audit write failed: requests are refused until one succeeds
            "audit": audit is not None and audit.healthy,
        }
        ready = all(checks.values())
        state = await state_health()
        distributor = runtime.policy_distributor
        policy = pipeline.policy  # one read: version and rules of the same policy
        body: dict[str, Any] = {
            "status": ("degraded" if state["degraded"] else "ready") if ready else "not_ready",
            "checks": checks,
            "policy_version": policy.version,
            "policy_source": distributor.source if distributor is not None else "files",
            "rules": policy.rule_count,
            "state": state,
        }
        if runtime.stream is not None:  # not a readiness condition either
            st = runtime.stream
            body["audit_stream"] = {
                "connected": st.connected,
                "lag": st.lag,
                "last_error": st.last_error,
                "replica_key": st.replica_key,
            }
        if runtime.forwarder is not None:
            # not a readiness condition: the local audit log is the spool
            fwd = runtime.forwarder
            body["audit_syslog"] = {
                "connected": fwd.connected,
                "lag": fwd.lag,
                "last_error": fwd.last_error,
            }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post("/v1/policy/simulate")
    async def simulate(
        req: SimulateRequest, caller: Annotated[Principal, Depends(admin_principal)]
    ) -> Any:
        try:
            return await explain(
                pipeline,
                method=req.method,
                url=req.url,
                principal=req.principal or caller,
                at=req.time,
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    return app
