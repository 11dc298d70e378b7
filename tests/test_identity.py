"""Fair shares per caller, not per connection (moderation/gateway/identity.py, core/caller.py): who a call is, and
who gets a running slot at the gateway's admission when one caller opens many connections."""
from __future__ import annotations

import asyncio

from moderation.core.caller import CLIENT_METADATA, client_value, sign_client
from moderation.gateway.admission import Admission, AdmissionLimits
from moderation.gateway.identity import ClientIdentity, peer_host

KEY = b"k" * 32


def test_the_peer_counts_without_its_port():
    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:5678") == "ipv6:[::1]"
    assert peer_host("ipv6:%5B::1%5D:5678") == "ipv6:%5B::1%5D"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
    who = ClientIdentity()
    assert len({who.resolve(f"ipv4:127.0.0.1:{40000 + i}", ()) for i in range(16)}) == 1


def test_named_clients_are_taken_as_sent_without_a_key_and_must_be_signed_with_one():
    peer = "ipv4:127.0.0.1:40000"
    open_ = ClientIdentity()
    assert open_.resolve(peer, ((CLIENT_METADATA, "shop-a"),)) == "client:shop-a"
    assert open_.resolve(peer, ((CLIENT_METADATA, b"shop-b"),)) == "client:shop-b"
    keyed = ClientIdentity(KEY)
    assert keyed.resolve(peer, ((CLIENT_METADATA, sign_client(KEY, "shop-a")),)) == "client:shop-a"
    assert keyed.resolve(peer, ((CLIENT_METADATA, "shop-a"),)) == "peer:ipv4:127.0.0.1"  # unsigned: not trusted
    forged = sign_client(KEY, "shop-a").replace("shop-a", "shop-b")
    assert keyed.resolve(peer, ((CLIENT_METADATA, forged),)) == "peer:ipv4:127.0.0.1"
    assert keyed.resolve(peer, ((CLIENT_METADATA, client_value("http:10.1.2.3", KEY)),)) == "client:http:10.1.2.3"
    proxied = ClientIdentity(KEY, trusted_header="x-tenant")
    assert proxied.resolve(peer, (("x-tenant", "t1"), (CLIENT_METADATA, "x"))) == "header:t1"


def test_a_caller_with_sixteen_connections_gets_one_share():
    """16 calls from 16 connections of one host, then one call of another caller: the other caller's call runs at
    once, and the 16 share one client's slots (per_client 2: alone both, beside another caller one)."""
    async def run():
        admission = Admission(AdmissionLimits(per_client=2))
        entered: list[str] = []
        release = asyncio.Event()

        async def call(peer: str, metadata=()):
            ticket = admission.admit(admission.client_id(peer, metadata), 10)
            async with ticket:
                entered.append(peer)
                await release.wait()

        greedy = [asyncio.create_task(call(f"ipv4:10.0.0.7:{50000 + i}")) for i in range(16)]
        await asyncio.sleep(0)
        assert len(entered) == 2  # one client: its share, not one slot per connection
        polite = asyncio.create_task(call("ipv4:10.0.0.9:40000"))
        await asyncio.sleep(0)
        assert entered[-1] == "ipv4:10.0.0.9:40000" and len(entered) == 3
        assert admission.active_clients() == 2
        release.set()
        await asyncio.gather(*greedy, polite)
        assert len(entered) == 17 and admission.calls == 0

    asyncio.run(run())


def test_http_callers_through_one_front_end_are_clients_of_their_own():
    """The OpenAI front end's calls all come from its own address; the names it sends for its callers keep them
    apart, and with a key nobody else can claim those names."""
    front_end = "ipv4:127.0.0.1:45000"
    who = ClientIdentity(KEY)
    names = {who.resolve(front_end, ((CLIENT_METADATA, client_value(f"http:10.0.0.{i}", KEY)),)) for i in range(5)}
    assert len(names) == 5
    assert who.resolve("ipv4:127.0.0.1:45001", ((CLIENT_METADATA, "http:10.0.0.1"),)) == "peer:ipv4:127.0.0.1"


def test_client_token_prints_a_value_the_gateway_trusts(tmp_path):
    import os
    import subprocess
    import sys

    key_file = tmp_path / "client_key"
    key_file.write_bytes(KEY)
    env = dict(os.environ, MODERATION_GATEWAY_CLIENT_KEY_FILE=str(key_file))
    env.pop("MODERATION_ADMIN_KEY", None)
    p = subprocess.run([sys.executable, "-m", "clients.admin", "client-token", "--id", "shop-a"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert ClientIdentity(KEY).resolve("ipv4:10.0.0.7:1", ((CLIENT_METADATA, p.stdout.strip()),)) == "client:shop-a"
