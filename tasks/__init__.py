"""Prefect tasks: one unit of work each, thin wrappers over `llmpress.steps` passing paths and small dicts."""


def transient(_task: object, _run: object, state: object) -> bool:
    """Prefect's retry condition for I/O tasks: retry what may pass next time (a server restarting, a network
    error), never a refusal (`LlmpressError`: bad input, a missing model, a schema error), which fails the same way
    every time and would only bury its one-line message under retries."""
    from llmpress.errors import LlmpressError

    return not isinstance(failure(state), LlmpressError)


def failure(state: object) -> BaseException | None:
    """The exception a failed Prefect state holds, whether kept in the state or in a persisted result record."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    except Exception:  # a result that cannot be read back: treat the failure as unknown (retried)
        return None
    return result if isinstance(result, BaseException) else None
