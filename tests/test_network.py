"""bounded_hub from several threads: huggingface_hub has one client factory and one client per process."""
import http.server
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from huggingface_hub.utils import _http, get_session

from sd_zoo.network import HubTimeout, bounded_hub


def _factory():
    return getattr(_http, '_GLOBAL_CLIENT_FACTORY', None)


def _retry_until_hub_timeout(url: str, tries: int = 5) -> None:
    """A retry loop like huggingface_hub's: a failed request is tried again until HubTimeout (which none of
    its retry loops catches) ends it; pytest fails if the tries run out first."""
    with pytest.raises(HubTimeout):
        for _ in range(tries):
            try:
                get_session().get(url)
            except HubTimeout:
                raise
            except Exception:
                continue


def test_overlapping_blocks_in_two_threads_keep_the_client_and_restore_the_factory():
    """Thread A enters, B enters, A leaves while B is still inside, B leaves. B must stay bounded after A
    leaves, with the same open client; afterwards the factory from before is back (not A's or B's)."""
    before = _factory()
    a_inside, b_inside, a_left, b_may_leave = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with bounded_hub(5):
            a_inside.set()
            b_inside.wait(10)
            seen['client_while_both'] = get_session()
        a_left.set()

    def thread_b():
        a_inside.wait(10)
        with bounded_hub(5):
            seen['factory_while_b'] = _factory()
            b_inside.set()
            a_left.wait(10)
            seen['factory_after_a_left'] = _factory()
            seen['client_after_a_left'] = get_session()
            seen['closed_after_a_left'] = seen['client_after_a_left'].is_closed
            b_may_leave.wait(10)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    a_left.wait(10)
    b_may_leave.set()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads) and len(seen) == 5, seen
    assert seen['factory_while_b'] is not before
    assert seen['factory_after_a_left'] is seen['factory_while_b']  # A leaving did not unbind B
    assert seen['client_after_a_left'] is seen['client_while_both']  # nor close the client B was using
    assert not seen['closed_after_a_left']
    assert _factory() is before


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(('127.0.0.1', 0))
    srv.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{srv.getsockname()[1]}'
    stop.set()
    t.join(5)
    for c in accepted:
        c.close()
    srv.close()


def test_requests_from_worker_threads_inside_a_block_are_bounded(silent_endpoint):
    """huggingface_hub downloads and uploads files from its own worker threads: they are bounded too."""
    def fetch(_):
        start = time.monotonic()
        _retry_until_hub_timeout(silent_endpoint + '/api/models/x', tries=3)
        return time.monotonic() - start

    with bounded_hub(1.5):
        with ThreadPoolExecutor(2) as pool:
            elapsed = list(pool.map(fetch, range(2)))
    assert all(e < 10 for e in elapsed), elapsed


SEEN_REQUESTS = []  # (request line target, headers) of every GET the answering server got


@pytest.fixture
def answering_endpoint():
    """A loopback HTTP server that answers every GET at once (also as an HTTP proxy: the target is then the
    whole URL)."""
    SEEN_REQUESTS.clear()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            SEEN_REQUESTS.append((self.path, dict(self.headers)))
            self.send_response(200)
            self.send_header('Content-Length', '2')
            self.end_headers()
            self.wfile.write(b'{}')

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_time_between_answered_requests_is_not_silence(answering_endpoint):
    """The clock runs only while a request waits: work between requests (hashing files to upload, evaluating)
    never turns the next request into a HubTimeout."""
    with bounded_hub(0.5):
        assert get_session().get(answering_endpoint + '/a').status_code == 200
        time.sleep(1.0)
        assert get_session().get(answering_endpoint + '/b').status_code == 200


def test_each_thread_waits_its_own_seconds(silent_endpoint, answering_endpoint):
    """A block opened first with a long timeout does not lengthen another thread's short one, and one thread's
    silent Hub does not fail another thread's requests."""
    long_open, done = threading.Event(), threading.Event()
    outcome = {}

    def long_block():
        with bounded_hub(30):
            long_open.set()
            done.wait(20)
            outcome['long'] = get_session().get(answering_endpoint + '/ok').status_code

    t = threading.Thread(target=long_block)
    t.start()
    long_open.wait(10)
    start = time.monotonic()
    with bounded_hub(1):
        _retry_until_hub_timeout(silent_endpoint + '/x')
    elapsed = time.monotonic() - start
    done.set()
    t.join(20)
    assert not t.is_alive() and elapsed < 5 and outcome['long'] == 200, (elapsed, outcome)


def test_proxies_from_the_environment_are_kept(answering_endpoint, monkeypatch):
    """Inside a block the client still goes through HTTP(S)_PROXY (a replaced transport would bypass it)."""
    for name in ('NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy', 'http_proxy'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HTTP_PROXY', answering_endpoint)
    with bounded_hub(5):
        assert get_session().get('http://hub.invalid/api/models/x').status_code == 200
    assert SEEN_REQUESTS[-1][0] == 'http://hub.invalid/api/models/x'  # the proxy got it, whole URL and all


def test_a_users_client_factory_is_bounded_and_restored(answering_endpoint, silent_endpoint):
    import httpx2
    from huggingface_hub import set_client_factory
    before = _factory()

    def users_factory():
        return httpx2.Client(headers={'X-Mine': 'yes'}, timeout=None)
    set_client_factory(users_factory)
    try:
        with bounded_hub(1):
            assert get_session().get(answering_endpoint + '/ok').status_code == 200
            _retry_until_hub_timeout(silent_endpoint + '/x')
        assert SEEN_REQUESTS[-1][1].get('X-Mine') == 'yes'  # the user's client, bounded
        assert _factory() is users_factory
    finally:
        set_client_factory(before)


@pytest.mark.parametrize('raw', ['0', '-1', 'inf', 'nan', '1e9'])
def test_a_hub_timeout_that_is_no_number_of_seconds_is_refused(raw, monkeypatch):
    from sd_zoo.network import hub_timeout
    monkeypatch.setenv('SD_ZOO_HUB_TIMEOUT', raw)
    with pytest.raises(ValueError, match=f"SD_ZOO_HUB_TIMEOUT='{raw}' must be more than 0 and at most 86400"):
        hub_timeout()
    monkeypatch.setenv('SD_ZOO_HUB_TIMEOUT', '2.5')
    assert hub_timeout() == 2.5
