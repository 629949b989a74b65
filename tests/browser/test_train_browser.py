"""The Train tab in a real browser: fill the form for a tiny run on the embedded model and the bundled sample
dataset, start it, watch progress, the loss plot and a sample, stop it (a file is saved), resume it to the end."""

from __future__ import annotations

import re

from lora_trainer.tiny_model.demo import SAMPLE_DATASET

STEP = re.compile(r"step (\d+)/(\d+)")


def _fill(page, elem_id: str, value: str, field: str = "textarea") -> None:
    page.locator(f"#{elem_id} {field}").first.fill(value)


def _holds(page, fields: dict[tuple[str, str], str], tries: int = 10) -> None:
    """Every field holds exactly what was filled in, filled again while not: on a loaded machine an update of the
    page that arrives late can merge with what was typed (an epochs field once read 108 for 8)."""
    for _ in range(tries):
        wrong = {key: value for key, value in fields.items()
                 if page.locator(f"#{key[0]} {key[1]}").first.input_value() != value}
        if not wrong:
            return
        for (elem_id, field), value in wrong.items():
            _fill(page, elem_id, value, field)
        page.wait_for_timeout(500)
    raise AssertionError(f"the form does not keep {sorted(wrong)}")


def _progress(page) -> str:
    return page.inner_text("#lora_trainer_progress_text")


WAIT_MS = 240_000  # upper bounds for a loaded CI machine; an idle one trains this run in seconds


def _wait_for_progress(page, pattern: str, timeout: float = WAIT_MS) -> str:
    page.wait_for_function(
        "pattern => new RegExp(pattern).test(document.querySelector('#lora_trainer_progress_text').innerText)",
        arg=pattern, timeout=timeout)
    return _progress(page)


# the heights of some elements, every 50 ms for 3 s (three polls of the live view)
_HEIGHTS_WHILE_POLLING = """selectors => new Promise(done => {
    const seen = selectors.map(() => []);
    const timer = setInterval(() => selectors.forEach((s, i) => seen[i].push(document.querySelector(s).getBoundingClientRect().height)), 50);
    setTimeout(() => { clearInterval(timer); done(seen); }, 3000);
})"""


def test_train_stop_resume_in_the_browser(page, app_folders, screenshot):
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on("console", lambda message: script_errors.append(message.text) if message.type == "error" else None)
    page.wait_for_selector("#lora_trainer_start")
    _fill(page, "lora_trainer_dataset", str(SAMPLE_DATASET))
    _fill(page, "lora_trainer_output_name", "browser_star")
    # 8 epochs of 10 steps: the stop lands mid-run even when the first sample and the 3 s height check take 30 steps
    form = {(elem_id, "input"): value for elem_id, value in (
        ("lora_trainer_epochs", "8"), ("lora_trainer_batch_size", "16"), ("lora_trainer_dim", "8"), ("lora_trainer_alpha", "8"),
        ("lora_trainer_unet_lr", "0.002"), ("lora_trainer_te_lr", "0"), ("lora_trainer_save_every", "1"),
        ("lora_trainer_sample_every", "1"))}
    form |= {("lora_trainer_resolution", "textarea"): "64", ("lora_trainer_sample_prompt", "textarea"): "zkstar --s 6"}
    for (elem_id, field), value in form.items():
        _fill(page, elem_id, value, field)
    _holds(page, form)
    page.click("#lora_trainer_check")
    page.wait_for_function("() => document.querySelector('#lora_trainer_report textarea').value.includes('10_zkstar')",
                           timeout=WAIT_MS)
    _holds(page, form)  # the check's answer must not have changed the form either
    page.click("#lora_trainer_start")
    page.wait_for_function("() => /Job \\d+ \\(browser_star\\) starting/.test(document.querySelector('#lora_trainer_message').innerText)",
                           timeout=WAIT_MS)

    started = STEP.search(_wait_for_progress(page, r"step [1-9]\d*/"))
    assert started.group(2) == "80", started.group(0)  # 8 epochs of 160 images at batch 16, as filled in
    first = int(started.group(1))
    page.wait_for_function(
        "first => { const m = /step (\\d+)\\//.exec(document.querySelector('#lora_trainer_progress_text').innerText);"
        " return m && Number(m[1]) > first; }", arg=first, timeout=WAIT_MS)
    page.wait_for_selector("#lora_trainer_samples img", timeout=WAIT_MS)  # the first epoch's sample
    assert page.locator("#lora_trainer_loss svg polyline.loss").count() == 1  # the live loss curve
    heights = page.evaluate(_HEIGHTS_WHILE_POLLING, ["#lora_trainer_progress_text", "#lora_trainer_progress"])
    assert all(max(seen) < 60 for seen in heights), [(min(seen), max(seen)) for seen in heights]  # no jumps at each poll
    screenshot("running")

    page.click("#lora_trainer_stop")
    stopped = _wait_for_progress(page, "stopped")
    total = int(STEP.search(stopped).group(2))
    assert int(STEP.search(stopped).group(1)) < total
    page.wait_for_function("() => document.querySelector('#lora_trainer_files input').value.endsWith('.safetensors')",
                           timeout=WAIT_MS)
    assert list(app_folders["lora"].glob("browser_star*.safetensors"))
    screenshot("stopped")

    page.click("#lora_trainer_resume")
    page.wait_for_function("() => /resumes job/.test(document.querySelector('#lora_trainer_message').innerText)",
                           timeout=WAIT_MS)
    finished = _wait_for_progress(page, "finished")
    assert f"step {total}/{total}" in finished
    assert (app_folders["lora"] / "browser_star.safetensors").exists()
    screenshot("finished")

    # the stopped job picked in the Job box stays shown, poll after poll (gradio 3 polls with the page's first values)
    page.click("#lora_trainer_job input")
    page.locator("#lora_trainer_job li", has_text="(stopped)").first.click()
    _wait_for_progress(page, "stopped")
    page.wait_for_timeout(3000)
    assert "(stopped)" in page.locator("#lora_trainer_job input").input_value() and "stopped" in _progress(page)
    assert not [e for e in script_errors if "forEach" in e], script_errors  # the end notice's script (gradio 3)
