from django.apps import AppConfig
from django.db.models.signals import post_migrate


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "API gateway"

    def ready(self) -> None:
        from gateway.project_sync import apply_setting

        # Projects from settings.PROJECTS exist (with their groups) after every migrate.
        post_migrate.connect(apply_setting, sender=self, dispatch_uid="gateway.projects_from_settings")
