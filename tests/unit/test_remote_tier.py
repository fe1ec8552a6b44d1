"""The remote tier's records and retention, on a real fsspec filesystem (file://): manifests and leases
that are not what they claim are refused, retention keeps what a resume needs."""

from __future__ import annotations

import hashlib
import json

import pytest

from daemon.ckpt.lease import parse_holder
from daemon.ckpt.remote import MANIFEST_SUFFIX, RemoteTier, parse_manifest
from daemon.ckpt.schema import InvalidCheckpoint
from daemon.config.sections import CheckpointConfig
from daemon.errors import ConfigError

NAME = "ckpt-0000000010-periodic.pt"
GOOD = {"format": 1, "name": NAME, "bytes": 3, "sha256": "a" * 64, "committed_at": 1.5}


def test_a_manifest_describes_its_own_checkpoint():
    manifest = parse_manifest(json.dumps(GOOD).encode(), NAME + MANIFEST_SUFFIX)
    assert (manifest.name, manifest.size, manifest.global_step, manifest.kind) == (NAME, 3, 10, "periodic")


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[" * 100_000,  # too deep for the parser, and larger than a manifest
        json.dumps({**GOOD, "name": "ckpt-0000000099-periodic.pt"}).encode(),  # another checkpoint's
        json.dumps({**GOOD, "bytes": -1}).encode(),
        json.dumps({**GOOD, "bytes": True}).encode(),
        json.dumps({**GOOD, "sha256": "A" * 64}).encode(),
        json.dumps({**GOOD, "format": 2}).encode(),
        json.dumps([GOOD]).encode(),
    ],
)
def test_a_manifest_that_is_not_one_is_refused(data):
    with pytest.raises(InvalidCheckpoint):
        parse_manifest(data, NAME + MANIFEST_SUFFIX)


@pytest.mark.parametrize(
    "data",
    [None, b"", b"{}", b"[1]", b'{"host": 1, "pid": 2, "token": "x", "expires_at": 0}', b'{"host": "h", "pid": "2"}'],
)
def test_a_lease_that_is_not_one_has_no_holder(data):
    assert parse_holder(data) is None


def committed(tier: RemoteTier, step: int, kind: str = "periodic") -> str:
    name = f"ckpt-{step:010d}-{kind}.pt"
    data = name.encode()
    tier.fs.pipe_file(f"{tier.root}/{name}", data)
    manifest = {"format": 1, "name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tier.create(name + MANIFEST_SUFFIX, json.dumps({**manifest, "committed_at": float(step)}).encode())
    return name


def test_retention_keeps_the_newest_the_resumed_and_uploads_in_flight(tmp_path):
    tier = RemoteTier(f"file://{tmp_path}/remote", {})
    tier.check_usable()
    names = [committed(tier, step) for step in (10, 20, 30, 40, 50)]
    orphan_old = "ckpt-0000000015-periodic.pt"  # an upload killed before its manifest
    orphan_new = "ckpt-0000000060-periodic.pt"  # an upload under way
    for orphan in (orphan_old, orphan_new):
        tier.fs.pipe_file(f"{tier.root}/{orphan}", b"partial")

    removed = tier.prune(keep_last=2, protect={names[0]})

    assert sorted(removed) == sorted([names[1], names[2], orphan_old])
    manifests, bad = tier.committed()
    assert [m.name for m in manifests] == [names[4], names[3], names[0]] and not bad
    left = set(tier.names())
    assert orphan_new in left and not any(name.startswith(names[1]) for name in left)


def test_a_second_manifest_for_a_committed_name_is_refused(tmp_path):
    tier = RemoteTier(f"file://{tmp_path}/remote", {})
    tier.check_usable()
    name = committed(tier, 10)
    with pytest.raises(FileExistsError):
        tier.create(name + MANIFEST_SUFFIX, b"{}")


@pytest.mark.parametrize("listed_first", [True, False], ids=["after a listing", "without one"])
def test_an_upload_never_replaces_an_earlier_commit_of_its_name(tmp_path, listed_first):
    tier = RemoteTier(f"file://{tmp_path}/remote", {})
    tier.check_usable()
    name = committed(tier, 10)
    if listed_first:  # the resume's listing: uploads then look only at names it found committed
        tier.committed()
    local = tmp_path / name
    local.write_bytes(b"other bytes")

    with pytest.raises(FileExistsError):
        tier.upload(local, name)

    assert tier.fs.cat_file(f"{tier.root}/{name}") == name.encode()
    fresh = tmp_path / "ckpt-0000000020-periodic.pt"
    fresh.write_bytes(b"step 20")
    assert tier.upload(fresh, fresh.name) is not None
    assert tier.upload(fresh, fresh.name) is None  # committed already, with these bytes
    assert [m.name for m in tier.committed()[0]] == [fresh.name, name]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"remote": "bucket/prefix"}, "checkpoint.remote"),
        ({"remote": "s3://"}, "checkpoint.remote"),
        ({"remote_options": {"endpoint_url": "http://x"}}, "checkpoint.remote_options"),  # without remote
        ({"remote": "s3://b/p", "remote_options": {"aws_secret_access_key": "x"}}, "aws_secret_access_key"),
        ({"remote": "s3://b/p", "remote_options": {"client_kwargs": {"aws_session_token": "x"}}}, "aws_session_token"),
        ({"remote": "s3://b/p", "remote_stop_timeout_seconds": 0}, "remote_stop_timeout_seconds"),
        ({"remote": "s3://b/p", "remote_lease_seconds": 1}, "remote_lease_seconds"),
    ],
)
def test_bad_remote_settings_name_their_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        CheckpointConfig(**settings)
