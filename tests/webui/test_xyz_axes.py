import numpy as np
import pytest

from lora_trainer.errors import UserError
from tests.webui.conftest import txt2img


def _axis(w, label):
    return next(o for o in w.xyz.axis_options if o.label == f"[LoRA] {label}")


def _applied(w, label, prompt, x, xs):
    p = w.processing.StableDiffusionProcessingTxt2Img(prompt=prompt)
    _axis(w, label).apply(p, x, xs)
    return p.prompt


def test_axes_rewrite_the_lora_tag(load_extension):
    w = load_extension()
    prompt = "cat <lora:cats:0.5:lbw=OUTD>, <lora:dogs:0.3> and <lora:cats:0.8:0.2>"
    assert _applied(w, "Strength", prompt, 1.0, [1.0]) == "cat <lora:cats:1:lbw=OUTD>, <lora:dogs:0.3> and <lora:cats:1>"
    # the epoch's file stem: what the built-in handler knows too (it has no run@eN); the last epoch is the final file
    assert _applied(w, "Epoch", prompt, 1, [1]).startswith("cat <lora:cats-000001:0.5:lbw=OUTD>, <lora:dogs:0.3> and <lora:cats-000001:0.8")
    assert _applied(w, "Epoch", "x <lora:cats-000001:1>", 2, [2]) == "x <lora:cats:1>"
    assert _applied(w, "Epoch", "x <lora:cats@e1:1>", 2, [2]) == "x <lora:cats:1>"
    with pytest.raises(UserError, match=r"\[LoRA\] Epoch 7: the Lora folders hold no file of epoch 7 of 'cats'"):
        _axis(w, "Epoch").confirm(w.processing.StableDiffusionProcessingTxt2Img(prompt=prompt), [1, 7])
    assert _applied(w, "Name", "x <lora:cats:0.7>", "renamed_file", []) == "x <lora:renamed_file:0.7>"
    assert _applied(w, "Block weights", "x <lora:cats:1:lbw=INS>", "OUTD", []) == "x <lora:cats:1:lbw=OUTD>"
    assert _applied(w, "Block weights", "x <lora:cats:1>", "1 0 0 0 0 0 0 0 1 1 1 1 0 0 0 0 0", []) == \
        "x <lora:cats:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>"
    with pytest.raises(UserError, match="no <lora:"):
        _applied(w, "Strength", "no tag here", 1.0, [1.0])
    with pytest.raises(UserError, match="3 values"):
        _axis(w, "Block weights").confirm(None, ["OUTD", "1,0,1"])
    assert w.xyz.format_value_add_label(None, _axis(w, "Strength"), 0.5) == "[LoRA] Strength: 0.5"


def test_name_axis_offers_the_library(load_extension):
    w = load_extension()
    assert _axis(w, "Name").choices() == ["cats", "cats-000001", "renamed_file", "xl_style"]


def test_strength_and_epoch_cells_generate_different_images(webui):
    cells = []
    for label, x in (("Strength", 0.0), ("Strength", 1.0), ("Epoch", 1)):
        p = webui.processing.StableDiffusionProcessingTxt2Img(prompt="a red circle <lora:cats:1>", seed=3, steps=1,
                                                              width=64, height=64, sampler_name="Euler", cfg_scale=5)
        _axis(webui, label).apply(p, x, [x])
        cells.append(np.asarray(webui.processing.process_images(p).images[0]))
    _, base = txt2img(webui, "a red circle")
    assert np.array_equal(cells[0], np.asarray(base.images[0]))  # strength 0 = no LoRA
    assert not np.array_equal(cells[1], cells[0]) and not np.array_equal(cells[2], cells[1])
