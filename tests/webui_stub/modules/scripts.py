"""The script registry: what the WebUI loaded from every scripts/ folder, and the folder being loaded now."""

import os
from collections import namedtuple

from modules import paths_internal

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data = []
current_basedir = paths_internal.script_path


def basedir():
    return current_basedir


class Script:
    filename = None
    args_from = None
    args_to = None

    def title(self):
        raise NotImplementedError()


class AlwaysVisible:
    pass


def list_files_with_name(filename):
    return [os.path.join(d, filename) for d in (paths_internal.script_path,) if os.path.isfile(os.path.join(d, filename))]
