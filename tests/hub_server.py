"""A loopback Hugging Face Hub for tests: the real HTTP endpoints huggingface_hub uses to create a repo,
commit files (regular uploads), read a repo's info (with its visibility) and download files, served from
memory on 127.0.0.1.

Network faults, over real sockets: ``closed_port_endpoint()`` refuses every connection; ``state.fault``
'hang' accepts a request and never answers it, 'drop' closes the connection in the middle of the response
(for requests whose path contains ``state.fault_path``; '' means every request)."""
import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional


class HubState:
    def __init__(self):
        self.repos: Dict[str, Dict[str, Dict]] = {}  # repo_id -> branch -> {'sha': str, 'files': {path: bytes}}
        self.private: Dict[str, bool] = {}  # repo_id -> its visibility, set when it is created
        self.commits = []
        self.fail_next_commits = 0
        self.lock = threading.Lock()
        self.requests = []
        self.fault: Optional[str] = None  # None, 'hang' or 'drop'
        self.fault_path = ''
        self.faulted = 0  # requests that met the fault
        self.release = threading.Event()  # ends every hang (set it when the test is done)


class HubHandler(BaseHTTPRequestHandler):
    state: HubState = None
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def _send(self, code: int, payload=None, headers: Optional[Dict[str, str]] = None, body: bytes = None):
        if body is None:
            body = json.dumps(payload if payload is not None else {}).encode()
            headers = {'Content-Type': 'application/json', **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _fault(self) -> bool:
        """Apply state.fault to this request; True when it did (the request gets no proper answer)."""
        s = self.state
        if s.fault is None or s.fault_path not in self.path:
            return False
        with s.lock:
            s.faulted += 1
        self.close_connection = True
        if s.fault == 'hang':
            s.release.wait(timeout=120)  # bounded: a test that forgets to release does not hang forever
        elif s.fault == 'drop':
            self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Type: appl')  # the response cut short
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        return True

    def _error(self, code: int, message: str):
        self._send(code, {'error': message}, headers={'X-Error-Message': message})

    def do_POST(self):
        s = self.state
        s.requests.append(('POST', self.path))
        body = self._body()
        if self._fault():
            return
        path = self.path.split('?')[0]
        if path == '/api/repos/create':
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get('organization') else data['name']
            with s.lock:
                if repo_id in s.repos:
                    return self._send(409, {'error': 'You already created this model repo',
                                            'url': f'http://{self.headers["Host"]}/{repo_id}'})
                s.repos[repo_id] = {'main': {'sha': hashlib.sha1(repo_id.encode()).hexdigest(), 'files': {}}}
                s.private[repo_id] = data.get('visibility') == 'private' or bool(data.get('private'))  # new, old API
            return self._send(200, {'url': f'http://{self.headers["Host"]}/{repo_id}', 'name': repo_id})
        if path == '/api/validate-yaml':  # the model card's metadata block must be valid YAML
            import yaml
            content = json.loads(body).get('content', '')
            try:
                parts = content.split('---')
                meta = yaml.safe_load(parts[1]) if content.startswith('---') and len(parts) > 2 else {}
                assert isinstance(meta, dict)
            except Exception as e:
                return self._send(400, {'error': f'Invalid metadata in README.md: {e}'})
            return self._send(200, {'errors': [], 'warnings': []})
        m = re.match(r'^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$', path)
        if not m:
            return self._error(404, f'no route {path}')
        repo_id, action, revision = m.group(1), m.group(2), m.group(3)
        if repo_id not in s.repos:
            return self._error(404, f'Repository {repo_id} not found')
        if action == 'branch':
            with s.lock:
                s.repos[repo_id].setdefault(revision, dict(s.repos[repo_id]['main'],
                                                           files=dict(s.repos[repo_id]['main']['files'])))
            return self._send(200, {})
        if action == 'preupload':
            files = json.loads(body)['files']
            return self._send(200, {'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False}
                                              for f in files]})
        with s.lock:
            if s.fail_next_commits:
                s.fail_next_commits -= 1
                return self._error(500, 'Internal Error (injected by the test server)')
            branch = s.repos[repo_id].get(revision)
            if branch is None:
                return self._error(404, f'Invalid rev id: {revision}')
            new_files = dict(branch['files'])
            summary = ''
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item['key'] == 'header':
                    summary = item['value'].get('summary', '')
                elif item['key'] == 'file':
                    new_files[item['value']['path']] = base64.b64decode(item['value']['content'])
                elif item['key'] == 'deletedFile':
                    new_files.pop(item['value']['path'], None)
                else:
                    return self._error(400, f'unsupported commit operation {item["key"]}')
            sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in new_files.items()))
                               .encode() + branch['sha'].encode()).hexdigest()
            s.repos[repo_id][revision] = {'sha': sha, 'files': new_files}
            s.commits.append((repo_id, revision, summary, sorted(new_files)))
        host = self.headers['Host']
        return self._send(200, {'commitUrl': f'http://{host}/{repo_id}/commit/{sha}', 'commitOid': sha,
                                'success': True})

    def _resolve(self):
        s = self.state
        s.requests.append((self.command, self.path))
        if self._fault():
            return
        path = self.path.split('?')[0]
        m = re.match(r'^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$', path)
        if m:
            repo_id, revision, filename = m.groups()
            branch = s.repos.get(repo_id, {}).get(revision)
            if branch is None:  # the Hub's error codes, which huggingface_hub turns into its error types
                if repo_id in s.repos:
                    return self._send(404, {'error': f'Invalid rev id: {revision}'},
                                      headers={'X-Error-Code': 'RevisionNotFound'})
                return self._send(404, {'error': 'Repository not found'},
                                  headers={'X-Error-Code': 'RepositoryNotFound'})
            data = branch['files'].get(filename)
            if data is None:
                return self._send(404, {'error': 'Entry not found'}, headers={'X-Error-Code': 'EntryNotFound'})
            etag = hashlib.sha256(data).hexdigest()
            return self._send(200, body=data, headers={
                'X-Repo-Commit': branch['sha'], 'ETag': f'"{etag}"', 'Content-Type': 'application/octet-stream'})
        m = re.match(r'^/api/models/([^/]+/[^/]+)/tree/([^/]+)$', path)  # list_repo_files (flat repositories)
        if m:
            branch = s.repos.get(m.group(1), {}).get(m.group(2))
            if branch is None:
                return self._send(404, {'error': 'Repository not found'}, headers={'X-Error-Code': 'RepoNotFound'})
            return self._send(200, [{'type': 'file', 'path': name, 'size': len(data),
                                     'oid': hashlib.sha1(data).hexdigest()}
                                    for name, data in sorted(branch['files'].items())])
        m = re.match(r'^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$', path)
        if m:
            repo_id, revision = m.group(1), m.group(2) or 'main'
            branch = s.repos.get(repo_id, {}).get(revision)
            if branch is None:  # the Hub's error code, which huggingface_hub turns into RepositoryNotFoundError
                return self._send(404, {'error': 'Repository not found'}, headers={'X-Error-Code': 'RepoNotFound'})
            return self._send(200, {'id': repo_id, 'sha': branch['sha'], 'private': s.private.get(repo_id, False),
                                    'siblings': [{'rfilename': f} for f in sorted(branch['files'])]})
        return self._error(404, f'no route {path}')

    do_GET = _resolve
    do_HEAD = _resolve


def start_hub() -> tuple:
    state = HubState()
    handler = type('Handler', (HubHandler,), {'state': state})
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, state, f'http://127.0.0.1:{server.server_address[1]}'


def stop_hub(server) -> None:
    """Release any hung request and stop the server."""
    server.RequestHandlerClass.state.release.set()
    server.shutdown()
    server.server_close()


def closed_port_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    return f'http://127.0.0.1:{port}'
