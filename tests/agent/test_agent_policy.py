from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.errors import TargetDenied
from agent.policy import AllowEntry, Policy, is_under, normalize_url


def policy(*entries: dict[str, object], resolver=None) -> Policy:
    return Policy([AllowEntry.model_validate(e) for e in entries], resolver=resolver)


PREFIX = policy({"prefix": "https://api.internal:8443/v1/"})


@pytest.mark.parametrize(
    "url",
    [
        "https://api.internal:8443/v1/",
        "https://api.internal:8443/v1",
        "https://api.internal:8443/v1/users?q=1&x=2",
        "HTTPS://API.Internal:8443/v1/users",
        "https://api.internal:8443/v1/%7Euser",  # unreserved ~ decodes (RFC 3986 §6.2.2.2)
        "https://api.internal:8443/%761/users",  # %76 is "v"
        "https://api.internal.:8443/v1/x",  # trailing root dot is the same host
    ],
)
def test_prefix_allows(url: str) -> None:
    PREFIX.check(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://api.internal:8443/v10/users", "no allow entry"),
        ("https://api.internal:8443/v", "no allow entry"),
        ("https://api.internal:8443/admin", "no allow entry"),
        ("https://api.internal/v1/", "no allow entry"),  # port 443, not 8443
        ("https://api.internal:443/v1/", "no allow entry"),
        ("http://api.internal:8443/v1/", "no allow entry"),  # scheme differs
        ("https://api.internal:08443/v1/", None),  # same port number: allowed below
        ("https://api.internal.evil:8443/v1/", "no allow entry"),
        ("https://api.internal:8443@evil.example/v1/", "userinfo"),
        ("https://api.internal:8443/v1/../admin", "dot segment"),
        ("https://api.internal:8443/v1/%2e%2e/admin", "dot segment"),
        ("https://api.internal:8443/v1/%2E%2E/admin", "dot segment"),
        ("https://api.internal:8443/v1/.%2e/admin", "dot segment"),
        ("https://api.internal:8443/v1/..;/admin", "dot segment"),
        ("https://api.internal:8443/v1/./x", "dot segment"),
        ("https://api.internal:8443/v1/..", "dot segment"),
        ("https://api.internal:8443/v1%2F..%2Fadmin", "encoded slash"),
        ("https://api.internal:8443/v1/a%2fb", "encoded slash"),
        ("https://api.internal:8443/v1/a%5cb", "encoded backslash"),
        ("https://api.internal:8443/v1/a\\..\\admin", "backslash"),
        ("https://api.internal:8443/v1/a%00b", "NUL"),
        ("https://api.internal:8443/v1/a%zzb", "percent-encoding"),
        ("https://api.internal:8443/v1/x#frag", "fragment"),
        ("https://api.internal:8443/v1/a b", "printable ASCII"),
        ("https://api.internal:8443/v1/\r\nx", "printable ASCII"),
        ("https://api.internal:8443/v1/x\n", "printable ASCII"),
        ("ftp://api.internal:8443/v1/", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https:api.internal:8443/v1/", "absolute"),
        ("//api.internal:8443/v1/", "scheme"),
        ("https://api.internal:99999/v1/", "invalid port"),
        ("https://api.internal:/v1/", "empty port"),
        ("https://api.internal:84x3/v1/", "invalid port"),
        ("https://%61pi.internal:8443/v1/", "percent-encoding in host"),
        ("https:///v1/", "no host"),
    ],
)
def test_prefix_denies(url: str, why: str | None) -> None:
    if why is None:
        PREFIX.check(url)
        return
    with pytest.raises(TargetDenied) as info:
        PREFIX.check(url)
    assert why in str(info.value)


def test_userinfo_trick_is_refused_even_when_host_allowed() -> None:
    p = policy({"host": "allowed.example"})
    p.check("http://allowed.example/")
    for url in (
        "http://allowed.example@evil/",
        "http://allowed.example:80@evil/",
        "http://user:pw@allowed.example/",
        "http://evil#@allowed.example/",
    ):
        with pytest.raises(TargetDenied):
            p.check(url)
    with pytest.raises(TargetDenied):
        p.check("http://allowed.example.evil/")
    with pytest.raises(TargetDenied):
        p.check("http://evil-allowed.example/")


def test_denial_message_names_url_without_query_or_userinfo() -> None:
    with pytest.raises(TargetDenied) as info:
        PREFIX.check("https://other.internal/x?password=hunter2")
    message = str(info.value)
    assert "https://other.internal:443/x" in message
    assert "hunter2" not in message
    with pytest.raises(TargetDenied) as info:
        PREFIX.check("https://user:hunter2@api.internal:8443/v1/?token=abc")
    assert "hunter2" not in str(info.value)
    assert "abc" not in str(info.value)


