from django.http import HttpResponse

from .db import ReplicaWriteError


class FlyReplayMiddleware:
    """Answers a request that tried to write on a replica with
    ``fly-replay: instance=<primary>``, so Fly.io's edge replays it on the
    primary. For apps that do not run behind ltxfs's own proxy."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, ReplicaWriteError):
            return None
        response = HttpResponse(
            f"{exception}; replaying on {exception.primary}\n",
            status=409,
            content_type="text/plain",
        )
        response["fly-replay"] = f"instance={exception.primary}"
        return response
