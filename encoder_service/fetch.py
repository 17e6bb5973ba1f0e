"""Safe fetching of media URLs (server-side request forgery is the threat).

Rules, applied to the first URL and to every redirect hop:
  * schemes: http and https are fetched (unless fetching is disabled), data: URIs are decoded inline,
    ``file://`` URLs and bare paths are read only inside a configured media root (no symlink escape);
    anything else is refused.
  * the host is resolved once and every address is checked: loopback, private, link-local, multicast,
    reserved, unspecified, other non-public ranges and cloud metadata endpoints are refused unless the
    allow-list names the host or a network containing the address (metadata endpoints only when listed
    as exact addresses). IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64) are checked too.
  * the connection goes to the address that was checked (no second DNS look-up, so no rebinding
    window), with the Host header and TLS server name set from the URL.
  * connect, read (per socket operation) and total timeouts; the total one is enforced by a watchdog
    that shuts the socket down, so a server that drips bytes cannot hold a worker forever.
  * the body is streamed with a byte cap (Content-Length is checked first when present).

Standard library only. Everything here blocks: call it from a worker thread, never the event loop.
Refusals by policy raise ``PermissionDeniedError`` naming the rule; timeouts ``DeadlineExceededError``;
unusable URLs and responses ``InvalidArgumentError``. URLs are never logged with their path or query
(they may carry credentials or signatures).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from encoder_service.config import UrlPolicy
from encoder_service.media import parse_data_uri
from vlm_protocol.errors import DeadlineExceededError, InvalidArgumentError, PermissionDeniedError

logger = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_USER_AGENT = "vlm-encoder/1"
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchedMedia:
    """Bytes behind a URL. ``source`` is "data", "file" or "http"; ``num_redirects`` hops followed."""

    data: bytes
    source: str
    media_type: str = ""
    num_redirects: int = 0


def resolve_host(host: str, port: int) -> list[str]:
    """Addresses of ``host`` for a TCP connection, in the resolver's order (duplicates dropped)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal_rule(address: IpAddress) -> str | None:
    """Name of the rule that refuses ``address`` by default, or None for a public address."""
    if address in _METADATA_ADDRESSES:
        return "cloud metadata address"
    if address.is_unspecified:
        return "unspecified address"
    if address.is_loopback:
        return "loopback address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if address.is_private:
        return "private address"
    if address.is_reserved:
        return "reserved address"
    if not address.is_global:
        return "non-public address"
    return None


def _embedded_ipv4(address: IpAddress) -> list[IpAddress]:
    """IPv4 addresses an IPv6 address routes to (mapped, 6to4, NAT64 well-known prefix)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    embedded: list[IpAddress] = []
    if address.ipv4_mapped is not None:
        embedded.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address in _NAT64_PREFIX:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return embedded


class UrlChecker:
    """Decides, per host name and resolved address, whether the policy permits a connection."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy

    def check(self, host: str, address: IpAddress) -> None:
        """Raise ``PermissionDeniedError`` naming the rule if ``address`` (of ``host``) is refused."""
        for candidate in (address, *_embedded_ipv4(address)):
            rule = refusal_rule(candidate)
            if rule is not None and not self._is_allowed(host, candidate):
                raise PermissionDeniedError(
                    f"URL host {host!r} resolves to {candidate}, a {rule}; fetching it is refused by the "
                    "URL policy (an operator can allow it with --url-allow-private)"
                )

    def _is_allowed(self, host: str, address: IpAddress) -> bool:
        if address in _METADATA_ADDRESSES:
            # Never through a host name or a wide network: only an exact, deliberate entry.
            return any(
                network.num_addresses == 1 and address in network for network in self._policy.allowed_networks
            )
        if host.rstrip(".").lower() in self._policy.allowed_hosts:
            return True
        return any(address in network for network in self._policy.allowed_networks)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    host_header: str
    path: str