def test_prefix_without_trailing_slash_is_segment_bounded() -> None:
    p = policy({"prefix": "http://h.example/v1"})
    p.check("http://h.example/v1")
    p.check("http://h.example/v1/x")
    with pytest.raises(TargetDenied):
        p.check("http://h.example/v10")
    with pytest.raises(TargetDenied):
        p.check("http://h.example/v1.json")


def test_root_prefix_allows_whole_origin() -> None:
    p = policy({"prefix": "http://h.example/"})
    p.check("http://h.example/")
    p.check("http://h.example/anything/at/all")
    p.check("http://h.example:80/x")
    with pytest.raises(TargetDenied):
        p.check("http://h.example:8080/x")


def test_host_default_port_only_for_its_scheme() -> None:
    p = policy({"host": "files.corp.example"})
    p.check("https://files.corp.example/a")
    p.check("http://files.corp.example/a")
    p.check("https://files.corp.example:443/a")
    with pytest.raises(TargetDenied):
        p.check("https://files.corp.example:80/a")
    with pytest.raises(TargetDenied):
        p.check("http://files.corp.example:443/a")
    with pytest.raises(TargetDenied):
        p.check("http://files.corp.example:8080/a")


def test_host_with_ports() -> None:
    p = policy({"host": "files.corp.example", "ports": [8080]})
    p.check("http://files.corp.example:8080/")
    with pytest.raises(TargetDenied):
        p.check("http://files.corp.example/")


def test_wildcard_host_matches_subdomains_only() -> None:
    p = policy({"host": "*.corp.example"})
    p.check("https://a.corp.example/")
    p.check("https://a.b.corp.example/")
    for url in (
        "https://corp.example/",
        "https://evilcorp.example/",
        "https://a.corp.example.evil/",
    ):
        with pytest.raises(TargetDenied):
            p.check(url)


def test_ipv6_literals() -> None:
    p = policy({"cidr": "fd00::/8", "ports": [443]}, {"host": "::1", "ports": [8080]})
    p.check("https://[fd00::1]/x")
    p.check("https://[FD00:0:0::1]:443/x")
    p.check("http://[::1]:8080/")
    p.check("http://[0:0:0:0:0:0:0:1]:8080/")
    for url in (
        "https://[fe80::1]/",
        "https://[fd00::1]:8443/",
        "https://[fd00::1%25eth0]/",
        "https://[fd00::1/",
        "https://[fd00::zz]/",
        "https://fd00::1/",
    ):
        with pytest.raises(TargetDenied):
            p.check(url)


def test_ipv4_mapped_ipv6_matches_ipv4_cidr() -> None:
    p = policy({"cidr": "10.20.0.0/16", "ports": [80]})
    p.check("http://[::ffff:10.20.1.2]/")
    with pytest.raises(TargetDenied):
        p.check("http://[::ffff:10.21.1.2]/")


def test_cidr_ip_literals_and_ports() -> None:
    p = policy({"cidr": "10.20.0.0/16", "ports": [80, 443]})
    p.check("http://10.20.3.4/")
    p.check("https://10.20.3.4/")
    p.check("http://10.20.3.4:443/")
    with pytest.raises(TargetDenied):
        p.check("http://10.20.3.4:8080/")
    with pytest.raises(TargetDenied):
        p.check("http://10.21.3.4/")


@pytest.mark.parametrize(
    "host", ["127.1", "0x7f.0.0.1", "2130706433", "017700000001", "10.20.1", "0x0a.20.1.1"]
)
def test_ambiguous_numeric_hosts_refused(host: str) -> None:
    p = policy({"cidr": "0.0.0.0/0", "ports": [80]}, resolver=lambda h, port: ["10.0.0.1"])
    with pytest.raises(TargetDenied, match="ambiguous numeric host"):
        p.check(f"http://{host}/")


def test_cidr_resolves_host_names_and_requires_every_address_inside() -> None:
    answers = {
        "inside.corp": ["10.20.0.5", "10.20.9.9"],
        "mixed.corp": ["10.20.0.5", "192.168.1.1"],
        "v6.corp": ["::ffff:10.20.0.7"],
    }
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        if host not in answers:
            raise OSError("Name or service not known")
        return answers[host]

    p = policy({"cidr": "10.20.0.0/16", "ports": [80]}, resolver=resolver)
    p.check("http://inside.corp/x")
    p.check("http://v6.corp/x")
    assert calls[0] == ("inside.corp", 80)
    with pytest.raises(TargetDenied, match=r"192\.168\.1\.1"):
        p.check("http://mixed.corp/")
    with pytest.raises(TargetDenied, match="does not resolve"):
        p.check("http://nowhere.corp/")
    with pytest.raises(TargetDenied):
        p.check("http://inside.corp:8080/")


