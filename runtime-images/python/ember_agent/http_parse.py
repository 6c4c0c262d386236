"""HTTP/1.1 request parsing helpers (pure; unit tested): the request head and the body's length."""

from .errors import HTTPError, bad_request

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def parse_head(head):
    """Parse a request head (bytes without the final CRLFCRLF) -> (method, path, version, headers).

    Header names are lower-cased str; values str (latin-1).  Raises HTTPError(400) when malformed.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise bad_request("malformed request line {!r}".format(lines[0][:100].decode("latin-1")))
    method, target, version = parts
    if not all(c in _TOKEN for c in method):
        raise bad_request("malformed method {!r}".format(method[:20].decode("latin-1")))
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise bad_request("unsupported protocol {!r} (HTTP/1.1 or HTTP/1.0)".format(version[:20].decode("latin-1")))
    if not target.startswith(b"/"):
        raise bad_request("request target must be an absolute path")
    if any(c < 0x21 or c == 0x7F for c in target):
        raise bad_request("request target contains control characters or spaces")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not all(c in _TOKEN for c in name):
            raise bad_request("malformed header line {!r}".format(line[:100].decode("latin-1")))
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise bad_request("control character in header {!r}".format(name.decode("latin-1")))
        key = name.decode("latin-1").lower()
        val = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host") and headers[key] != val:
                raise bad_request(f"conflicting {key} headers")
            if key not in ("content-length", "host"):
                headers[key] = headers[key] + ", " + val
        else:
            headers[key] = val
    path = target.split(b"?", 1)[0].decode("latin-1")
    return method.decode("latin-1"), path, version.decode("latin-1"), headers


def body_length(headers, limit):
    """Return the Content-Length (int), -1 for chunked, or raise HTTPError (400/413/501)."""
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise bad_request("both Content-Length and Transfer-Encoding")
        if te.lower() != "chunked":
            raise HTTPError(501, "InvalidRequest", f"unsupported Transfer-Encoding {te!r}")
        return -1
    if cl is None:
        return 0
    if not cl.isdigit() or len(cl) > 18:
        raise bad_request(f"invalid Content-Length {cl!r}")
    n = int(cl)
    if n > limit:
        raise HTTPError(413, "RequestTooLarge", f"request body is {n} bytes; the limit is {limit}")
    return n
