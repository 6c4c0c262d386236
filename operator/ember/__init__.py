"""Ember: Lambda-style functions on Kubernetes."""

__version__ = "0.1.0"
