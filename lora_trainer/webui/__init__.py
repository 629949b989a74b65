"""The WebUI side of the extension: settings, tabs, API, ``<lora:…>`` tags and X/Y/Z axes, as thin adapters over
``lora_trainer``'s core. Only these modules import the WebUI's ``modules``, and only when the WebUI runs them."""
