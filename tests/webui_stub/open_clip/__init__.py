"""The parts of the ``open_clip`` package the WebUI's SD2/SDXL text encoders are built from (open_clip 2.x names)."""
