"""Stage log lines in the Prefect UI: the posttrain logger's records, sent to the current Prefect run."""

from __future__ import annotations

import logging


class PrefectRunHandler(logging.Handler):
    """Sends records to the Prefect API as logs of the flow or task run in context; outside a run, drops them
    (a plain function call, a rank of a multi-process launch)."""

    def __init__(self):
        super().__init__()
        from prefect.logging.handlers import APILogHandler

        self._api = APILogHandler()
        self._api.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError

        try:
            get_run_context()
        except MissingContextError:
            return
        self._api.emit(record)


class PrefectProgress:
    """A progress artifact (0-100 %) of a training stage, updated as it trains; inert outside a Prefect run."""

    def __init__(self, stage: str):
        import re

        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError

        self.id, self.shown = None, -1.0
        try:
            get_run_context()
        except MissingContextError:
            return
        from prefect.artifacts import create_progress_artifact

        key = "progress-" + re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")
        self.id = create_progress_artifact(0.0, key=key, description=f"Training progress of stage {stage}")

    def update(self, step: int, total: int) -> None:
        if self.id is None or total <= 0:
            return
        percent = round(100.0 * step / total, 1)
        if percent >= self.shown + 5 or percent >= 100:  # a handful of API calls per stage, not one per step
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, percent)
            self.shown = percent


def quiet_model_loading() -> None:
    """No 'Loading weights' bar per model: evaluation loads several, and the stage's own lines say what runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
