from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for the reverse proxy and the run script: the web app answers."""
    return JsonResponse({"status": "ok"})


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "index.html")
