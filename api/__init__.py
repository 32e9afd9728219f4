"""The HTTP service (``ktl.api``): ``create_app(settings)``, a router per resource, a durable store."""

from ktl.api.app import create_app
from ktl.api.settings import ServerSettings, load_settings

__all__ = ["ServerSettings", "create_app", "load_settings"]
