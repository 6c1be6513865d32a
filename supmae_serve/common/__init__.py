"""Generic helpers that several layers need: image-file listing, atomic writes, WebDataset tar shards.

This package sits below the trainer, the bulk job and the server (the server never imports `training`), and
imports only the standard library, so any of them can use it without pulling a heavy runtime in.
"""
