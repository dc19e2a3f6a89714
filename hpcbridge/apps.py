from django.apps import AppConfig


class HpcbridgeConfig(AppConfig):
    name = "hpcbridge"
    verbose_name = "HPC bridge"

    def ready(self) -> None:
        from hpcbridge import checks  # noqa: F401 - registers the system checks
