import os
import tempfile

script_path = os.environ.get("WEBUI_STUB_ROOT") or tempfile.mkdtemp(prefix="webui-stub-")
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
roboto_ttf_file = os.path.join(script_path, "modules", "Roboto-Regular.ttf")  # not here: Pillow's font
