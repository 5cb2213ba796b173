"""What every Gradio event handler of the app shares: failures shown as readable messages (never a
stack trace), warnings as toasts, and the one queue slot of the events that run the model."""

from __future__ import annotations

import functools
import html
import logging
from typing import TYPE_CHECKING

import gradio as gr

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Heavy events (generate, attribute, inspect, build) share this slot: the model runs one job at a time
HEAVY = dict(concurrency_id="model", concurrency_limit=1)

log = logging.getLogger("das_sd.app")


def as_html(message: str) -> str:
    """A message for Gradio's alerts, which render HTML: file names, prompts and captions in it shown as text.

    Args:
        message: Plain text.

    Returns:
        ``message`` with ``&``, ``<`` and ``>`` escaped.
    """
    return html.escape(message, quote=False)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show failures as readable messages in the UI, never as a stack trace.

    Args:
        fn: A Gradio event handler.

    Returns:
        ``fn`` wrapped: ``ValueError``, ``OSError`` and ``ArithmeticError`` become a ``gr.Error`` with
        their message; any other exception is logged and shown by type and message.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError, ArithmeticError) as exc:  # das-sd's own errors are ValueErrors
            raise gr.Error(as_html(str(exc)), print_exception=False) from None
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(as_html(f"unexpected {type(exc).__name__}: {exc} (details in the server log)"),
                           print_exception=False) from None
    return wrapper


def warn(note: str | None) -> None:
    """Show ``note`` (first letter capitalised) as a Gradio warning toast.

    Args:
        note: The sentence to show; None or empty: nothing is shown.
    """
    if note:
        gr.Warning(as_html(note[0].upper() + note[1:]))