async def test_check_async_resolves_off_the_loop() -> None:
    p = policy({"cidr": "10.20.0.0/16"}, resolver=lambda h, port: ["10.20.0.1"])
    target = await p.check_async("http://Inside.Corp/a%7Eb?x=1")
    assert target.host == "inside.corp"
    assert target.path == "/a~b"
    assert target.query == "x=1"
    assert target.port == 80


def test_no_dns_without_cidr_entries() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("must not resolve")

    p = policy({"host": "a.example"}, resolver=resolver)
    with pytest.raises(TargetDenied):
        p.check("http://b.example/")


def test_empty_policy_denies_everything() -> None:
    with pytest.raises(TargetDenied, match="deny by default"):
        Policy([]).check("http://127.0.0.1/")


def test_normalize_keeps_reserved_escapes_uppercased() -> None:
    n = normalize_url("http://h.example/a%3ab%7e?q=%2F")
    assert n.path == "/a%3Ab~"
    assert n.query == "q=%2F"  # the query is not matched, only passed on
    assert normalize_url("http://h.example").path == "/"


def test_is_under() -> None:
    assert is_under("http://h.example:80/api/x", "http://H.example/api/")
    assert is_under("http://h.example/api", "http://h.example/api/")
    assert not is_under("http://h.example/apix", "http://h.example/api")
    assert not is_under("http://h.example:81/api/x", "http://h.example/api/")
    assert not is_under("https://h.example/api/x", "http://h.example/api/")


@pytest.mark.parametrize(
    "entry",
    [
        {},
        {"prefix": "https://a/", "host": "a"},
        {"prefix": "https://a/", "ports": [443]},
        {"prefix": "ftp://a/"},
        {"prefix": "https://u@a/"},
        {"prefix": "https://a/?x=1"},
        {"host": "https://a"},
        {"host": "a/b"},
        {"cidr": "10.0.0.0/33"},
        {"cidr": "ten"},
        {"host": "a", "ports": [0]},
        {"host": "a", "ports": [70000]},
        {"host": "a", "extra": 1},
    ],
)
def test_bad_allow_entries_rejected(entry: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AllowEntry.model_validate(entry)


_URL_PIECES = st.sampled_from(
    [
        "http://",
        "https://",
        "HTTP://",
        "allowed.example",
        "evil",
        "@",
        ":",
        "80",
        "443",
        "/",
        "v1",
        "..",
        ".",
        "%2e",
        "%2f",
        "%5c",
        "%40",
        "\\",
        "?",
        "#",
        "[",
        "]",
        "::1",
        "127.0.0.1",
        "0x7f",
        ";",
        "%",
        "a",
        "%61",
    ]
)


@settings(max_examples=800, deadline=None)
@given(st.lists(_URL_PIECES, min_size=1, max_size=12).map("".join))
def test_accepted_urls_mean_the_same_to_httpx(url: str) -> None:
    """Whatever the policy accepts, httpx must read as the same origin and path."""
    try:
        target = normalize_url(url)
    except TargetDenied:
        return
    parsed = httpx.URL(target.geturl())
    assert parsed.scheme == target.scheme
    assert parsed.host == target.host
    assert (parsed.port or {"http": 80, "https": 443}[parsed.scheme]) == target.port
    assert parsed.raw_path.decode().split("?", 1)[0] == target.path
    original = httpx.URL(url)
    assert original.host.rstrip(".") == target.host
    assert ".." not in target.path.split("/")


def test_allowed_under_is_the_static_rules_and_the_base_url_together() -> None:
    """The executor's common case in one remembered lookup: a target a static rule allows,
    under the connection's base URL. Anything else is None, left to the full checks that
    name the reason, and is not remembered."""
    prefix = policy({"prefix": "https://api.internal:8443/v1/"})
    base = "https://api.internal:8443/v1/"
    found = prefix.allowed_under("https://api.internal:8443/v1/users?q=1", base)
    assert found == normalize_url("https://api.internal:8443/v1/users?q=1")
    assert prefix.allowed_under("https://api.internal:8443/v1/users?q=1", base) is found
    # Allowed, but outside this connection's base URL: another API on an allowed host.
    assert prefix.allowed_under("https://api.internal:8443/v1/users", base + "admin/") is None
    # Under the base URL, but no rule allows it.
    assert (
        prefix.allowed_under("https://api.internal:8443/v2/x", "https://api.internal:8443/") is None
    )
    assert prefix.allowed_under("https://api.internal:8443/v1/x", "not a url") is None
    assert prefix.allowed_under("https://api.internal:8443/v1/%2e%2e/x", base) is None
    # A CIDR entry allows a host name only after DNS: not here.
    by_cidr = policy({"cidr": "127.0.0.0/8", "ports": [8080]})
    assert by_cidr.allowed_under("http://localhost:8080/x", "http://localhost:8080/") is None
    assert by_cidr.allowed_under("http://127.0.0.1:8080/x", "http://127.0.0.1:8080/")
    assert len(prefix._under) == 1 and len(by_cidr._under) == 1
