from django.conf import settings
from django.http import HttpResponse, HttpResponseNotAllowed

from .models import Item


def items(request):
    """GET lists every item, one ``id<TAB>text`` line each; POST stores the body."""
    if request.method == "POST":
        item = Item.objects.create(text=request.body.decode())
        return HttpResponse(f"created {item.id} on {settings.NODE_NAME}\n", content_type="text/plain")
    if request.method in ("GET", "HEAD"):
        lines = "".join(f"{item.id}\t{item.text}\n" for item in Item.objects.order_by("id"))
        return HttpResponse(lines, content_type="text/plain")
    return HttpResponseNotAllowed(["GET", "HEAD", "POST"])
