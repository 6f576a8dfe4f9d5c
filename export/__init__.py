"""Export stage (workstation/server): distill → quantize → lower → bundle.

Importing this package is cheap; ExecuTorch's exporter is imported only by `export.lower`.
"""


class ExportError(Exception):
    """A mistake in what the user asked for (unknown model or target, bad data, unlowerable operator)."""
