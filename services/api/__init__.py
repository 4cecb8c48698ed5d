"""The HTTP API (FastAPI, served by uvicorn through ``circuitscan serve``).

``create_app(ApiSettings(...))`` builds the app: store queries under
``/api/stores``, Ray jobs under ``/api/jobs``, the feature browser under
``/web``. See ``settings.py`` for configuration and ``auth.py`` for tokens.
"""

from circuitscan.services.api.app import create_app
from circuitscan.services.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]
