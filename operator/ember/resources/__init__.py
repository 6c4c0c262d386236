"""Pure builders of the Kubernetes objects the operator keeps: what should exist, never how it is applied.

Nothing here talks to an API server (import-linter forbids it): each function takes API models
and plain values and returns the object as a dict the way the API server stores it, so the
controller only reads, calls a builder and applies the result, and every rule is unit-tested.
"""
