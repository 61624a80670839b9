"""Backends: each renders the IR to one dataplane (and, later, applies it)."""

from lbc.backends.base import Artifact, Backend, Feature

__all__ = ["Artifact", "Backend", "Feature"]
