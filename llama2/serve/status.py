"""GET /health (for probes: 503 once the engine cannot serve) and /metrics (Prometheus' text
format), read from the engine's counters. Neither needs the API key."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .engine import Engine


async def health(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    with engine.stats.lock:
        errors, last = engine.stats.engine_errors, engine.stats.last_error
    ok = engine.alive and not engine.stopping
    state = "ok" if ok else ("shutting_down" if engine.stopping else "engine_dead")
    body = {
        "status": state,
        "running": engine.num_running,
        "waiting": engine.num_waiting,
        "engine_errors": errors,  # exceptions the engine caught and survived
        "last_error": last,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def _header(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP llama2_{name} {help_}", f"# TYPE llama2_{name} {kind}"]


def _scalars(kind: str, rows: list[tuple[str, str, object]]) -> list[str]:
    """(name, help, value) rows of one kind: counters or gauges."""
    lines = []
    for name, help_, value in rows:
        lines += _header(name, kind, help_) + [f"llama2_{name} {value}"]
    return lines


def prometheus_text(engine: Engine) -> str:
    """The engine's counters, histograms and gauges, each named llama2_*."""
    s = engine.stats
    with s.lock:
        counters = [
            ("requests_total", "Requests received.", s.requests),
            ("prompt_tokens_total", "Prompt tokens.", s.prompt_tokens),
            (
                "prefix_cache_hit_tokens_total",
                "Prompt tokens taken from the prefix cache.",
                s.cached_prompt_tokens,
            ),
        ]
        if engine.pool is not None:
            evicted = engine.pool.evictions
            counters += [
                ("prefix_pool_evictions_total", "Blocks evicted from the prefix pool.", evicted)
            ]
        if engine.speculator is not None:
            counters += [
                (
                    "draft_proposed_tokens_total",
                    "Tokens the draft proposed.",
                    s.draft_proposed_tokens,
                ),
                ("draft_accepted_tokens_total", "Draft tokens accepted.", s.draft_accepted_tokens),
            ]
        counters += [
            ("generation_tokens_total", "Generated tokens.", s.generated_tokens),
            ("failed_requests_total", "Requests ended by an error.", s.failed_requests),
            ("engine_errors_total", "Exceptions inside the engine.", s.engine_errors),
        ]
        lines = _scalars("counter", counters)
        for name, help_, h in [
            ("time_to_first_token_seconds", "Time to the first token.", s.ttft),
            ("inter_token_latency_seconds", "Time between tokens.", s.itl),
            ("request_latency_seconds", "Time from submission to the end.", s.e2e),
        ]:
            lines += _header(name, "histogram", help_) + h.render(f"llama2_{name}")
    gauges = [
        ("running_requests", "Requests in the running batch.", engine.num_running),
        ("waiting_requests", "Requests waiting for a slot.", engine.num_waiting),
    ]
    if engine.speculator is not None:
        rate = engine.speculator.acceptance
        gauges += [
            (
                "draft_acceptance_rate",
                "Share of the draft's proposed tokens accepted (NaN before any).",
                float("nan") if rate is None else rate,
            )
        ]
    return "\n".join(lines + _scalars("gauge", gauges)) + "\n"


async def metrics(request: Request) -> PlainTextResponse:
    text = prometheus_text(request.app.state.engine)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
