"""edgelearn: on-device edge learning runtime (export → bundle → device → update → coordinator → release)."""

__version__ = "0.1.0"
