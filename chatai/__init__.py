"""The Django project: settings, URLs, ASGI entry, login and the chat pages."""
