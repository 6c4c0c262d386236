"""Typed keys of the activator's aiohttp application."""

from __future__ import annotations

from aiohttp import web

from ember.activator.async_invoke import AsyncInvocations
from ember.activator.config import ActivatorConfig
from ember.activator.event_sources import EventSources
from ember.activator.invoke import Invoker
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.scaler import Scaler
from ember.activator.sizing import Sizing
from ember.pods.base import PodSource

CONFIG = web.AppKey("config", ActivatorConfig)
REGISTRY = web.AppKey("registry", Registry)
INVOKER = web.AppKey("invoker", Invoker)
SCALER = web.AppKey("scaler", Scaler)
SIZING = web.AppKey("sizing", Sizing)
ASYNC = web.AppKey("async", AsyncInvocations)
EVENT_SOURCES = web.AppKey("event-sources", EventSources)
METRICS = web.AppKey("metrics", Metrics)
SOURCE = web.AppKey("source", PodSource)
STATE = web.AppKey("state", dict)
