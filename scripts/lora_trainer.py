"""What the WebUI imports at start-up. Keep it light: put the extension root on sys.path and hand over to the
package's WebUI layer, which only registers callbacks; tabs, API and the job runner are built inside them."""

import sys
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

from lora_trainer.webui import extension  # noqa: E402

extension.register()
