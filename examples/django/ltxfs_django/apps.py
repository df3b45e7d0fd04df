from django.apps import AppConfig
from django.db.backends.signals import connection_created


class LtxfsConfig(AppConfig):
    name = "ltxfs_django"

    def ready(self):
        from .db import install_write_guard

        connection_created.connect(install_write_guard)
