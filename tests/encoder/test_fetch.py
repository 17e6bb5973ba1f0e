"""Safe URL fetching: address rules, allow-list, pinned connections, redirects, timeouts, byte caps,
local files."""

from __future__ import annotations

import base64
import ipaddress
import os
import time
from pathlib import Path

import pytest

from encoder_service.config import UrlPolicy
from encoder_service.fetch import MediaFetcher, UrlChecker, refusal_rule
from tests.encoder.http_fixtures import media_server
from vlm_protocol.errors import DeadlineExceededError, InvalidArgumentError, PermissionDeniedError

BODY = b"\x89PNG fake image body" * 10
LOCALHOST = (ipaddress.ip_network("127.0.0.1/32"),)


def _fetcher(*, max_bytes: int = 100_000, resolver=None, **policy) -> MediaFetcher:
    values = {"connect_timeout_s": 1.0, "read_timeout_s": 0.5, "total_timeout_s": 1.5, "max_redirects": 3}
    values.update(policy)
    kwargs = {"resolver": resolver} if resolver else {}
    return MediaFetcher(UrlPolicy(**values), max_bytes=max_bytes, **kwargs)


@pytest.fixture(scope="module")
def server():
    with media_server({"/image.png": BODY}, slow_s=1.5) as running:
        yield running


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("240.0.0.1", "private"),
    ],
)
def test_refusal_rules(address, rule):
    assert rule in refusal_rule(ipaddress.ip_address(address))


def test_public_addresses_pass():
    for address in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"):
        assert refusal_rule(ipaddress.ip_address(address)) is None
        UrlChecker(UrlPolicy()).check("example.com", ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:a00:1::1"])
def test_ipv4_embedded_in_ipv6_is_checked(address):
    with pytest.raises(PermissionDeniedError):
        UrlChecker(UrlPolicy()).check("h", ipaddress.ip_address(address))


def test_allow_list_by_network_and_host_but_metadata_only_when_listed_exactly():
    hosts, networks = UrlPolicy.parse_allow_list(["10.0.0.0/8", "Minio.Internal.", "169.254.0.0/16"])
    checker = UrlChecker(UrlPolicy(allowed_hosts=hosts, allowed_networks=networks))
    checker.check("anything", ipaddress.ip_address("10.1.2.3"))
    checker.check("minio.internal", ipaddress.ip_address("192.168.5.5"))
    checker.check("other", ipaddress.ip_address("169.254.1.1"))
    for host in ("minio.internal", "other"):
        with pytest.raises(PermissionDeniedError, match="cloud metadata"):
            checker.check(host, ipaddress.ip_address("169.254.169.254"))
    with pytest.raises(PermissionDeniedError, match="private"):
        checker.check("other", ipaddress.ip_address("192.168.5.5"))
    _, exact = UrlPolicy.parse_allow_list(["169.254.169.254"])
    UrlChecker(UrlPolicy(allowed_networks=exact)).check("h", ipaddress.ip_address("169.254.169.254"))


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[::1]:8080/x", "loopback"),
        ("http://2130706433/x", "loopback"),  # 127.0.0.1 in decimal, resolved by getaddrinfo
        ("http://0x7f.1/x", "loopback"),
        ("http://localhost/x", "loopback"),
    ],
)
def test_private_urls_are_refused_without_connecting(url, rule):
    started = time.perf_counter()
    with pytest.raises(PermissionDeniedError, match=rule) as info:
        _fetcher().fetch(url)
    assert "--url-allow-private" in str(info.value)
    assert time.perf_counter() - started < 0.5


def test_allow_listed_local_server_is_fetched_through_the_checked_address(server):
    fetched = _fetcher(allowed_networks=LOCALHOST).fetch(server.url("/image.png"))
    assert fetched.data == BODY and fetched.source == "http" and fetched.num_redirects == 0


def test_host_names_resolve_once_and_the_host_header_is_kept(server):
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return {"media.internal": ["127.0.0.1"], "evil.example": ["10.9.8.7"]}[host]

    fetcher = _fetcher(allowed_hosts=("media.internal",), resolver=resolver)
    assert fetcher.fetch(f"http://media.internal:{server.port}/image.png").data == BODY
    assert server.hosts[-1] == f"media.internal:{server.port}"
    assert resolved == ["media.internal"]
    with pytest.raises(
        PermissionDeniedError, match=r"'evil.example' resolves to 10.9.8.7, a private address"
    ):
        fetcher.fetch("http://evil.example/image.png")


