"""fastws: a WebSocket server for Python with channels and fanout at kernel speed."""

from fastws.app import App, Handler
from fastws.config import Config

__all__ = ["App", "Config", "Handler", "__version__"]
__version__ = "0.1.0"
