"""What the WebUI imports at start-up. Keep it light: put the extension root on sys.path and hand over to the
package's WebUI layer. Nothing heavy is imported here, so a broken optional extra can never stop the WebUI."""

import sys
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

# The tabs, settings, API routes and <lora:...> hooks are registered by lora_trainer.webui (its own issues);
# until they land the extension only makes the trainer package importable for the WebUI's Python.
