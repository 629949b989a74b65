"""The WebUI's shared state: options, command-line options, the generation state and the loaded model."""

import argparse
import os

from modules import paths_internal, shared_state
from modules.options import OptionInfo, Options, options_section  # noqa: F401

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths_internal.models_path, "Lora"),
    ckpt_dir=None,
    device_id=None,
    api_auth=None,
    listen=False,
    api=False,
    data_dir=paths_internal.data_path,
    ui_config_file=os.path.join(paths_internal.data_path, "ui-config.json"),
)

options_templates = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
}))
options_templates.update(options_section(("system", "System", "system"), {
    "list_hidden_files": OptionInfo(True, "Load models/files in hidden directories"),
}))
options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "font": OptionInfo("", "Font for image grids that have text"),
}))
opts = Options(options_templates)

state = shared_state.State()

from modules import shared_total_tqdm  # noqa: E402 - it reads shared.state, as the real one does

total_tqdm = shared_total_tqdm.TotalTQDM()

# The real WebUI exposes a lazy property that loads the model on first use; here sd_models.load_model sets it.
sd_model = None
