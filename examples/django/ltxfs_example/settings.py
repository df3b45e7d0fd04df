"""Settings for a Django app whose SQLite database lives on an ltxfs mount.

The database settings are the part that matters for ltxfs:

- WAL mode, so readers never block the writer and replicas apply changes
  without failing reads;
- ``transaction_mode = IMMEDIATE``, so a transaction that will write takes the
  write lock when it begins instead of failing with "database is locked" when
  it upgrades later;
- a busy timeout, so a connection waits for another's lock instead of failing.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-key-for-the-ltxfs-example")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["*"]

# The name this node answers with (on Fly.io, the machine ID).
NODE_NAME = os.environ.get("NODE_NAME", os.environ.get("FLY_MACHINE_ID", "local"))

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "ltxfs_django",
    "items",
]

MIDDLEWARE = [
    # Turns a write attempted on a replica into a fly-replay answer.
    "ltxfs_django.middleware.FlyReplayMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "ltxfs_example.urls"
WSGI_APPLICATION = "ltxfs_example.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # A file under the ltxfs mount.
        "NAME": os.environ.get("LTXFS_DB", "/ltxfs/app.db"),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 5,
            "init_command": "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        },
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
