#!/usr/bin/env python3
"""A tiny HTTP origin for testnet scenarios: serves the files of a directory
with Range, ETag and If-Range, and appends "client_ip bytes_sent path" per
request to a log (used to assert origin egress and that offline nodes never
called).

usage: range-server.py DIR BIND_ADDR PORT LOG
"""
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT, ADDR, PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        PATH = os.path.join(ROOT, os.path.basename(self.path))
        if not os.path.isfile(PATH):
            self.send_error(404)
            return
        st = os.stat(PATH)
        SIZE = st.st_size
        ETAG = '"%x-%x"' % (SIZE, int(st.st_mtime))
        start, end, status = 0, SIZE - 1, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == ETAG):
            try:
                a, b = rng.removeprefix("bytes=").split("-")
                start, end = int(a), min(int(b), SIZE - 1)
                status = 206
            except ValueError:
                self.send_error(416)
                return
            if start > end:
                self.send_error(416)
                return
        n = end - start + 1
        self.send_response(status)
        self.send_header("ETag", ETAG)
        self.send_header("Content-Length", str(n))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, SIZE))
        self.send_header("Connection", "close")
        self.end_headers()
        with open(PATH, "rb") as f:
            f.seek(start)
            left = n
            while left:
                buf = f.read(min(left, 1 << 20))
                if not buf:
                    break
                self.wfile.write(buf)
                left -= len(buf)
        with open(LOG, "a") as log:
            log.write("%s %d %s\n" % (self.client_address[0], n - left, self.path))
        self.close_connection = True


ThreadingHTTPServer((ADDR, PORT), H).serve_forever()