def test_a_host_with_any_refused_address_is_refused():
    fetcher = _fetcher(resolver=lambda host, port: ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(PermissionDeniedError, match="loopback"):
        fetcher.fetch("http://mixed.example/x")


def test_redirects_are_rechecked_at_every_hop(server):
    fetcher = _fetcher(allowed_networks=LOCALHOST)
    fetched = fetcher.fetch(server.url("/redirect?to=/image.png"))
    assert fetched.data == BODY and fetched.num_redirects == 1
    for target, rule in [
        ("http://10.0.0.1/secret", "private"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ]:
        with pytest.raises(PermissionDeniedError, match=rule):
            fetcher.fetch(server.url(f"/redirect?to={target}"))
    with pytest.raises(PermissionDeniedError, match="scheme"):
        fetcher.fetch(server.url("/redirect?to=file:///etc/passwd"))
    with pytest.raises(InvalidArgumentError, match="redirected more than 3 times"):
        fetcher.fetch(server.url("/loop"))


def test_slow_servers_hit_the_read_and_total_timeouts(server):
    fetcher = _fetcher(allowed_networks=LOCALHOST, read_timeout_s=0.3, total_timeout_s=5.0)
    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError, match="url_read_timeout_s"):
        fetcher.fetch(server.url("/slow"))
    assert time.perf_counter() - started < 1.2
    # A server dripping a byte every 50 ms never trips the read timeout; the total one stops it.
    fetcher = _fetcher(allowed_networks=LOCALHOST, read_timeout_s=0.3, total_timeout_s=0.6)
    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError, match="url_total_timeout_s"):
        fetcher.fetch(server.url("/drip"))
    assert time.perf_counter() - started < 1.5


def test_byte_cap_applies_to_declared_and_streamed_bodies(server):
    fetcher = _fetcher(allowed_networks=LOCALHOST, max_bytes=50_000)
    with pytest.raises(InvalidArgumentError, match="1000000000 bytes, over the limit of 50000"):
        fetcher.fetch(server.url("/big"))
    with pytest.raises(InvalidArgumentError, match="over the limit of 50000"):
        fetcher.fetch(server.url("/chunked-big"))


def test_http_errors_and_unreachable_hosts_are_invalid_arguments(server):
    fetcher = _fetcher(allowed_networks=LOCALHOST)
    with pytest.raises(InvalidArgumentError, match="HTTP 404"):
        fetcher.fetch(server.url("/missing"))
    with pytest.raises(InvalidArgumentError, match="failed"):
        fetcher.fetch("http://127.0.0.1:1/x")  # nothing listens on port 1


def test_schemes_credentials_and_disabled_fetching():
    fetcher = _fetcher()
    with pytest.raises(PermissionDeniedError, match="scheme 'ftp'"):
        fetcher.fetch("ftp://example.com/x.png")
    with pytest.raises(PermissionDeniedError, match="credentials"):
        fetcher.fetch("http://user:pw@example.com/x.png")
    with pytest.raises(PermissionDeniedError, match="disabled"):
        _fetcher(allow_fetch=False).fetch("https://example.com/x.png")
    with pytest.raises(InvalidArgumentError, match="empty"):
        fetcher.fetch("")


def test_data_uris_work_even_with_fetching_disabled():
    uri = "data:image/png;base64," + base64.b64encode(BODY).decode()
    fetched = _fetcher(allow_fetch=False).fetch(uri)
    assert fetched.data == BODY and fetched.source == "data" and fetched.media_type == "image/png"


def test_local_files_are_refused_without_a_media_root():
    fetcher = _fetcher()
    for url in ("file:///etc/passwd", "/etc/passwd", "images/cat.png"):
        with pytest.raises(PermissionDeniedError, match="no media root"):
            fetcher.fetch(url)


def test_media_root_serves_only_files_inside_it(tmp_path: Path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(BODY)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", root / "escape.png")
    fetcher = _fetcher(media_root=root)
    assert fetcher.fetch(f"file://{root}/sub/cat.png").data == BODY
    assert fetcher.fetch("sub/cat.png").data == BODY
    for url in (f"file://{tmp_path}/secret.txt", "../secret.txt", "escape.png", "file:///etc/passwd"):
        with pytest.raises(PermissionDeniedError, match="outside the media root"):
            fetcher.fetch(url)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        fetcher.fetch("sub/nope.png")
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        fetcher.fetch("sub")
    with pytest.raises(PermissionDeniedError, match="host"):
        fetcher.fetch("file://otherhost/sub/cat.png")
