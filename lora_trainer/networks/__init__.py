"""LoRA-family networks: the weight math of every algorithm (one file each), Kohya naming, files, applying.

The algorithm files register themselves with ``registry`` the first time an algorithm is looked up, so importing
this package (e.g. for the CLI's argument parsing) costs nothing.
"""
