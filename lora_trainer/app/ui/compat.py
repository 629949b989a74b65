"""What differs between gradio 3.41 (AUTOMATIC1111 1.10) and gradio 4 (Forge), in one place.

The tabs are written against the common subset; the few calls whose spelling changed go through here.
"""

from __future__ import annotations

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwarg(code: str) -> dict[str, str]:
    """The keyword that runs ``code`` (a JS function expression or name) in the browser before/after an event:
    ``_js`` in gradio 3, ``js`` in gradio 4."""
    return {"_js" if GRADIO_MAJOR < 4 else "js": code}


def poll_kwarg(seconds: float) -> dict[str, float]:
    """``every=`` re-runs a ``load`` handler in gradio 3 and 4 alike (gradio 4's ``gr.Timer`` does not exist in 3)."""
    return {"every": seconds}
