"""The WebUI reads ``style.css`` at the extension's root, outside the package; a wheel (``pip install .`` without
``-e``) carries a copy inside the package, so the standalone app keeps its styles there too."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStylesheet(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the root file itself
            self.copy_file("style.css", str(Path(self.build_lib) / "lora_trainer" / "assets" / "style.css"))


setup(cmdclass={"build_py": BuildPyWithStylesheet})
