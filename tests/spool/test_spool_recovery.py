"""Spool recovery after crashes: debris removal, corrupt envelopes, SIGKILL runs."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio
import trio.lowlevel

from harness import daemon_environment
from trimta.spool.names import new_mid
from trimta.spool.store import Spool, open_spool

BODY = b"Subject: keep\r\n\r\nKeep me.\r\n"


async def make_complete_part(root, domain="example.org"):
    async with open_spool(root) as (spool, _):
        writer = spool.new_message()
        await writer.write(BODY)
        (part,) = await writer.commit(sender="", recipients={domain: ["a@" + domain]})
    return part


async def test_recovery_removes_each_debris_kind(tmp_path):
    part = await make_complete_part(tmp_path)
    domain_dir = tmp_path / "domains" / "example.org"
    orphan_body, orphan_envelope = new_mid(), new_mid()
    debris = [
        tmp_path / "tmp" / (new_mid() + ".eml"),
        domain_dir / (part.mid + ".1234abcd.env.tmp"),
        domain_dir / (orphan_body + ".eml"),
        domain_dir / (orphan_envelope + ".env"),
    ]
    for path in debris:
        path.write_bytes(b"partial")

    parts = await Spool(tmp_path).open()

    assert parts == [part]
    for path in debris:
        assert not path.exists(), path
    assert sorted(os.listdir(domain_dir)) == [part.mid + ".eml", part.mid + ".env"]


async def test_recovery_moves_corrupt_envelopes(tmp_path, caplog):
    good = await make_complete_part(tmp_path)
    domain_dir = tmp_path / "domains" / "example.org"
    garbage, future, mismatch = new_mid(), new_mid(), new_mid()
    content = json.loads((domain_dir / (good.mid + ".env")).read_bytes())
    (domain_dir / (garbage + ".env")).write_bytes(b"{not json")
    (domain_dir / (future + ".env")).write_text(json.dumps({**content, "version": 99}))
    (domain_dir / (mismatch + ".env")).write_text(json.dumps(content))  # names good.mid
    for mid in (garbage, future, mismatch):
        (domain_dir / (mid + ".eml")).write_bytes(BODY)

    with caplog.at_level(logging.WARNING, logger="trimta.spool"):
        parts = await Spool(tmp_path).open()

    assert parts == [good]
    corrupt_dir = tmp_path / "corrupt" / "example.org"
    for mid in (garbage, future, mismatch):
        assert (corrupt_dir / (mid + ".env")).exists()
        assert (corrupt_dir / (mid + ".eml")).read_bytes() == BODY
    messages = [r.getMessage() for r in caplog.records]
    assert sum("corrupt envelope" in m for m in messages) == 3
    assert any("unsupported envelope version 99" in m for m in messages)


async def test_recovery_skips_unknown_entries(tmp_path):
    await make_complete_part(tmp_path)
    (tmp_path / "domains" / "Not_A_Domain").mkdir()
    (tmp_path / "domains" / "example.org" / "README").write_text("operator note")
    parts = await Spool(tmp_path).open()
    assert len(parts) == 1
    assert (tmp_path / "domains" / "Not_A_Domain").is_dir()
    assert (tmp_path / "domains" / "example.org" / "README").exists()


async def test_recovery_creates_private_directories(tmp_path):
    root = tmp_path / "spool"
    assert await Spool(root).open() == []
    for name in ("", "tmp", "domains", "corrupt"):
        assert (root / name).stat().st_mode & 0o777 == 0o700


# The child commits messages from several concurrent sessions and prints
# each acknowledged part. The body is derived from the sender, so the
# parent can check any part it finds, acknowledged or not.
CHILD = textwrap.dedent(
    """
    import sys, trio
    from trimta.spool.store import open_spool

    def body_for(n, lines):
        return (b"line of message %d\\r\\n" % n) * lines + b"end %d\\r\\n" % lines

    async def session(spool, first):
        for n in range(first, first + 100000, 8):
            lines = (n * 7919) % 20000  # up to about 600 KiB
            writer = spool.new_message()
            await writer.write(body_for(n, lines))
            sender = "n%d.l%d@example.net" % (n, lines)
            domains = ["example.org", "example.com"][: 1 + n % 2]
            parts = await writer.commit(
                sender=sender, recipients={d: ["x@" + d] for d in domains}
            )
            for part in parts:
                print(part.mid, part.domain, flush=True)

    async def main():
        async with open_spool(sys.argv[1], sync_mode=sys.argv[3]) as (spool, _):
            print("ready", flush=True)
            async with trio.open_nursery() as nursery:
                for first in range(int(sys.argv[2]), int(sys.argv[2]) + 8):
                    nursery.start_soon(session, spool, first)

    trio.run(main)
    """
)


def expected_body(sender):
    n, lines = (int(field[1:]) for field in sender.split("@")[0].split("."))
    return (b"line of message %d\r\n" % n) * lines + b"end %d\r\n" % lines


def run_child_until_killed(script, root, first, delay, mode):
    """Run the child, SIGKILL it delay seconds after it is ready, return its lines."""
    child = subprocess.Popen(
        [sys.executable, str(script), str(root), str(first), mode],
        stdout=subprocess.PIPE,
        env=daemon_environment(),
    )
    ready = child.stdout.readline()
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate(timeout=10)
    assert ready == b"ready\n"
    # The kill may cut the last line short, so only whole lines count.
    return output.decode().split("\n")[:-1]


@pytest.mark.parametrize("mode", ["file", "filesystem"])
async def test_sigkill_leaves_only_complete_parts(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = tmp_path / "spool"
    rng = random.Random(1234)
    acknowledged = set()
    for round_number in range(6):
        lines = await trio.to_thread.run_sync(
            run_child_until_killed,
            script,
            root,
            round_number * 1_000_000,
            rng.random() * 0.5,
            mode,
        )
        acknowledged |= {tuple(line.split()) for line in lines}

        parts = await Spool(root).open()
        found = {(part.mid, part.domain) for part in parts}
        assert acknowledged <= found  # no acknowledged part lost
        assert os.listdir(root / "tmp") == []
        assert os.listdir(root / "corrupt") == []
        await check_parts_complete(root, parts)
    assert len(acknowledged) > 20  # the children got real work done


async def check_parts_complete(root, parts):
    async with open_spool(root) as (spool, _):
        for part in parts:
            envelope = await spool.load(part)
            body = spool.body_path(part).read_bytes()
            assert len(body) == envelope.size
            assert body == expected_body(envelope.sender)
        for domain in spool.list_domains():
            names = os.listdir(root / "domains" / domain)
            assert all(n.endswith((".env", ".eml")) for n in names)
            assert len(names) == 2 * len(spool.list_parts(domain))


async def test_parts_survive_restart(tmp_path):
    part = await make_complete_part(tmp_path)
    async with open_spool(tmp_path) as (spool, recovered):
        assert recovered == [part]
        assert spool.body_path(part).read_bytes() == BODY
        await trio.lowlevel.checkpoint()
