from django.contrib import admin
from django.urls import include, path

from accounts import staff_urls
from portal import views
from studies.staff import urls as workspace_urls

# /staff/: sign-in and second factors (accounts) and the workspace (studies), one namespace.
staff_patterns = [*staff_urls.urlpatterns, *workspace_urls.urlpatterns]

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("staff/", include((staff_patterns, "staff"))),
    path("admin/", admin.site.urls),
    path("i18n/", include("django.conf.urls.i18n")),
    path("captcha/", include("captcha.urls")),
    path("", include("accounts.urls")),
    path("", include("dicomweb.urls")),
]
