"""The workspace's URL patterns, under /staff/ in the namespace "staff" (portal.urls joins
them with accounts' sign-in URLs)."""

from studies.staff import audit, nodes, search, shares, sharing

urlpatterns = [
    *search.urlpatterns,
    *sharing.urlpatterns,
    *shares.urlpatterns,
    *nodes.urlpatterns,
    *audit.urlpatterns,
]
