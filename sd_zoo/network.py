"""Bounded waits on the Hugging Face Hub.

huggingface_hub's shared HTTP client has no timeout of its own: ``create_repo`` and ``create_commit`` wait
forever on a Hub that accepts the connection and never answers, and a download that finds nothing in the
cache retries for minutes. While sd-zoo talks to the Hub (:func:`bounded_hub`), huggingface_hub uses a client
that gives up after ``SD_ZOO_HUB_TIMEOUT`` seconds (default 30) without an answer:

* the clock starts at a thread's first request after the Hub last answered it, and every request's connect,
  read and write timeouts are capped by what is left of that time;
* any response from the Hub stops the clock (so time spent between requests, and a long upload or
  download that makes progress, never count);
* once the time is spent, the next request (a retry) fails at once with :class:`HubTimeout`, which no retry
  loop of huggingface_hub catches.

Each thread has its own clock, so one thread's silence or answers never decide for another.

Why private attributes (``_transport``/``_mounts`` of httpx's client, huggingface_hub's ``_GLOBAL_CLIENT_FACTORY``):
httpx has no public way to wrap the transports of a client built elsewhere (huggingface_hub's factory sets its
proxies, certificates and hooks), and huggingface_hub no getter for the factory in place, which must be restored.
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
    if not 0 < seconds <= 86400:  # inf (or NaN) would reach the socket as an overflow, not as "no limit"
        raise ValueError(f'SD_ZOO_HUB_TIMEOUT={raw!r} must be more than 0 and at most 86400 seconds')
    return seconds


class _Clock:
    """Time left without an answer from the Hub, per thread, for every client made while a
    :func:`bounded_hub` block is open (huggingface_hub replaces its client after a connection error)."""

    def __init__(self, seconds: float):
        self.seconds = seconds  # for threads that opened no block themselves (huggingface_hub's workers)
        self._local = threading.local()

    def left(self, where: str) -> float:
        local, now = self._local, time.monotonic()
        seconds = getattr(_thread, 'seconds', None) or self.seconds
        if getattr(local, 'deadline', None) is None:
            local.deadline, local.last_error = now + seconds, ''
        left = local.deadline - now
        if left <= 0:
            local.deadline = None  # a later call (after the caller handled this) starts a new wait
            raise HubTimeout(f'the Hub at {where} gave no answer in {seconds:g} s (SD_ZOO_HUB_TIMEOUT)'
                             + (f'; last error: {local.last_error}' if local.last_error else ''))
        return left

    def failed(self, error: BaseException) -> None:
        self._local.last_error = f'{type(error).__name__}: {str(error).splitlines()[0][:120]}' if str(error) \
            else type(error).__name__

    def answered(self) -> None:
        self._local.deadline = None


def _bounded_transport(inner, clock: _Clock):
    """``inner`` (an httpx2 transport) with each request's timeouts capped by the time left on ``clock``."""
    import httpx2

    class BoundedTransport(httpx2.BaseTransport):
        def handle_request(self, request):
            left = clock.left(f'{request.url.scheme}://{request.url.netloc.decode()}')
            asked = request.extensions.get('timeout') or {}
            request.extensions['timeout'] = {k: min(left, asked.get(k) or left) for k in _TIMEOUT_KEYS}
            try:
                response = inner.handle_request(request)
            except Exception as e:
                clock.failed(e)
                raise
            clock.answered()
            return response

        def close(self):
            inner.close()

    return BoundedTransport()


def _client_factory(clock: _Clock, make_client):
    """A factory of ``make_client()``'s clients (huggingface_hub's own, or the one a user set) with every
    transport bounded: the default one and those httpx mounted for the proxies in the environment
    (HTTP(S)_PROXY, ALL_PROXY), so proxies, certificates and hooks stay as they were."""
    def factory():
        client = make_client()
        client._transport = _bounded_transport(client._transport, clock)
        client._mounts = {pattern: None if t is None else _bounded_transport(t, clock)
                          for pattern, t in client._mounts.items()}
        return client
    return factory


class _Shared:
    """The one bounded client factory in place while any thread is inside :func:`bounded_hub`.

    huggingface_hub has one client factory and one client for the whole process, and setting a factory closes
    the client another thread may be using. So the first block to enter (in any thread) installs the factory
    and the last to leave restores the one in place before. huggingface_hub's own worker threads (parallel
    downloads, uploads) use the same client, so they are bounded too."""

    lock = threading.Lock()
    users = 0
    previous = None


_thread = threading.local()  # the ``seconds`` of the innermost block this thread opened


@contextmanager
def bounded_hub(seconds: Optional[float] = None) -> Iterator[None]:
    """huggingface_hub calls inside this block give up after ``seconds`` (default :func:`hub_timeout`)
    without an answer from the Hub. Thread-safe: the client factory in place before is restored when the last
    block open in the process ends; threads that open no block themselves use the first block's ``seconds``."""
    seconds = seconds or hub_timeout()
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http
    outer_seconds = getattr(_thread, 'seconds', None)
    with _Shared.lock:
        if _Shared.users == 0:
            _Shared.previous = getattr(_http, '_GLOBAL_CLIENT_FACTORY', None) or _http.default_client_factory
            set_client_factory(_client_factory(_Clock(seconds), _Shared.previous))
        _Shared.users += 1
    _thread.seconds = seconds
    try:
        yield
    finally:
        _thread.seconds = outer_seconds
        with _Shared.lock:
            _Shared.users -= 1
            if _Shared.users == 0:
                previous, _Shared.previous = _Shared.previous, None
                set_client_factory(previous)
