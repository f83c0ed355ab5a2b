from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from portal.health import health


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """For load balancers and monitoring (portal.health says what is checked): 200 while this
    node can serve ("ok", or "degraded" when a PACS does not answer), 503 when its database,
    broker, store or shared cache fails."""
    report = health()
    return JsonResponse(report.as_json(), status=200 if report.serving else 503)
