"""The resource API under /api/: thin DRF views (validate, call a service or selector, serialise).

Synchronous DRF views: /api is not the hot path. /v1 stays the lean async front (chatai.asgi.ApiApp)."""

from __future__ import annotations

import json
from typing import Any, cast

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from rest_framework import permissions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api import selectors, services
from api.errors import body
from api.openapi import schema
from api.serializers import KeyCreateInput, KeyOutput, MonthInput, ProjectChoiceInput, UsageFilterInput
from gateway.caller import Caller
from gateway.models import ApiKey


class MeApi(APIView):
    def get(self, request: Request) -> Response:
        caller = cast(Caller, request.auth)  # set by api.authentication, for keys and sessions alike
        user = request.user
        key = caller.key
        return Response({
            "username": user.get_username(), "email": getattr(user, "email", ""),
            "is_staff": bool(user.is_staff), "groups": sorted(user.groups.values_list("name", flat=True)),
            "key": None if key is None else KeyOutput(key).data,
            "models": selectors.models_of(caller),
            "limits": selectors.limits_of(caller),
            "budgets": selectors.budgets_of(caller),
            "projects": selectors.projects_of_caller(caller),
            "project": caller.project.name if caller.project is not None else None})


class MyProjectApi(APIView):
    """The project the signed-in chat's requests are charged to, kept in the session."""

    def put(self, request: Request) -> Response:
        caller = cast(Caller, request.auth)
        if caller.key is not None:
            return Response(body(403, "A key's requests are charged to the key's own project; this choice is the "
                                 "signed-in chat's.", "key_project_fixed"), status=403)
        data = ProjectChoiceInput(data=request.data)
        data.is_valid(raise_exception=True)
        project = services.session_project_choose(user=request.user, group_ids=caller.group_ids,
                                                  name=data.validated_data["project"], session=request.session)
        return Response({"project": project.name if project is not None else None,
                         "projects": selectors.projects_of_caller(caller)})


class KeyListApi(APIView):
    def get(self, request: Request) -> Response:
        keys = ApiKey.objects.filter(user=cast(User, request.user)).select_related("project")
        return Response({"data": KeyOutput(keys, many=True).data})

    def post(self, request: Request) -> Response:
        data = KeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        key, secret = services.key_create(user=request.user, name=data.validated_data["name"].strip(),
                                          expires_days=data.validated_data.get("expires_days"),
                                          models=[m.strip() for m in data.validated_data["models"] if m.strip()],
                                          parent=request.auth.key, project=data.validated_data.get("project"),
                                          group_ids=cast(Caller, request.auth).group_ids)
        response = Response({**KeyOutput(key).data, "secret": secret}, status=201)
        response["Cache-Control"] = "no-store"  # the only time the secret is shown
        return response


class KeyDetailApi(APIView):
    def delete(self, request: Request, prefix: str) -> Response:
        key = services.key_revoke(user=request.user, prefix=prefix)
        if key is None:
            return _not_found("No key of yours has this prefix.")
        return Response(KeyOutput(key).data)


class UsageApi(APIView):
    def get(self, request: Request) -> Response:
        query = UsageFilterInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response({"data": selectors.usage_of(request.user, query.validated_data.get("from"),
                                                    query.validated_data.get("to"),
                                                    query.validated_data.get("project"))})


class AdminUsageApi(APIView):
    permission_classes = [permissions.IsAdminUser]

    def get(self, request: Request) -> Response:
        query = UsageFilterInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(selectors.usage_all(query.validated_data.get("from"), query.validated_data.get("to"),
                                            query.validated_data.get("project")))


class AdminChargebackApi(APIView):
    """A month's node hours charged back to projects (docs/accounting.md), as the staff page shows them."""

    permission_classes = [permissions.IsAdminUser]

    def get(self, request: Request) -> Response:
        query = MonthInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(selectors.chargeback_only(selectors.chargeback_month(query.validated_data["month"]),
                                                  query.validated_data["project"]))


class AdminPlatformsApi(APIView):
    permission_classes = [permissions.IsAdminUser]

    def get(self, request: Request) -> Response:
        return Response({"data": selectors.platforms_state()})


class SchemaApi(APIView):
    """The OpenAPI 3 document of /api and /v1."""

    def get(self, request: Request) -> Response:
        return Response(schema(request.build_absolute_uri("/")))


def _not_found(message: str) -> Response:
    return Response(body(404, message, "not_found"), status=404)


@login_required
def docs(request: HttpRequest) -> HttpResponse:
    """The schema as a page, rendered on the server (no script, no CDN: the site's CSP holds)."""
    doc = schema(request.build_absolute_uri("/"))
    operations: list[dict[str, Any]] = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            operations.append({"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                               "description": op.get("description", ""), "parameters": op.get("parameters", []),
                               "body": json.dumps(op.get("requestBody", {}).get("content", {})
                                                  .get("application/json", {}).get("schema"), indent=2)
                               if "requestBody" in op else "",
                               "responses": [(code, r.get("description", "")) for code, r in op["responses"].items()]})
    return render(request, "api/docs.html", {
        "info": doc["info"], "operations": operations,
        "schemas": [(name, json.dumps(s, indent=2)) for name, s in doc["components"]["schemas"].items()]})
