"""A one-file Django project that serves one Host only, for Usher's e2e tests
(tests/tests/operator.rs).

    python3 -m waitress --listen=127.0.0.1:0 app:application

`ALLOWED_HOSTS = ["shop.example.com"]`: Django answers any other Host 400
(DisallowedHost) before any view runs. That is what a health check sending
the backend's `ip:port` as its Host runs into.

    GET /healthz        200 "ok\\n"
    GET /healthz/token  200 "ok\\n" with `X-Health-Token: s3cret`, else 403
    GET /login          302 to /login/form
    GET /               200 "shop front\\n"
"""

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse, HttpResponseForbidden, HttpResponseRedirect
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="usher-e2e-not-a-secret",
    ALLOWED_HOSTS=["shop.example.com"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
)


def healthz(request):
    return HttpResponse("ok\n", content_type="text/plain")


def healthz_token(request):
    if request.headers.get("X-Health-Token") != "s3cret":
        return HttpResponseForbidden("no token\n", content_type="text/plain")
    return HttpResponse("ok\n", content_type="text/plain")


def login(request):
    return HttpResponseRedirect("/login/form")


def front(request):
    return HttpResponse("shop front\n", content_type="text/plain")


urlpatterns = [
    path("healthz", healthz),
    path("healthz/token", healthz_token),
    path("login", login),
    path("", front),
]

application = get_wsgi_application()
