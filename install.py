"""Run by the WebUI when the extension is installed or updated (its launch.py calls this file).

It must never break the WebUI's environment: it adds only small pure-Python packages the trainer needs and never
touches torch, xformers, gradio or transformers. Heavy optional extras are installed on request from the UI, into a
private folder that only the trainer subprocess uses.
"""

import launch  # provided by the WebUI

for package, import_name in (("toml", "toml"),):
    if not launch.is_installed(import_name):
        launch.run_pip(f"install {package}", f"{package} for the LoRA trainer")
