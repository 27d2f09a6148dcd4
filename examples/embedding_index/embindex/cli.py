"""For Dramatiq's CLI: ``dramatiq embindex.cli --processes 1 --queues index.0``.

Importing this module builds the app on the Redis broker from the environment
(`Settings.from_env`) and makes it Dramatiq's global broker.
"""

from __future__ import annotations

import dramatiq

from .app import build_app, make_redis_broker
from .settings import Settings

settings = Settings.from_env()
broker = make_redis_broker(settings)
dramatiq.set_broker(broker)
app = build_app(settings, broker)
