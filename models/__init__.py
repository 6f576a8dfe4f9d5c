"""Models: the networks and their data, one file per model (`digits`, `charlm`, `user`), plus `shards`.

Both the export stage and the edge runtime import this layer; it imports only the ground floor.
Importing the package is cheap: each model file imports torch itself.
"""


class ModelError(Exception):
    """A mistake in a model or its data as the caller gave them (unknown model, unreadable text, bad factory)."""
