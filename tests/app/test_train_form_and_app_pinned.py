"""What the Train tab's form, presets and estimate, the Lora card and the standalone app give a user, pinned where a
mutation review found nothing that noticed a change: the command and options the form builds, the estimate's numbers
against a hand computation, the card's fields as the WebUI reads them."""

from __future__ import annotations

import pytest


# --- the Lora card (the WebUI's user metadata) ----------------------------------------------------------------------

@pytest.mark.parametrize("written, shown", [
    ({"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "SD1"),
    ({"ss_base_model_version": "sd_v1_v", "ss_v2": "False"}, "SD1"),  # an SD1 v-prediction base
    ({"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "SD2"), ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "SD2"),
    ({"ss_v2": "True"}, "SD2"), ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "SDXL"),
    ({"ss_network_module": "networks.lora"}, "SD1"), ({}, "Unknown")])
def test_the_cards_sd_version_is_the_one_the_webui_tells_from_the_file(written, shown):
    """The card's "sd version" overrides the version the WebUI reads from the file (ss_base_model_version sdxl_… →
    SDXL, ss_v2 → SD2, any other metadata → SD1), and its Lora tab filters on it: an SD1 v-prediction run (sd_v1_v)
    got "Unknown", shown under SDXL models and hidden where "Hide networks of unknown versions" is set for SD1."""
    from lora_trainer.app.user_metadata import card_metadata

    assert card_metadata(written, {})["sd version"] == shown
