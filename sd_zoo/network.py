"""Bounded waits on the Hugging Face Hub.

huggingface_hub's shared HTTP client has no timeout of its own: ``create_repo`` and ``create_commit`` wait
forever on a Hub that accepts the connection and never answers, and a download that finds nothing in the
cache retries for minutes. While sd-zoo talks to the Hub (:func:`bounded_hub`), huggingface_hub uses a client
that gives up after ``SD_ZOO_HUB_TIMEOUT`` seconds (default 30) without an answer:

* every request's connect, read and write timeouts are capped by what is left of that time;
* any response from the Hub restarts the clock (so a long upload or download that makes progress runs on);
* once the time is spent, the next request (a retry) fails at once with :class:`HubTimeout`, which no retry
  loop of huggingface_hub catches.
"""
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ['HubTimeout', 'bounded_hub', 'hub_timeout']

DEFAULT_TIMEOUT_S = 30.0
_TIMEOUT_KEYS = ('connect', 'read', 'write', 'pool')


class HubTimeout(Exception):
    """The Hub did not answer within SD_ZOO_HUB_TIMEOUT seconds (refused, unreachable, or silent)."""


def hub_timeout() -> float:
    """Seconds without an answer after which sd-zoo gives up on the Hub: $SD_ZOO_HUB_TIMEOUT, else 30."""
    raw = os.environ.get('SD_ZOO_HUB_TIMEOUT', '')
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f'SD_ZOO_HUB_TIMEOUT={raw!r} is not a number of seconds') from None
    if not seconds > 0:
        raise ValueError(f'SD_ZOO_HUB_TIMEOUT={raw!r} must be more than 0 seconds')
    return seconds


class _Clock:
    """Time left without an answer from the Hub, shared by every client of one :func:`bounded_hub` block
    (huggingface_hub replaces its client after a connection error)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline: Optional[float] = None
        self.last_error = ''

    def left(self, where: str) -> float:
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.seconds
        left = self.deadline - now
        if left <= 0:
            raise HubTimeout(f'the Hub at {where} gave no answer in {self.seconds:g} s (SD_ZOO_HUB_TIMEOUT)'
                             + (f'; last error: {self.last_error}' if self.last_error else ''))
        return left

    def answered(self) -> None:
        self.deadline = time.monotonic() + self.seconds


def _bounded_transport(clock: _Clock):
    import httpx2

    class BoundedTransport(httpx2.BaseTransport):
        """A transport that caps each request's timeouts by the time left on ``clock``."""

        def __init__(self):
            self.inner = httpx2.HTTPTransport()

        def handle_request(self, request):
            left = clock.left(f'{request.url.scheme}://{request.url.netloc.decode()}')
            asked = request.extensions.get('timeout') or {}
            request.extensions['timeout'] = {k: min(left, asked.get(k) or left) for k in _TIMEOUT_KEYS}
            try:
                response = self.inner.handle_request(request)
            except Exception as e:
                clock.last_error = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}' if str(e) else \
                    type(e).__name__
                raise
            clock.answered()
            return response

        def close(self):
            self.inner.close()

    return BoundedTransport()


def _client_factory(clock: _Clock):
    def factory():
        import httpx2
        from huggingface_hub.utils import _http  # huggingface_hub's request hook (request ids, debug logs)
        hook = getattr(_http, 'hf_request_event_hook', None)
        return httpx2.Client(event_hooks={'request': [hook]} if hook else None, follow_redirects=True,
                             timeout=None, transport=_bounded_transport(clock))
    return factory


class _Shared:
    """The one bounded client factory in place while any thread is inside :func:`bounded_hub`.

    huggingface_hub has one client factory and one client for the whole process, and setting a factory closes
    the client another thread may be using. So the first block to enter (in any thread) installs the factory
    and the last to leave restores the one in place before; blocks open at the same time share one clock,
    which is also what huggingface_hub's own worker threads (parallel downloads, uploads) use."""

    lock = threading.Lock()
    users = 0
    clock: Optional[_Clock] = None
    previous = None


@contextmanager
def bounded_hub(seconds: Optional[float] = None) -> Iterator[None]:
    """huggingface_hub calls inside this block give up after ``seconds`` (default :func:`hub_timeout`)
    without an answer from the Hub. Nested and concurrent blocks share the outermost block's clock; the
    client factory in place before is restored when the last block in the process ends (thread-safe)."""
    seconds = seconds or hub_timeout()
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http
    with _Shared.lock:
        if _Shared.users == 0:
            _Shared.previous = getattr(_http, '_GLOBAL_CLIENT_FACTORY', None) or _http.default_client_factory
            _Shared.clock = _Clock(seconds)
            set_client_factory(_client_factory(_Shared.clock))
        _Shared.users += 1
    try:
        yield
    finally:
        with _Shared.lock:
            _Shared.users -= 1
            if _Shared.users == 0:
                set_client_factory(_Shared.previous)
                _Shared.clock = _Shared.previous = None
