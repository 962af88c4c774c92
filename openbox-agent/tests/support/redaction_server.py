"""Plain HTTP/1.1 server for the redaction test: every answer carries secrets.

Usage: redaction_server.py [PORT]   (0, the default, picks a free port; printed first)

Any method and path. The response echoes the request body with the request's
Content-Type; a request without a body gets RESPONSE_JSON (application/json). Every
response also has the headers of SECRET_HEADERS and `X-Marker: visible-resp`.
"""

import http.server
import sys

RESPONSE_JSON = (
    b'{"access_token": "S3CRET-resp-json", "token_type": "Bearer", '
    b'"usage": {"prompt_tokens": 3, "max_tokens": 5}, "note": "visible-resp-body"}'
)
SECRET_HEADERS = [
    ("Set-Cookie", "sid=S3CRET-resp-cookie; HttpOnly"),
    ("X-Upstream-Token", "S3CRET-resp-header"),
    ("Location", "/next?access_token=S3CRET-resp-location&page=2"),
]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type") or "application/json"
        if not body:
            body, content_type = RESPONSE_JSON, "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECRET_HEADERS:
            self.send_header(name, value)
        self.send_header("X-Marker", "visible-resp")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = answer

    def log_message(self, *args):
        pass


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
