"""What differs between gradio 3.41.2 (AUTOMATIC1111 1.10) and gradio 4.40.0 (Forge), in one place.

The tabs are written against the common subset and tested under both (``.ci/run``, ``.ci/gradio4``); the calls
whose spelling changed go through the functions here. What changed in behaviour, not spelling, the tabs avoid:

- gradio 4 runs events side by side and sends an event's inputs when it is triggered (gradio 3's queue ran one
  event at a time and asked for the inputs when it started), so a handler that runs every second must not write
  back a value it read: ``train_tab.poll`` sets the Job and Saved files boxes only when their value changes;
- gradio 4 warns about, and its page shows as empty, a Dropdown value outside the choices unless
  ``allow_custom_value``: every Dropdown a handler or an import may fill with another value allows it;
- gradio 3 heads a Dataframe updated with an empty list of rows "1 2 3 …" instead of its headers: handlers return
  ``table(rows, columns)``.
"""

from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwarg(code: str) -> dict[str, str]:
    """The keyword that runs ``code`` (a JS function expression or name) in the browser before/after an event:
    ``_js`` in gradio 3, ``js`` in gradio 4."""
    return {"_js" if GRADIO_MAJOR < 4 else "js": code}


def poll_kwarg(seconds: float) -> dict[str, float]:
    """``every=`` re-runs a ``load`` handler in gradio 3 and 4 alike (4.40 runs it on a hidden ``gr.Timer``, which
    does not exist in 3)."""
    return {"every": seconds}


def table(rows: list[list], columns: list[str]):
    """A Dataframe's value that keeps its column names when there are no rows (a DataFrame: gradio's own dependency)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)
