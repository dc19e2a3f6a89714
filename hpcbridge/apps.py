from django.apps import AppConfig


class HpcbridgeConfig(AppConfig):
    name = "hpcbridge"
    verbose_name = "HPC bridge"