class MediaFetcher:
    """Turns an ``Image.url`` / ``Video.url`` value into bytes under the URL policy (blocking)."""

    def __init__(self, policy: UrlPolicy, *, max_bytes: int, resolver: Resolver = resolve_host) -> None:
        self._policy = policy
        self._max_bytes = max_bytes
        self._resolver = resolver
        self._checker = UrlChecker(policy)
        self._tls_context = ssl.create_default_context()

    def fetch(self, url: str) -> FetchedMedia:
        if not url:
            raise InvalidArgumentError("URL is empty")
        scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            media_type, data = parse_data_uri(url, max_bytes=self._max_bytes)
            return FetchedMedia(data, "data", media_type)
        if scheme in ("http", "https"):
            if not self._policy.allow_fetch:
                raise PermissionDeniedError(
                    "fetching http(s) URLs is disabled on this server; send the media bytes or a data: URI"
                )
            return self._fetch_http(url)
        if scheme == "file" or (scheme == "" and url):
            return self._read_local(url, is_file_url=scheme == "file")
        raise PermissionDeniedError(f"URL scheme {scheme!r} is not allowed; use http, https or data")

    # -- local files -------------------------------------------------------------------------------

    def _read_local(self, url: str, *, is_file_url: bool) -> FetchedMedia:
        root = self._policy.media_root
        if root is None:
            raise PermissionDeniedError(
                "local files (file:// URLs and paths) are refused: the server has no media root configured"
            )
        if is_file_url:
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise PermissionDeniedError("file:// URLs must not name a host")
            path_text = urllib.parse.unquote(parts.path)
        else:
            path_text = url
        if "\x00" in path_text:
            raise InvalidArgumentError("local path contains a NUL character")
        root_real = os.path.realpath(root)
        real = os.path.realpath(os.path.join(root_real, path_text))  # an absolute path_text wins the join
        if os.path.commonpath([real, root_real]) != root_real:
            raise PermissionDeniedError("local path is outside the media root (symlinks are resolved first)")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise InvalidArgumentError("local file does not exist under the media root") from None
        except OSError as exc:
            raise InvalidArgumentError(f"local file cannot be opened: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > self._max_bytes:
            os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError("local path is not a regular file")
            raise _body_too_large(info.st_size, self._max_bytes)
        with os.fdopen(fd, "rb") as file:
            data = file.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise _body_too_large(len(data), self._max_bytes)
        return FetchedMedia(data, "file")

    # -- http(s) -----------------------------------------------------------------------------------

    def _fetch_http(self, url: str) -> FetchedMedia:
        policy = self._policy
        deadline = time.monotonic() + policy.total_timeout_s
        current = url
        for hop in range(policy.max_redirects + 1):
            target = self._parse_http_url(current)
            status, location, body = self._request(target, deadline)
            if status in _REDIRECT_STATUSES:
                if not location:
                    raise InvalidArgumentError(
                        f"URL host {target.host!r} answered HTTP {status} without Location"
                    )
                current = urllib.parse.urljoin(current, location)
                if urllib.parse.urlsplit(current).scheme.lower() not in ("http", "https"):
                    raise PermissionDeniedError("URL redirects to a scheme other than http or https")
                logger.debug("following HTTP %d redirect from %s (hop %d)", status, target.host, hop + 1)
                continue
            if status != 200:
                raise InvalidArgumentError(f"URL host {target.host!r} answered HTTP {status}; expected 200")
            assert body is not None
            return FetchedMedia(body[0], "http", body[1], num_redirects=hop)
        raise InvalidArgumentError(
            f"URL redirected more than {policy.max_redirects} times (url_max_redirects)"
        )

    def _parse_http_url(self, url: str) -> _Target:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidArgumentError(f"URL is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        host = parts.hostname
        if not host:
            raise InvalidArgumentError("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise PermissionDeniedError("URLs with credentials (user:password@) are refused")
        port = port or (443 if scheme == "https" else 80)
        host_header = parts.netloc.rpartition("@")[2]
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return _Target(scheme, host, port, host_header, path)

    def _resolve_checked(self, target: _Target) -> list[str]:
        try:
            literal = ipaddress.ip_address(target.host)
            addresses = [str(literal)]
        except ValueError:
            try:
                addresses = self._resolver(target.host, target.port)
            except (socket.gaierror, UnicodeError, OSError):
                raise InvalidArgumentError(f"URL host {target.host!r} could not be resolved") from None
        if not addresses:
            raise InvalidArgumentError(f"URL host {target.host!r} has no addresses")
        # Every address must pass, so which one the connection uses cannot matter.
        for address in addresses:
            self._checker.check(target.host, ipaddress.ip_address(address))
        return addresses

    def _request(self, target: _Target, deadline: float) -> tuple[int, str | None, tuple[bytes, str] | None]:
        """One HTTP GET. Returns (status, Location for redirects, (body, content type) for 200)."""
        policy = self._policy
        addresses = self._resolve_checked(target)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._total_timeout()
        conn = self._connection(target, addresses[0], min(policy.connect_timeout_s, remaining))
        watchdog = _Watchdog(conn, remaining)
        try:
            conn.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", target.host_header)
            conn.putheader("User-Agent", _USER_AGENT)
            conn.putheader("Accept", "image/*, video/*, */*;q=0.5")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            if response.status in _REDIRECT_STATUSES:
                return response.status, response.getheader("Location"), None
            if response.status != 200:
                return response.status, None, None
            body = self._read_body(response, watchdog)
            return 200, None, (body, response.getheader("Content-Type", ""))
        except TimeoutError as exc:
            if watchdog.fired:
                raise self._total_timeout() from None
            connected = conn.sock is not None
            raise DeadlineExceededError(
                f"URL host {target.host!r} did not respond within "
                + (
                    f"{policy.read_timeout_s:g}s (url_read_timeout_s)"
                    if connected
                    else f"{policy.connect_timeout_s:g}s (url_connect_timeout_s)"
                )
            ) from exc
        except ssl.SSLError as exc:
            if watchdog.fired:
                raise self._total_timeout() from None
            raise InvalidArgumentError(
                f"TLS with URL host {target.host!r} failed: {exc.reason or exc}"
            ) from None
        except (http.client.HTTPException, OSError) as exc:
            if watchdog.fired:
                raise self._total_timeout() from None
            if isinstance(exc, http.client.InvalidURL):
                raise InvalidArgumentError(f"URL is malformed: {exc}") from None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InvalidArgumentError(f"fetching from URL host {target.host!r} failed: {reason}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def _connection(
        self, target: _Target, address: str, connect_timeout: float
    ) -> http.client.HTTPConnection:
        read_timeout = self._policy.read_timeout_s
        if target.scheme == "https":
            return _PinnedHTTPSConnection(
                address, target.port, connect_timeout, read_timeout, self._tls_context, target.host
            )
        return _PinnedHTTPConnection(address, target.port, connect_timeout, read_timeout)

    def _read_body(self, response: http.client.HTTPResponse, watchdog: _Watchdog) -> bytes:
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self._max_bytes:
            raise _body_too_large(int(length), self._max_bytes)
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            # read1 returns after one socket read, so the watchdog and the byte cap act promptly.
            chunk = response.read1(_CHUNK_BYTES)
            if not chunk:
                break
            num_bytes += len(chunk)
            if num_bytes > self._max_bytes:
                raise _body_too_large(None, self._max_bytes)
            chunks.append(chunk)
        if watchdog.fired:  # a shut-down socket reads as end of stream
            raise self._total_timeout()
        return b"".join(chunks)

    def _total_timeout(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"fetching the URL took longer than {self._policy.total_timeout_s:g}s (url_total_timeout_s)"
        )


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to one already-checked IP address; the caller sends the Host header."""

    def __init__(self, address: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(address, port, timeout=connect_timeout)
        self._read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """HTTPS to a checked IP address, verifying the certificate against the URL's host name (SNI)."""

    default_port = http.client.HTTPS_PORT

    def __init__(
        self,
        address: str,
        port: int,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext,
        server_hostname: str,
    ) -> None:
        super().__init__(address, port, connect_timeout, read_timeout)
        self._context = context
        self._server_hostname = server_hostname

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_hostname)


class _Watchdog:
    """Shuts the connection's socket down when the total time budget runs out."""

    def __init__(self, conn: http.client.HTTPConnection, timeout_s: float) -> None:
        self._conn = conn
        self.fired = False
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _body_too_large(size: int | None, limit: int) -> InvalidArgumentError:
    shown = f"{size} bytes" if size is not None else "larger than allowed"
    return InvalidArgumentError(f"media at URL is {shown}, over the limit of {limit} bytes (max_media_bytes)")
