from django.urls import path

from dicomweb import views

app_name = "dicomweb"

urlpatterns = [
    path("viewer/", views.viewer, name="viewer"),
]
