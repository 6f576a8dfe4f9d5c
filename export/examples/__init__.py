"""Worked examples of user models for `edgelearn export --model package.module:factory`."""
