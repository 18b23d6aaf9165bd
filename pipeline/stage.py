"""What every ``stages/*.py`` shares: logging set-up, and expected failures printed as one
clear message with a non-zero exit instead of a traceback."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable


class UserError(Exception):
    """A failure whose message tells the user everything (bad params, no verified download,
    a broken model file): reported without a traceback. Bugs still get their traceback."""


def run(main: Callable[[], object]) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        main()
    except UserError as exc:
        logging.getLogger("stage").error("%s", exc)
        raise SystemExit(1) from None
