"""A file server on 127.0.0.1 for the download tests: serves bytes by path, counts requests, and can cut a
response in the middle (it announces the whole length, sends half, and closes) as a dropped connection does.

Only the loopback address is ever bound or contacted; the server stops when its ``with`` block ends.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.cut_next: set[str] = set()  # paths whose next response is cut in half
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut_next:
                    server.cut_next.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def beir_zip(folder: Path, name: str) -> bytes:
    """A zip in BEIR's layout (``<name>/corpus.jsonl``, ``<name>/queries.jsonl``, ``<name>/qrels/*.tsv``)
    of a BEIR folder whose jsonl files may be gzipped (BEIR's zips hold them plain)."""
    import gzip

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            if rel.endswith(".gz"):
                rel, data = rel[:-3], gzip.decompress(data)
            zf.writestr(f"{name}/{rel}", data)
    return buffer.getvalue()
