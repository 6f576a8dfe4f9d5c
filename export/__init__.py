"""Export stage (workstation/server): distill → quantize → lower → bundle.

Importing this package is cheap; ExecuTorch's exporter is imported only by `export.lower`.
"""

from models import ModelError


class ExportError(ModelError):
    """A mistake in what the user asked for (unknown target, unlowerable operator, bad settings).

    Mistakes in the model or its data are `models.ModelError`, this class's base: catch that for both."""
